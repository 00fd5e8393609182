"""The SQLite schema, as numbered migrations applied in order at start-up.

A migration is never edited once released: add a new one instead. Most are SQL scripts; one
that SQL alone cannot express is a function of the connection.
"""

import logging
import sqlite3
from typing import Callable

log = logging.getLogger("tollgate.store")

_STATUS_IN = "CHECK (status IN ('running', 'success', 'error', 'cancelled'))"
_STATUS_COMPARED = "CHECK (status = 'running' OR status = 'success' OR status = 'error' OR status = 'cancelled')"


def _status_check_as_comparisons(db: sqlite3.Connection) -> None:
    """SQLite checks `x IN (list)` of more than two constants through an index of the list it
    builds for every row written: a call's insert and its update each built one, a quarter of
    their instructions. The same check as comparisons builds nothing. SQLite cannot alter a
    CHECK, and copying the table would take minutes for millions of calls; the check means the
    same either way, so the table's definition is edited in place, as SQLite documents for
    changes that leave what is stored untouched (https://sqlite.org/lang_altertable.html,
    "Making Other Kinds Of Table Schema Changes"). Where SQLite refuses that (its defensive
    mode), the old check stays: slower, and just as right."""
    (version,) = db.execute("PRAGMA schema_version").fetchone()
    db.execute("PRAGMA writable_schema = ON")
    try:
        db.execute(
            "UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE type = 'table' AND name = 'llm_calls'",
            (_STATUS_IN, _STATUS_COMPARED),
        )
        db.execute(f"PRAGMA schema_version = {version + 1}")  # every connection reads the schema again
    except sqlite3.DatabaseError as exc:
        log.info("llm_calls keeps its status check as it was (%s)", exc)
    finally:
        db.execute("PRAGMA writable_schema = RESET")  # off, and this connection reads the schema again too


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: the initial schema.
    """
    CREATE TABLE organizations (
        organization_id TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        created_at      REAL NOT NULL
    );

    CREATE TABLE model_groups (
        name        TEXT PRIMARY KEY,
        models      TEXT NOT NULL,              -- JSON list, primary first
        description TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );

    CREATE TABLE teams (
        team_id             TEXT PRIMARY KEY,
        organization_id     TEXT NOT NULL REFERENCES organizations(organization_id),
        status              TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
        credits_allocated   INTEGER NOT NULL CHECK (credits_allocated >= 0),
        credits_used        INTEGER NOT NULL DEFAULT 0 CHECK (credits_used >= 0),
        credits_held        INTEGER NOT NULL DEFAULT 0 CHECK (credits_held >= 0),
        default_model_group TEXT,
        rpm_limit           INTEGER,
        tpm_limit           INTEGER,
        credits_per_job     INTEGER,
        created_at          REAL NOT NULL,
        updated_at          REAL NOT NULL,
        -- The balance can never be spent or held twice, whatever the code above does.
        CHECK (credits_used + credits_held <= credits_allocated)
    );

    CREATE TABLE team_model_groups (
        team_id     TEXT NOT NULL REFERENCES teams(team_id) ON DELETE CASCADE,
        model_group TEXT NOT NULL REFERENCES model_groups(name),
        position    INTEGER NOT NULL,
        PRIMARY KEY (team_id, model_group)
    );

    CREATE TABLE virtual_keys (
        key_id     TEXT PRIMARY KEY,
        key_hash   BLOB NOT NULL UNIQUE,        -- SHA-256 of the key; the key itself is never stored
        team_id    TEXT NOT NULL REFERENCES teams(team_id),
        name       TEXT,
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL,
        rpm_limit  INTEGER,
        tpm_limit  INTEGER
    );
    CREATE INDEX virtual_keys_team ON virtual_keys(team_id);

    CREATE TABLE jobs (
        job_id                  TEXT PRIMARY KEY,
        team_id                 TEXT NOT NULL REFERENCES teams(team_id),
        job_type                TEXT NOT NULL,
        user_id                 TEXT,
        status                  TEXT NOT NULL
                                CHECK (status IN ('pending', 'in_progress', 'completed', 'failed')),
        metadata                TEXT NOT NULL DEFAULT '{}',
        error_message           TEXT,
        created_at              REAL NOT NULL,
        completed_at            REAL,
        credits_held            INTEGER NOT NULL,
        credits_charged         INTEGER NOT NULL DEFAULT 0,
        credits_remaining_after INTEGER
    );
    CREATE INDEX jobs_team_created ON jobs(team_id, created_at DESC);
    CREATE INDEX jobs_open ON jobs(created_at) WHERE status IN ('pending', 'in_progress');

    CREATE TABLE credit_holds (
        job_id     TEXT PRIMARY KEY REFERENCES jobs(job_id),
        team_id    TEXT NOT NULL REFERENCES teams(team_id),
        amount     INTEGER NOT NULL CHECK (amount >= 0),
        created_at REAL NOT NULL
    );

    CREATE TABLE credit_ledger (
        entry_id      INTEGER PRIMARY KEY AUTOINCREMENT,
        team_id       TEXT NOT NULL REFERENCES teams(team_id),
        job_id        TEXT REFERENCES jobs(job_id),
        amount        INTEGER NOT NULL,
        reason        TEXT NOT NULL,
        balance_after INTEGER NOT NULL,
        created_at    REAL NOT NULL
    );
    CREATE INDEX credit_ledger_team ON credit_ledger(team_id, entry_id DESC);
    -- A job is charged at most once, enforced by the database itself.
    CREATE UNIQUE INDEX credit_ledger_job ON credit_ledger(job_id) WHERE job_id IS NOT NULL;

    CREATE TABLE llm_calls (
        call_id           TEXT PRIMARY KEY,
        job_id            TEXT NOT NULL REFERENCES jobs(job_id),
        team_id           TEXT NOT NULL,
        key_id            TEXT,
        model_group       TEXT NOT NULL,
        model             TEXT,
        purpose           TEXT,
        streamed          INTEGER NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ('running', 'success', 'error', 'cancelled')),
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        usage_estimated   INTEGER NOT NULL DEFAULT 0,
        cost_usd          REAL NOT NULL DEFAULT 0,
        latency_ms        INTEGER,
        ttft_ms           INTEGER,
        attempts          INTEGER NOT NULL DEFAULT 0,
        error             TEXT,
        started_at        REAL NOT NULL,
        finished_at       REAL
    );
    CREATE INDEX llm_calls_job ON llm_calls(job_id, started_at);
    CREATE INDEX llm_calls_running ON llm_calls(started_at) WHERE status = 'running';
    """,
    # 2: a call's start is one statement: its insert moves a pending job to in_progress.
    """
    CREATE TRIGGER llm_calls_start_job AFTER INSERT ON llm_calls WHEN NEW.status = 'running'
    BEGIN
        UPDATE jobs SET status = 'in_progress' WHERE job_id = NEW.job_id AND status = 'pending';
    END;
    """,
    # 3: no index of running calls. Keeping it cost every call two more pages written to the
    # WAL (its entry added at the start, removed at the end): a quarter of a call's writes.
    # Running calls are found through open jobs instead (jobs_open, then llm_calls_job),
    # since a call can only run in an open job.
    """
    DROP INDEX llm_calls_running;
    """,
    # 4: the status check of llm_calls as comparisons (see `_status_check_as_comparisons`).
    _status_check_as_comparisons,
    # 5: when a running call counts as left behind by a process that died, as the process
    # serving it judges (its upstream.timeouts.total plus its jobs.stale_call_margin): another
    # process sharing the database, configured with a shorter timeout, closed live calls.
    """
    ALTER TABLE llm_calls ADD COLUMN stale_at REAL;
    """,
    # 6: a team's open jobs, for its job lists filtered by an open status: through the team's
    # index of all its jobs, a team with a million finished ones took half a second a page.
    # Partial, as jobs_open: an entry made as a job opens and removed as it ends (about 3 µs a
    # job), where one of every job by status would move at each change of it (about 10).
    """
    CREATE INDEX jobs_team_open ON jobs(team_id, created_at DESC) WHERE status IN ('pending', 'in_progress');
    """,
    # 7: how many jobs each team has made, completed and failed, for the totals of its job lists:
    # counted from its jobs, a team of a million finished ones took half a second for a page
    # whose rows took two milliseconds. Kept by the statements that hold and settle a job's
    # credits, on the team's row they change already (no page more in the WAL): triggers keeping
    # them cost a /v1 call's own job 5% more instructions in the store (45k against 3k). Counted
    # here once, as the database migrates: 0.66 s for a team of a million jobs.
    """
    ALTER TABLE teams ADD COLUMN jobs_made INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE teams ADD COLUMN jobs_completed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE teams ADD COLUMN jobs_failed INTEGER NOT NULL DEFAULT 0;
    UPDATE teams SET (jobs_made, jobs_completed, jobs_failed) = (
        SELECT COUNT(*), COUNT(CASE WHEN j.status = 'completed' THEN 1 END), COUNT(CASE WHEN j.status = 'failed' THEN 1 END)
        FROM jobs j WHERE j.team_id = teams.team_id
    );
    """,
]


def apply(db: sqlite3.Connection, migration: str | Callable[[sqlite3.Connection], None]) -> None:
    """Run one migration inside the caller's transaction."""
    if callable(migration):
        migration(db)
        return
    for statement in statements(migration):
        db.execute(statement)


def statements(script: str) -> list[str]:
    result, current = [], []
    for line in script.splitlines():
        current.append(line)
        if sqlite3.complete_statement("\n".join(current)):
            result.append("\n".join(current).strip())
            current = []
    # A last statement without its semicolon is never complete: run it (or have SQLite refuse
    # it) rather than drop it, which recorded the migration applied without its change.
    result.append("\n".join(current).strip())
    return [s for s in result if s]
