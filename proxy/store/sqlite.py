"""The SQLite store.

Five connections per process, all in WAL mode: the event loop's and the writer thread's for
writes (see writer.py: writes are group-committed on the loop, and go to the thread when they
must wait for another process's lock; the thread also fsyncs and checkpoints; transactions
begin with ``BEGIN IMMEDIATE``, so writers in other processes queue instead of failing
half-way), a reader through aiosqlite, which WAL lets run beside any writer, and two for reads
that must agree with each other, made in one transaction (`_read_together`): a job's view on
one, pages of a team's jobs (and the sweep's search for stale calls) on the other. Writes are
shielded from cancellation: a client hanging up never leaves a half-recorded call or charge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import aiosqlite

from ..config import DatabaseConfig
from ..ids import new_id
from ..json_codec import dumps
from ..records import (
    IMPLICIT_JOB_TYPE,
    OPEN_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    CallOutcome,
    CallSummary,
    InterruptedCall,
    Job,
    JobCosts,
    JobEnd,
    LedgerEntry,
    ModelGroup,
    NewCall,
    Organization,
    RawJSON,
    Team,
    VirtualKey,
)
from . import (
    CallInProgress,
    Conflict,
    FailedThenRefused,
    Forbidden,
    InsufficientCredits,
    JobClosed,
    JobExpired,
    NotFound,
    SchemaTooNew,
    StoreBusy,
    StoreError,
    StoreUnavailable,
    TeamSuspended,
    Unsaved,
    WrittenThenCancelled,
)
from .aio_fsync import AioFsync
from .schema import MIGRATIONS, apply
from .writer import WAL_SIZE_LIMIT, Work, Writer, busy_or

log = logging.getLogger("tollgate.store")

T = TypeVar("T")
R = TypeVar("R")


_TEAM_COLUMNS = """
    t.team_id, t.organization_id, t.status, t.credits_allocated, t.credits_used, t.credits_held,
    t.default_model_group, t.rpm_limit, t.tpm_limit, t.credits_per_job, t.created_at,
    (SELECT json_group_array(model_group) FROM
        (SELECT model_group FROM team_model_groups g WHERE g.team_id = t.team_id ORDER BY g.position)
    ) AS model_groups
"""
_KEY_COLUMNS = "k.key_id, k.team_id, k.name, k.created_at, k.expires_at, k.revoked_at, k.rpm_limit, k.tpm_limit"
_JOB_COLUMNS = """
    j.job_id, j.team_id, j.job_type, j.user_id, j.status, j.metadata, j.error_message, j.created_at,
    j.completed_at, j.credits_held, j.credits_charged, j.credits_remaining_after
"""
_COST_COLUMNS = """
    COUNT(c.call_id),
    COALESCE(SUM(c.status = 'success'), 0),
    COALESCE(SUM(c.status IN ('error', 'cancelled')), 0),
    COALESCE(SUM(c.prompt_tokens), 0),
    COALESCE(SUM(c.completion_tokens), 0),
    COALESCE(exact_sum(c.cost_usd), 0.0),
    COALESCE(ROUND(AVG(c.latency_ms)), 0)
"""
_CALL_COLUMNS = """
    call_id, purpose, model_group, model, status, streamed, prompt_tokens, completion_tokens,
    usage_estimated, cost_usd, latency_ms, ttft_ms, attempts, error, started_at
"""
_JOB_WITH_COSTS = (
    f"SELECT {_JOB_COLUMNS}, {_COST_COLUMNS} FROM jobs j LEFT JOIN llm_calls c ON c.job_id = j.job_id "
    "WHERE j.job_id = ? GROUP BY j.job_id"
)
_JOB_ALONE = f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.job_id = ?"
_JOB_CALLS = f"SELECT {_CALL_COLUMNS} FROM llm_calls WHERE job_id = ? ORDER BY started_at, call_id"


def _team(row: sqlite3.Row | tuple, offset: int = 0) -> Team:
    r = row[offset : offset + 12]
    return Team(
        team_id=r[0],
        organization_id=r[1],
        status=r[2],
        credits_allocated=r[3],
        credits_used=r[4],
        credits_held=r[5],
        default_model_group=r[6],
        rpm_limit=r[7],
        tpm_limit=r[8],
        credits_per_job=r[9],
        created_at=r[10],
        model_groups=tuple(json.loads(r[11])),
    )


def _key(row: sqlite3.Row | tuple) -> VirtualKey:
    return VirtualKey(*row[:8])


def _job(row: sqlite3.Row | tuple, with_costs: bool, metadata_as_text: bool = False) -> Job:
    costs = JobCosts()
    if with_costs:
        c = row[12:19]
        costs = JobCosts(
            total_calls=c[0],
            successful_calls=c[1],
            failed_calls=c[2],
            prompt_tokens=c[3],
            completion_tokens=c[4],
            total_cost_usd=round(c[5], 12),
            avg_latency_ms=int(c[6]),
        )
    return Job(
        job_id=row[0],
        team_id=row[1],
        job_type=row[2],
        user_id=row[3],
        status=row[4],
        metadata=RawJSON(row[5]) if metadata_as_text else json.loads(row[5]),
        error_message=row[6],
        created_at=row[7],
        completed_at=row[8],
        credits_held=row[9],
        credits_charged=row[10],
        credits_remaining_after=row[11],
        costs=costs,
    )


def _call(row: sqlite3.Row | tuple) -> CallSummary:
    return CallSummary(
        call_id=row[0],
        purpose=row[1],
        model_group=row[2],
        model=row[3],
        status=row[4],
        streamed=bool(row[5]),
        prompt_tokens=row[6],
        completion_tokens=row[7],
        usage_estimated=bool(row[8]),
        cost_usd=row[9],
        latency_ms=row[10],
        time_to_first_token_ms=row[11],
        attempts=row[12],
        error=row[13],
        started_at=row[14],
    )


class _ExactSum:
    """SQL's SUM of costs, correctly rounded (math.fsum): SQLite's own (before 3.43) adds in plain
    floating point, and the error of each addition piles up, a thousand calls of $0.10 making
    $99.999999999999, where a job's total is to be exact to 1e-12 USD (its calls' costs' unit)."""

    def __init__(self) -> None:
        self._values: list[float] = []

    def step(self, value: float | None) -> None:
        if value is not None:
            self._values.append(value)

    def finalize(self) -> float:
        try:
            return math.fsum(self._values)
        except OverflowError:  # past the largest float on the way: what SUM gives then
            return sum(self._values)


def _probe_write(db: sqlite3.Connection) -> None:
    """A write that needs room as a call's record does (a row, pages beyond one), and leaves
    nothing behind. The id cannot be an organization's: ids are refused with a space."""
    db.execute(
        "INSERT INTO organizations (organization_id, name, created_at) VALUES (?, zeroblob(8192), 0)",
        (PROBE_ID,),
    )
    db.execute("DELETE FROM organizations WHERE organization_id = ?", (PROBE_ID,))


PROBE_ID = "readiness probe"

# An implicit job (records.IMPLICIT_JOB_TYPE) that its own call has started: it takes no other.
_TAKEN_IMPLICIT_JOB = (
    # json_type, not json_extract: a JSON 1 (or 1.0) extracts as 1 too, and only `true` is the mark
    # (records.is_implicit); a client's job of that type with {"implicit": 1} is its own.
    f"(status = 'in_progress' AND job_type = '{IMPLICIT_JOB_TYPE}' AND json_type(metadata, '$.implicit') = 'true')"
)


# The error of a call a sweeper closed because the process serving it was gone.
INTERRUPTED = "interrupted: the process serving it stopped"
INTERRUPTED_JOB = "interrupted: the process serving its call stopped"
EXPIRED_JOB = "expired: the job stayed open too long"
# Jobs a sweep fails together: their writes, made in one turn, commit in one transaction with one
# fsync (one each, about 470 jobs a second); few enough that the loop's turn stays short for calls.
FAIL_TOGETHER = 20
_FINISH_CALL = (
    "UPDATE llm_calls SET status = ?, model = ?, prompt_tokens = ?, completion_tokens = ?, "
    "usage_estimated = ?, cost_usd = ?, latency_ms = ?, ttft_ms = ?, attempts = ?, error = ?, "
    "finished_at = ? WHERE call_id = ? AND "
)
_FINISH_RUNNING_CALL = _FINISH_CALL + "status = 'running'"
_FINISH_RUNNING_OR_INTERRUPTED_CALL = (
    _FINISH_CALL + "(status = 'running' OR (status = 'cancelled' AND error = '" + INTERRUPTED + "'))"
)


class SQLiteStore:
    def __init__(
        self,
        config: DatabaseConfig,
        clock: Callable[[], float] = time.time,
        expire_after: float = math.inf,
        existing: bool = False,
    ) -> None:
        """`existing`: open the database only if it is there, never make a new one."""
        self._config = config
        self._existing = existing
        self._clock = clock
        # jobs.expire_after: a job older is expired, whether or not a sweep has failed it yet.
        self._expire_after = expire_after
        self._writer: Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        # Reads that must agree with each other (see `_read_together`), one at a time: a job's
        # view on one connection, a page of a team's jobs on another.
        self._together: sqlite3.Connection | None = None
        self._together_lock = threading.Lock()
        self._listing: sqlite3.Connection | None = None
        self._listing_lock = threading.Lock()
        # What the last write refused for want of disk said, until a probe succeeds: readiness
        # then fails (a write that changes nothing can succeed on a full disk, a row cannot).
        self._unwritable: StoreUnavailable | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._existing and not os.path.exists(self._config.sqlite_path):
            raise StoreError(
                "it is not there, removed since `tollgate serve` made it: restore it, or start serve again"
            )
        directory = os.path.dirname(os.path.abspath(self._config.sqlite_path))
        os.makedirs(directory, exist_ok=True)
        # Read before the writer opens it: its connection puts the database in WAL mode for good,
        # and a newer release's database is to be refused as it was found.
        version = _schema_checked(await asyncio.to_thread(self._schema_version_read))
        self._writer = Writer(
            self._connect_writer,
            self._connect_on_loop,
            sync_wal=self._config.synchronous == "full",
            fsync_from_loop=AioFsync.open if self._config.aio_fsync else None,
        )
        try:
            await self._writer.start()
            if version < len(MIGRATIONS):
                await self._migrate()
            self._reader = await aiosqlite.connect(
                self._config.sqlite_path, isolation_level=None, timeout=self._config.busy_timeout
            )
            for pragma in self._pragmas():
                await self._reader.execute(pragma)
            self._together = self._connect_together()
            self._listing = self._connect_together()
            # The database's files as SQLite opened them, looked at now: a start that migrates
            # nothing writes nothing, and a file replaced before the first fsync went unnoticed.
            self._writer.check()
        except BaseException:
            # A schema too new, a file that is not a database: what opened is closed now, not
            # left running to the garbage collector (which Python 3.13 warns of).
            await self.close()
            raise

    async def close(self) -> None:
        # Writes in flight (they are shielded from cancellation) are finished first.
        if self._writer is not None:
            await self._writer.stop()
        if self._reader is not None:
            await self._reader.close()
        self._reader = self._writer = None
        with self._together_lock:  # a read under way in its thread ends first
            if self._together is not None:
                self._together.close()
            self._together = None
        with self._listing_lock:
            if self._listing is not None:
                self._listing.close()
            self._listing = None

    async def ping(self) -> None:
        """Fails if the store cannot be read, takes no more writes (after a failed fsync, or
        its database file replaced underneath it: `Writer.check`), or refused a write for want
        of disk (full, failing, read-only) and still does."""
        if self._writer is None:
            raise StoreError("The store is closed")
        self._writer.check()
        await self._read("SELECT 1")
        if self._unwritable is not None:
            await self._write(_probe_write)  # raises while the database still cannot be written
            # A probe committed before its fsync failed is answered as done (`_write`), yet the
            # store takes no more writes from then on: ready it is not.
            self._writer.check()
            self._unwritable = None

    def _pragmas(self) -> list[str]:
        return [
            f"PRAGMA busy_timeout = {int(self._config.busy_timeout * 1000)}",
            "PRAGMA journal_mode = WAL",
            "PRAGMA foreign_keys = ON",
            f"PRAGMA synchronous = {self._config.synchronous.upper()}",
            f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}",
            _TEMP_IN_MEMORY,
        ]

    def _connect_writer(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._config.sqlite_path, isolation_level=None, timeout=self._config.busy_timeout, check_same_thread=False
        )
        return _set_up(connection, self._pragmas(), wait=self._config.busy_timeout)

    def _connect_together(self) -> sqlite3.Connection:
        connection = self._connect_writer()  # the same settings; it only reads
        # The costs of job views and pages (`_COST_COLUMNS`) are read on it, and only on these.
        # (typeshed's protocol of an aggregate has it give an int; SQLite takes a float as well.)
        connection.create_aggregate("exact_sum", 1, _ExactSum)  # type: ignore[arg-type]
        return connection

    def _connect_on_loop(self) -> sqlite3.Connection:
        """The event loop's write connection: it never waits for a lock (the writer thread
        does) and never fsyncs (the thread fsyncs the WAL for it), nor checkpoints. The
        thread's connection, opened first, has put the database in WAL mode for good."""
        connection = sqlite3.connect(self._config.sqlite_path, isolation_level=None, timeout=0, check_same_thread=False)
        return _set_up(connection, [
            "PRAGMA foreign_keys = ON",
            "PRAGMA synchronous = NORMAL",
            "PRAGMA wal_autocheckpoint = 0",
            f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}",  # its commits are the ones that start the WAL over
        ])

    async def _migrate(self) -> None:
        # Only after the version, read without the write lock (`open`), said a migration is due:
        # a database already migrated (any start but the first of a release: a worker started
        # again, a CLI command) then waits for no other process's write, which could outlast
        # database.busy_timeout and fail the start. Another process may have migrated it since.

        def migrate(db: sqlite3.Connection) -> None:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            current = _schema_checked(_all(db, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])
            for version, migration in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                apply(db, migration)
                db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, self._clock()))

        await self._write(migrate)

    def _schema_version_read(self) -> int:
        """The schema's version, 0 for a database without one (new), read on a connection of its
        own: the store's reader is not open yet, and the writer's connections take no reads."""
        db = sqlite3.connect(self._config.sqlite_path, timeout=self._config.busy_timeout)
        try:
            return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise
        finally:
            db.close()

    async def schema_version(self) -> int:
        rows = await self._read("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return rows[0][0]

    # --- plumbing ----------------------------------------------------------------------

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        assert self._reader is not None, "store is not open"
        try:
            return list(await self._reader.execute_fetchall(sql, tuple(params)))
        except sqlite3.DatabaseError as exc:  # a damaged file's error is no OperationalError
            raise busy_or(exc)

    async def _read_together(
        self, read: Callable[[sqlite3.Connection], R], then: Callable[[R], T], listing: bool = False
    ) -> T:
        """Reads that must agree with each other, as of one moment: in one transaction, on a
        connection of their own, in a thread. One by one on the reader, a write committed
        between two of them showed in one and not the other (a call's end in a job's calls but
        not in its costs; a job's charge in the balance beside the job still shown open).
        `read` takes the rows, `then` makes records of them, in the same thread but after the
        connection is let go: a page of 500 jobs is up to 64 MB of metadata to decode, seconds
        during which every other team's job reads and completions waited for the connection.
        `listing`: a page of a team's jobs, or the sweep's search for stale calls, on a
        connection of its own: a page reads each job of the team that it counts or skips (a
        million: half a second and more), and every team's job views and completions waited
        behind it."""
        if self._together is None:
            raise StoreError("The store is closed")
        return await asyncio.to_thread(lambda: then(self._run_together(read, listing)))

    def _run_together(self, read: Callable[[sqlite3.Connection], R], listing: bool) -> R:
        with self._listing_lock if listing else self._together_lock:
            db = self._listing if listing else self._together
            if db is None:
                raise StoreError("The store is closed")
            try:
                db.execute("BEGIN")  # the snapshot is taken by the first read, and kept to COMMIT
                try:
                    return read(db)
                finally:
                    db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise busy_or(exc) from None

    async def _write(self, work: Work[T], atomic: bool = True, durable: bool = True, done_if_cut: bool = False) -> T:
        """Run a write to its end even if the caller is cancelled meanwhile; the caller's
        cancellation is delivered once the write is done, so it can tell what happened.
        `atomic=False` says the write is one statement (reads aside): alone in its
        batch, it then needs no transaction of its own. `durable=False`: answered once
        committed, before the commit is on disk (see writer.py). `done_if_cut`: a write that
        went through is answered as done though its caller was cancelled meanwhile (the
        cancellation taken back), for a request's writes alone: only a shutdown cancels a
        request (uvicorn's, once server.shutdown_grace is over), and a client told otherwise
        would do it again (credits added twice; a second job made, the first holding its
        credit until it expired). A sweeper's task must stay cancelled."""
        if self._writer is None:
            raise StoreError("The store is closed")
        write = self._writer.submit(work, atomic=atomic, durable=durable)
        try:
            return await write  # a WriteFuture: a cancellation waits for it (writer.py)
        except Unsaved as exc:
            # Committed, and then the fsync failed: every reader sees the write, and the store
            # takes no more (readiness fails, the log says why). Answered as done, since the
            # database holds it: a refusal would have the caller try again, charging a job or
            # adding credits twice, while the answer it paid for was dropped.
            return exc.value  # type: ignore[no-any-return]
        except StoreUnavailable as exc:
            self._unwritable = exc
            raise
        except asyncio.CancelledError:
            if write.done() and not write.cancelled():
                # Only its caller was cancelled: the write's own outcome is known, and one that
                # went through is told, so that its caller does not take it for lost.
                failure = write.exception()
                if failure is None or isinstance(failure, Unsaved):
                    value = write.result() if failure is None else failure.value
                    if done_if_cut:
                        asyncio.current_task().uncancel()  # type: ignore[union-attr]
                        return value  # type: ignore[no-any-return]
                    raise WrittenThenCancelled(value) from None
            raise

    # --- organizations and model groups --------------------------------------------------

    async def create_organization(self, organization_id: str, name: str) -> Organization:
        now = self._clock()

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO organizations (organization_id, name, created_at) VALUES (?, ?, ?)",
                    (organization_id, name, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"Organization '{organization_id}' already exists") from None

        await self._write(insert, atomic=False)
        return Organization(organization_id, name, now)

    async def ensure_organization(self, organization_id: str, name: str) -> Organization:
        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO organizations (organization_id, name, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (organization_id) DO UPDATE SET name = excluded.name",
                (organization_id, name, self._clock()),
            )

        await self._write(upsert, atomic=False)
        organization = await self.get_organization(organization_id)
        assert organization is not None
        return organization

    async def get_organization(self, organization_id: str) -> Organization | None:
        rows = await self._read(
            "SELECT organization_id, name, created_at FROM organizations WHERE organization_id = ?",
            (organization_id,),
        )
        return Organization(*rows[0]) if rows else None

    async def list_organizations(self) -> list[Organization]:
        rows = await self._read("SELECT organization_id, name, created_at FROM organizations ORDER BY organization_id")
        return [Organization(*row) for row in rows]

    async def create_model_group(self, name: str, models: list[str], description: str) -> ModelGroup:
        now = self._clock()

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO model_groups (name, models, description, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (name, json.dumps(models), description, now, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"Model group '{name}' already exists") from None

        await self._write(insert, atomic=False)
        return ModelGroup(name, tuple(models), description, now, now)

    async def put_model_group(self, name: str, models: list[str], description: str) -> ModelGroup:
        now = self._clock()

        # The group as written, returned by the write itself: read back afterwards, it may be
        # gone already (deleted by another admin or worker meanwhile).
        def upsert(db: sqlite3.Connection) -> ModelGroup:
            rows = _all(db,
                "INSERT INTO model_groups (name, models, description, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET models = excluded.models, description = excluded.description, "
                "updated_at = excluded.updated_at RETURNING name, models, description, created_at, updated_at",
                (name, json.dumps(models), description, now, now),
            )
            return _group(rows[0])

        return await self._write(upsert, atomic=False)

    async def get_model_group(self, name: str) -> ModelGroup | None:
        rows = await self._read(
            "SELECT name, models, description, created_at, updated_at FROM model_groups WHERE name = ?", (name,)
        )
        return _group(rows[0]) if rows else None

    async def list_model_groups(self) -> list[ModelGroup]:
        rows = await self._read("SELECT name, models, description, created_at, updated_at FROM model_groups ORDER BY name")
        return [_group(row) for row in rows]

    async def delete_model_group(self, name: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            users = _all(db,
                "SELECT team_id FROM team_model_groups WHERE model_group = ? ORDER BY team_id", (name,)
            )
            if users:
                teams = ", ".join(row[0] for row in users)
                raise Conflict(f"Model group '{name}' is granted to teams: {teams}; remove it from them first")
            cursor = db.execute("DELETE FROM model_groups WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NotFound(f"Model group '{name}' not found")

        await self._write(delete)

    # --- teams, credits and keys -----------------------------------------------------------

    async def create_team(self, team: Team, reason: str) -> Team:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO teams (team_id, organization_id, status, credits_allocated, default_model_group, "
                    "rpm_limit, tpm_limit, credits_per_job, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        team.team_id,
                        team.organization_id,
                        team.status,
                        team.credits_allocated,
                        team.default_model_group,
                        team.rpm_limit,
                        team.tpm_limit,
                        team.credits_per_job,
                        team.created_at,
                        team.created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                    raise Conflict(f"Team '{team.team_id}' already exists") from None
                raise NotFound(f"Organization '{team.organization_id}' not found") from None
            _grant_groups(db, team.team_id, team.model_groups)
            if team.credits_allocated:
                _ledger_entry(db, team.team_id, None, team.credits_allocated, reason, team.created_at)

        await self._write(insert)
        created = await self.get_team(team.team_id)
        assert created is not None
        return created

    async def get_team(self, team_id: str) -> Team | None:
        rows = await self._read(f"SELECT {_TEAM_COLUMNS} FROM teams t WHERE t.team_id = ?", (team_id,))
        return _team(rows[0]) if rows else None

    async def list_teams(self) -> list[Team]:
        rows = await self._read(f"SELECT {_TEAM_COLUMNS} FROM teams t ORDER BY t.team_id")
        return [_team(row) for row in rows]

    async def update_team(self, team_id: str, changes: dict[str, Any]) -> Team:
        # organization_id: only config.yaml moves a team (the admin API cannot).
        columns = {"organization_id", "status", "default_model_group", "rpm_limit", "tpm_limit", "credits_per_job"}
        assignments = {name: value for name, value in changes.items() if name in columns}
        groups = changes.get("model_groups")

        def update(db: sqlite3.Connection) -> None:
            sets = ", ".join(f"{name} = ?" for name in assignments)
            sql = f"UPDATE teams SET {sets + ', ' if sets else ''}updated_at = ? WHERE team_id = ?"
            try:
                cursor = db.execute(sql, (*assignments.values(), self._clock(), team_id))
            except sqlite3.IntegrityError as exc:
                # The one reference among the columns: a team moved to an organization that does not exist.
                if "FOREIGN KEY" not in str(exc) or "organization_id" not in assignments:
                    raise
                raise NotFound(f"Organization '{assignments['organization_id']}' not found") from None
            if cursor.rowcount == 0:
                raise NotFound(f"Team '{team_id}' not found")
            if groups is not None:
                db.execute("DELETE FROM team_model_groups WHERE team_id = ?", (team_id,))
                _grant_groups(db, team_id, groups)
            # Checked here, in the write, not only by the caller before it: a change made
            # meanwhile (another PATCH, another worker, the CLI) may have moved the other half.
            if "default_model_group" in assignments or groups is not None:
                stray = _all(db,
                    "SELECT default_model_group FROM teams t WHERE team_id = ? AND default_model_group IS NOT NULL "
                    "AND NOT EXISTS (SELECT 1 FROM team_model_groups g "
                    "WHERE g.team_id = t.team_id AND g.model_group = t.default_model_group)",
                    (team_id,),
                )
                if stray:
                    raise Conflict(
                        f"Team '{team_id}' changed meanwhile: its default model group '{stray[0][0]}' "
                        "would not be one of its model groups"
                    )

        await self._write(update)
        team = await self.get_team(team_id)
        assert team is not None
        return team

    async def add_credits(self, team_id: str, amount: int, reason: str) -> Team:
        # The team as written, returned by the write itself: read back afterwards, a shutdown's
        # cut coming during that read answered credits added as not added (a 503), to be added
        # again, where a cut during the write answers them as added (`done_if_cut`).
        def add(db: sqlite3.Connection) -> Team:
            rows = _all(db,
                "UPDATE teams SET credits_allocated = credits_allocated + ?, updated_at = ? "
                "WHERE team_id = ? AND credits_allocated + ? >= credits_used + credits_held "
                "RETURNING credits_allocated - credits_used",
                (amount, self._clock(), team_id, amount),
            )
            if not rows:
                team = _team_in(db, team_id)
                raise Conflict(
                    f"Cannot remove {-amount} credits from team '{team_id}': only "
                    f"{team.credits_available} are neither used nor held"
                )
            _ledger_entry(db, team_id, None, amount, reason, self._clock(), balance_after=rows[0][0])
            return _team_in(db, team_id)

        return await self._write(add, done_if_cut=True)

    async def ledger(self, team_id: str, limit: int, offset: int) -> list[LedgerEntry]:
        rows = await self._read(
            "SELECT entry_id, team_id, job_id, amount, reason, balance_after, created_at FROM credit_ledger "
            "WHERE team_id = ? ORDER BY entry_id DESC LIMIT ? OFFSET ?",
            (team_id, limit, offset),
        )
        return [LedgerEntry(*row) for row in rows]

    async def create_key(self, key: VirtualKey, key_hash: bytes) -> VirtualKey:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO virtual_keys (key_id, key_hash, team_id, name, created_at, expires_at, rpm_limit, "
                    "tpm_limit) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.key_id,
                        key_hash,
                        key.team_id,
                        key.name,
                        key.created_at,
                        key.expires_at,
                        key.rpm_limit,
                        key.tpm_limit,
                    ),
                )
            except sqlite3.IntegrityError:
                raise NotFound(f"Team '{key.team_id}' not found") from None

        await self._write(insert, atomic=False, done_if_cut=True)  # its secret is shown only in this answer
        return key

    async def list_keys(self, team_id: str) -> list[VirtualKey]:
        rows = await self._read(
            f"SELECT {_KEY_COLUMNS} FROM virtual_keys k WHERE k.team_id = ? ORDER BY k.created_at, k.key_id",
            (team_id,),
        )
        return [_key(row) for row in rows]

    async def revoke_key(self, key_id: str) -> VirtualKey:
        def revoke(db: sqlite3.Connection) -> VirtualKey:
            rows = _all(db,
                f"UPDATE virtual_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ? "
                f"RETURNING {_KEY_COLUMNS.replace('k.', '')}",
                (self._clock(), key_id),
            )
            if not rows:
                raise NotFound(f"Key '{key_id}' not found")
            return _key(rows[0])

        return await self._write(revoke, atomic=False)

    async def lookup_key(self, key_hash: bytes) -> tuple[VirtualKey, Team] | None:
        rows = await self._read(
            f"SELECT {_KEY_COLUMNS}, {_TEAM_COLUMNS} FROM virtual_keys k JOIN teams t ON t.team_id = k.team_id "
            "WHERE k.key_hash = ?",
            (key_hash,),
        )
        if not rows:
            return None
        return _key(rows[0]), _team(rows[0], offset=8)

    # --- jobs and calls --------------------------------------------------------------------

    async def create_job(
        self,
        team_id: str,
        job_type: str,
        user_id: str | None,
        metadata: dict[str, Any],
        default_credits: int,
        made_room: list[str] | None = None,
    ) -> Job:
        """`made_room`: the ids of the team's jobs past their expiry that were failed to free
        credits for this one's hold (`_make_room`) are added to it, for the caller to count
        as failed, as a sweep counts those it fails (it finds them failed, and counts none)."""
        job_id = new_id()
        now = self._clock()
        metadata_json = _metadata_text(metadata)

        def create(db: sqlite3.Connection) -> tuple[int, list[str]]:
            return _open_job(db, job_id, team_id, job_type, user_id, metadata_json, default_credits, now,
                             now - self._expire_after)

        held, failed = await self._write(create, done_if_cut=True)
        if made_room is not None:
            made_room.extend(failed)
        return Job(job_id, team_id, job_type, user_id, "pending", metadata, None, now, None, held, 0, None)

    async def get_job(self, job_id: str) -> Job | None:
        """The job's own row: its costs are not summed from its calls (`job_view` has them)."""
        rows = await self._read(_JOB_ALONE, (job_id,))
        return _job(rows[0], False) if rows else None

    async def job_view(self, job_id: str) -> tuple[Job, list[CallSummary], int] | None:
        """A job with its costs and calls, and its team's credits_remaining, all of one moment."""

        def read(db: sqlite3.Connection) -> tuple[Any, list[Any], int] | None:
            rows = _all(db, _JOB_WITH_COSTS, (job_id,))
            if not rows:
                return None
            return rows[0], _all(db, _JOB_CALLS, (job_id,)), _remaining_in(db, rows[0][1])  # [1]: its team

        def records(rows: tuple[Any, list[Any], int] | None) -> tuple[Job, list[CallSummary], int] | None:
            if rows is None:
                return None
            job, calls, remaining = rows
            return _job(job, True), [_call(row) for row in calls], remaining

        return await self._read_together(read, records)

    async def team_jobs(self, team_id: str, status: str | None, limit: int, offset: int) -> tuple[list[Job], int, int]:
        """A page of the team's jobs, newest first, with their costs; how many jobs match; and
        the team's credits_remaining: all of one moment."""
        where, params = "j.team_id = ?", [team_id]
        if status:
            where += " AND j.status = ?"
            params.append(status)
        if status in OPEN_JOB_STATUSES:
            # The partial index's own condition, which SQLite must see to read through it.
            where += " AND j.status IN ('pending', 'in_progress')"
        counted = _TEAM_JOB_COUNTS.get(status or None)  # the team's own count of them, if it keeps one

        def read(db: sqlite3.Connection) -> tuple[list[Any], int, int]:
            if counted is None:  # open jobs: few, counted through their own index
                found = _all(db, f"SELECT COUNT(*) FROM jobs j WHERE {where}", params)
            else:
                found = _all(db, f"SELECT {counted} FROM teams WHERE team_id = ?", (team_id,))
            total = found[0][0] if found else 0
            remaining = _remaining_in(db, team_id)
            if offset >= total and not (status is None and offset == 0):
                return [], total, remaining  # skipping to it would read every job the team has
            # A page of all the team's jobs that reaches its total asks for one job more (the
            # next entry of the team's index, a step): found, the total is short of jobs an
            # earlier release made (`_recount_jobs`). Not for a status: finding none more could
            # read the rest of the team's history.
            beyond = 1 if status is None and offset + limit >= total else 0
            # The page's jobs, through the team's index, and only theirs joined to their calls:
            # grouped before the limit, every job the team ever had was summed and sorted for each page.
            rows = _all(
                db,
                f"SELECT {_JOB_COLUMNS}, {_COST_COLUMNS} FROM "
                f"(SELECT * FROM jobs j WHERE {where} ORDER BY j.created_at DESC, j.job_id LIMIT ? OFFSET ?) j "
                "LEFT JOIN llm_calls c ON c.job_id = j.job_id GROUP BY j.job_id ORDER BY j.created_at DESC, j.job_id",
                (*params, limit + beyond, offset),
            )
            return rows, total, remaining

        def records(page: tuple[list[Any], int, int]) -> tuple[list[Job], int, int]:
            rows, total, remaining = page
            return [_job(row, True, metadata_as_text=True) for row in rows], total, remaining

        jobs, total, remaining = await self._read_together(read, records, listing=True)
        if counted is not None and offset + len(jobs) > total:
            try:
                total = await self._recount_jobs(team_id, counted)
            except (StoreBusy, StoreUnavailable):
                # A read, listed as read: the database locked by another process, or not writable,
                # fails writes alone. The jobs found stand for the total (one more than the page,
                # if found, has the client ask for the next); a later page counts them.
                total = offset + len(jobs)
        return jobs[:limit], total, remaining

    async def _recount_jobs(self, team_id: str, counted: str) -> int:
        """Count the team's jobs again into its totals; return the `counted` one. A release
        before schema 7 writing beside this one (a rolling restart) leaves the jobs it makes and
        ends out of them, and a page stops at its total: those jobs were never listed. Counted
        once they are found, in one statement, as the migration counted them."""
        log.info("the job totals of team %s are counted again: a release before schema 7 left jobs out", team_id)

        def recount(db: sqlite3.Connection) -> int:
            return int(_all(db, f"{_RECOUNT_JOBS} WHERE team_id = ? RETURNING {counted}", (team_id,))[0][0])

        return await self._write(recount, atomic=False)

    async def start_call(
        self, call: NewCall, own_job_default_credits: int | None = None, made_room: list[str] | None = None
    ) -> None:
        """Record the call as running in its job. With `own_job_default_credits`, the job is the
        call's own (a /v1 call without X-Job-Id), made in the same write, holding the team's
        credits per job (this many unless the team sets its own): a job without its call never
        exists, nor does a call refused at its start leave a job holding a credit; `made_room`
        as for `create_job`, filled before a WrittenThenCancelled too. Cancelled meanwhile:
        WrittenThenCancelled once the call is started, else a plain CancelledError (nothing of
        the call written)."""
        now = self._clock()
        expired_before = now - self._expire_after

        def start(db: sqlite3.Connection) -> list[str] | None:
            """Once the call is started, the ids of the jobs failed to make room for its own job
            (`_open_job`); None for an open job past its expiry (nothing written)."""
            failed: list[str] = []
            if own_job_default_credits is not None:
                _, failed = _open_job(db, call.job_id, call.team_id, IMPLICIT_JOB_TYPE, None, _IMPLICIT_METADATA,
                                      own_job_default_credits, now, expired_before)
            cursor = db.execute(
                "INSERT INTO llm_calls (call_id, job_id, team_id, key_id, model_group, purpose, streamed, status, "
                "started_at, stale_at) SELECT ?, job_id, team_id, ?, ?, ?, ?, 'running', ?, ? FROM jobs "
                "WHERE job_id = ? AND team_id = ? AND status IN ('pending', 'in_progress') AND created_at >= ? "
                f"AND NOT {_TAKEN_IMPLICIT_JOB}",
                (
                    call.call_id,
                    call.key_id,
                    call.model_group,
                    call.purpose,
                    int(call.streamed),
                    call.started_at,
                    call.stale_at,
                    call.job_id,
                    call.team_id,
                    expired_before,
                ),
            )
            if cursor.rowcount == 0:
                rows = _all(
                    db, f"SELECT status, team_id, {_TAKEN_IMPLICIT_JOB} FROM jobs WHERE job_id = ?", (call.job_id,)
                )
                if not rows:
                    raise NotFound(f"Job '{call.job_id}' not found")
                if rows[0][1] != call.team_id:
                    raise Forbidden(f"Job '{call.job_id}' belongs to another team")
                if rows[0][0] in OPEN_JOB_STATUSES and rows[0][2]:
                    raise Conflict(
                        f"Job '{call.job_id}' is the own job of a /v1 call made without X-Job-Id: it takes no other call"
                    )
                if rows[0][0] in OPEN_JOB_STATUSES:  # open, but past its expiry
                    return None
                raise JobClosed(call.job_id, rows[0][0])
            # The insert's trigger (schema 2) moved a pending job to in_progress.
            return failed

        # Not waiting for the disk: a start matters only with the call's end, whose write
        # is durable and, the WAL being written in order, makes this one durable too.
        try:
            started = await self._write(start, atomic=own_job_default_credits is not None, durable=False)
        except WrittenThenCancelled as cut:
            if cut.value is None:  # the job had expired: nothing of the call was written
                raise asyncio.CancelledError() from None
            if made_room is not None:
                made_room.extend(cut.value)
            raise
        if started is None:
            # Failed in a transaction of its own, as the sweep fails it: the start's write has
            # none (atomic=False, a single statement), so a failure's statements would commit
            # one by one, and one refused after the hold was deleted (the database busy with
            # another process, a full disk) would leave the team's credit held for good.
            # Cut by the shutdown once written, it is answered as done, as a request's writes
            # are: the job failed now is counted so by the caller, and never by the sweep.
            failed_now = await self._write(lambda db: _expire_job_in(db, call.job_id, now), done_if_cut=True)
            raise JobExpired(call.job_id, failed_now)
        if made_room is not None:
            made_room.extend(started)

    async def finish_call(self, outcome: CallOutcome, *, over_interrupted: bool = False) -> bool:
        """Record a call's end; False if it was finished already. `over_interrupted`: also over
        a sweeper's closing it as interrupted, for an outcome kept while the store refused
        writes, which another process's sweeper may have closed meanwhile without its figures."""

        def finish(db: sqlite3.Connection) -> bool:
            return _finish_call_in(db, outcome, over_interrupted)

        return await self._write(finish, atomic=False)

    async def finish_call_and_job(
        self, outcome: CallOutcome, job_end: JobEnd, *, over_interrupted: bool = False
    ) -> tuple[bool, bool]:
        """Record a call's end and finish its own job in the same write, so that nothing (a
        crash, a store refusing the second of two writes) can leave a recorded call's job open,
        holding its credit, uncharged. Returns whether the call was recorded (see
        `finish_call`) and whether its job was finished now. A job finished already is left as
        it is, but for one a sweep failed as interrupted meanwhile (in another process, which
        could not know this outcome was kept) that the outcome charges: it is charged now, if
        the team's credits not used or held still pay for it."""

        now = self._clock()

        def finish(db: sqlite3.Connection) -> tuple[bool, bool]:
            recorded = _finish_call_in(db, outcome, over_interrupted)
            try:
                changed = _finish_job_in(db, job_end.job_id, job_end.status, None, job_end.error_message, now)
            except JobClosed:
                # Refused before it wrote anything, and the call's record stands. A kept outcome
                # may find its job failed by another process's sweep, which closed the call as
                # interrupted without knowing of it: the job then ends as the outcome says.
                changed = (
                    recorded and over_interrupted and job_end.status == "completed"
                    and _charge_interrupted_job_in(db, job_end.job_id, job_end.error_message, now)
                )
            except (CallInProgress, NotFound):
                # NotFound: a start cut short by a cancellation may have made neither job nor call.
                changed = False
            return recorded, changed

        return await self._write(finish)

    async def finish_job(
        self, job_id: str, status: str, metadata: dict[str, Any] | None, error_message: str | None,
        done_if_cut: bool = False,
    ) -> tuple[Job, bool]:
        """Finish a job; returns it (as `get_job` reads it) and whether this call changed it (False
        for a repeat). `done_if_cut`: a request's, answered as finished if it was (`_write`)."""
        now = self._clock()
        expired_before = now - self._expire_after

        def finish(db: sqlite3.Connection) -> bool | None:
            """Whether the job was finished now; None if it was to be charged past its expiry,
            and was failed instead (a failure is one either way)."""
            if status == "completed" and _all(db,
                "SELECT 1 FROM jobs WHERE job_id = ? AND status IN ('pending', 'in_progress') AND created_at < ?",
                (job_id, expired_before),
            ):
                # While a call of it runs, CallInProgress (before any write), as for any job:
                # the sweep waits for that call too.
                _finish_job_in(db, job_id, "failed", None, EXPIRED_JOB, now)
                return None
            return _finish_job_in(db, job_id, status, metadata, error_message, now)

        changed = await self._write(finish, done_if_cut=done_if_cut)
        if changed is None:
            raise JobExpired(job_id, failed_now=True)
        job = await self.get_job(job_id)
        assert job is not None
        return job, changed

    async def expire_jobs(self, created_before: float, limit: int) -> list[Job]:
        rows = await self._read(
            "SELECT job_id FROM jobs j WHERE status IN ('pending', 'in_progress') AND created_at < ? "
            "AND NOT EXISTS (SELECT 1 FROM llm_calls c WHERE c.job_id = j.job_id AND c.status = 'running') "
            "ORDER BY created_at LIMIT ?",
            (created_before, limit),
        )
        return await self._fail_jobs([job_id for (job_id,) in rows], EXPIRED_JOB)

    async def fail_interrupted_implicit_jobs(self, limit: int) -> list[Job]:
        """Fail the own jobs of /v1 calls closed as interrupted: nobody else finishes them
        (their client may not) and they would hold their credit until they expired. Only
        calls the sweeper closed: a job whose call was recorded otherwise is its call's to
        finish (a moment later, in the process that served it)."""
        rows = await self._read(
            # The first term names the open jobs' partial index: a scan of them, not of every job.
            f"SELECT job_id FROM jobs j WHERE status IN ('pending', 'in_progress') AND {_TAKEN_IMPLICIT_JOB} "
            "AND EXISTS (SELECT 1 FROM llm_calls c WHERE c.job_id = j.job_id AND c.error = ?) "
            "AND NOT EXISTS (SELECT 1 FROM llm_calls c WHERE c.job_id = j.job_id AND c.status = 'running') "
            "LIMIT ?",
            (INTERRUPTED, limit),
        )
        return await self._fail_jobs([job_id for (job_id,) in rows], INTERRUPTED_JOB)

    async def _fail_jobs(self, job_ids: list[str], error_message: str) -> list[Job]:
        """Fail each job found open by a sweep, FAIL_TOGETHER at a time; return those this failed."""
        failed = []
        for start in range(0, len(job_ids), FAIL_TOGETHER):
            together = job_ids[start : start + FAIL_TOGETHER]
            outcomes = await asyncio.gather(
                *(self.finish_job(job_id, "failed", None, error_message) for job_id in together),
                return_exceptions=True,
            )
            error: BaseException | None = None
            for outcome in outcomes:
                if isinstance(outcome, (JobClosed, CallInProgress)):
                    continue  # finished or resumed by someone else since the sweep read it
                if isinstance(outcome, BaseException):
                    error = error or outcome
                    continue
                job, changed = outcome
                if changed:
                    failed.append(job)
            if error is not None:
                # The jobs failed before the refusal (in this group or earlier ones) are failed
                # for good: the sweep counts them still.
                if failed:
                    raise FailedThenRefused(failed, error) from error
                raise error
        return failed

    async def cancel_stale_calls(
        self, started_before: float, now: float | None = None, steps: Sequence[tuple[float, float]] = ()
    ) -> list[InterruptedCall]:
        """Close as interrupted the calls still running past the time their own process set
        (`stale_at`, which `now` is compared with), or, for a call recorded without one (by an
        earlier release), started before `started_before`. `steps`: (started before, seconds)
        of each step forward of the wall clock seen: a call started before one is judged that
        many seconds earlier, since its bounds were written on the clock before the step."""
        now = self._clock() if now is None else now
        late = "".join(" - CASE WHEN started_at < ? THEN ? ELSE 0 END" for _ in steps)
        late_params = [value for step in steps for value in step]
        stale = f"status = 'running' AND (stale_at < ?{late} OR (stale_at IS NULL AND started_at < ?{late}))"
        params = (now, *late_params, started_before, *late_params)
        # The open jobs lead to every running call without an index of them (a call runs only
        # in an open job: finish_job refuses a job with one running), but through every call
        # those jobs made (a few hundred open jobs of a thousand calls each: a quarter of a
        # second). So they are found on the connection of long reads, not on the event loop,
        # where writes run, nor on the reader, where key lookups and readiness probes would wait
        # behind it; then closed by id.
        search = (
            f"SELECT call_id FROM llm_calls WHERE {stale} "
            "AND job_id IN (SELECT job_id FROM jobs WHERE status IN ('pending', 'in_progress'))"
        )
        rows = await self._read_together(lambda db: _all(db, search, params), _same, listing=True)
        if not rows:
            return []

        def cancel(db: sqlite3.Connection) -> list[InterruptedCall]:
            closed = _all(db,
                # Still running and stale: a call may have ended since it was read.
                "UPDATE llm_calls SET status = 'cancelled', error = ?, finished_at = ? "
                f"WHERE call_id IN (SELECT value FROM json_each(?)) AND {stale} "
                "RETURNING team_id, model_group, streamed",
                (INTERRUPTED, self._clock(), json.dumps([call_id for (call_id,) in rows]), *params),
            )
            return [InterruptedCall(team_id, group, bool(streamed)) for team_id, group, streamed in closed]

        return await self._write(cancel, atomic=False)

    # --- used by tests and operators -------------------------------------------------------

    async def team_balances(self) -> list[tuple[str, int]]:
        rows = await self._read("SELECT team_id, credits_allocated - credits_used FROM teams ORDER BY team_id")
        return [(row[0], row[1]) for row in rows]

    async def ledger_sum(self, team_id: str) -> int:
        rows = await self._read("SELECT COALESCE(SUM(amount), 0) FROM credit_ledger WHERE team_id = ?", (team_id,))
        return rows[0][0]


def _schema_checked(current: int) -> int:
    """The schema's version, refused if it is newer than this release's: a rollback to an older
    release, whose writes and reads would meet columns, triggers and constraints it does not
    know, and fail on requests, or corrupt the accounts."""
    if current > len(MIGRATIONS):
        raise SchemaTooNew(
            f"its schema is version {current}, newer than this Tollgate's ({len(MIGRATIONS)}): "
            "run the Tollgate release that migrated it, or a later one"
        )
    return current


_IMPLICIT_METADATA = json.dumps({"implicit": True})


def _open_job(
    db: sqlite3.Connection,
    job_id: str,
    team_id: str,
    job_type: str,
    user_id: str | None,
    metadata_json: str,
    default_credits: int,
    now: float,
    expired_before: float,
) -> tuple[int, list[str]]:
    """Insert a pending job holding the team's credits per job; returns the credits held, and
    the ids of the team's jobs past their expiry (created before `expired_before`) failed to
    free them (`_make_room`)."""
    rows = _hold(db, team_id, default_credits)
    made_room: list[str] = []
    if not rows:
        team = _team_in(db, team_id)
        if team.status != "active":
            raise TeamSuspended(f"Team '{team_id}' is suspended")
        needed = team.credits_per_job if team.credits_per_job is not None else default_credits
        made_room = _make_room(db, team_id, needed - team.credits_available, expired_before, now)
        rows = _hold(db, team_id, default_credits) if made_room else []
        if not rows:  # the write's transaction (atomic) undoes any failure made for it
            raise InsufficientCredits(team, needed)
    held = rows[0][0]
    db.execute(
        "INSERT INTO jobs (job_id, team_id, job_type, user_id, status, metadata, created_at, credits_held) "
        "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
        (job_id, team_id, job_type, user_id, metadata_json, now, held),
    )
    db.execute(
        "INSERT INTO credit_holds (job_id, team_id, amount, created_at) VALUES (?, ?, ?, ?)",
        (job_id, team_id, held, now),
    )
    return held, made_room


def _hold(db: sqlite3.Connection, team_id: str, default_credits: int) -> list[Any]:
    """Hold the team's credits per job, if it is active and they are available: [(held,)], else []."""
    return _all(db,
        "UPDATE teams SET credits_held = credits_held + COALESCE(credits_per_job, :default), jobs_made = jobs_made + 1 "
        "WHERE team_id = :team AND status = 'active' "
        "AND credits_allocated - credits_used - credits_held >= COALESCE(credits_per_job, :default) "
        "RETURNING COALESCE(credits_per_job, :default)",
        {"default": default_credits, "team": team_id},
    )


def _make_room(db: sqlite3.Connection, team_id: str, short: int, expired_before: float, now: float) -> list[str]:
    """Fail, as the sweep would, the team's open jobs past their expiry whose holds free the
    `short` credits a new job's hold lacks: the oldest first, none with a call running (the
    sweep waits for it), and none at all unless FAIL_TOGETHER of them free enough. Their
    holds were due back since their expiry; only the sweep's round kept them. Run only for a
    hold refused, so that a job's or a /v1 call's start pays nothing for it otherwise."""
    rows = _all(db,
        # The open jobs' partial index of the team (schema: jobs_team_open), read oldest first.
        "SELECT job_id, credits_held FROM jobs j WHERE team_id = ? AND status IN ('pending', 'in_progress') "
        "AND created_at < ? AND credits_held > 0 "
        "AND NOT EXISTS (SELECT 1 FROM llm_calls c WHERE c.job_id = j.job_id AND c.status = 'running') "
        "ORDER BY created_at LIMIT ?",
        (team_id, expired_before, FAIL_TOGETHER),
    )
    freeing, freed = [], 0
    for job_id, held in rows:
        if freed >= short:
            break
        freeing.append(job_id)
        freed += held
    if freed < short:
        return []
    return [job_id for job_id in freeing if _expire_job_in(db, job_id, now)]


def _finish_call_in(db: sqlite3.Connection, outcome: CallOutcome, over_interrupted: bool) -> bool:
    cursor = db.execute(
        _FINISH_RUNNING_OR_INTERRUPTED_CALL if over_interrupted else _FINISH_RUNNING_CALL,
        (
            outcome.status,
            outcome.model,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            int(outcome.usage_estimated),
            outcome.cost_usd,
            outcome.latency_ms,
            outcome.time_to_first_token_ms,
            outcome.attempts,
            outcome.error,
            outcome.finished_at,
            outcome.call_id,
        ),
    )
    return cursor.rowcount > 0


def _finish_job_in(
    db: sqlite3.Connection,
    job_id: str,
    status: str,
    metadata: dict[str, Any] | None,
    error_message: str | None,
    now: float,
) -> bool:
    """Finish a job inside the caller's transaction: charge or release its hold. False for the
    same terminal status again; JobClosed and CallInProgress are raised before any write."""
    rows = _all(db, "SELECT status, team_id, metadata FROM jobs WHERE job_id = ?", (job_id,))
    if not rows:
        raise NotFound(f"Job '{job_id}' not found")
    current, team_id, stored_metadata = rows[0]
    if current == status:
        return False  # the same terminal status again: same result, no new charge
    if current in TERMINAL_JOB_STATUSES:
        raise JobClosed(job_id, current)
    running = _all(db, "SELECT 1 FROM llm_calls WHERE job_id = ? AND status = 'running' LIMIT 1", (job_id,))
    if running:
        raise CallInProgress(f"Job '{job_id}' has a call still running; complete it after the call ends")
    held_rows = _all(db, "DELETE FROM credit_holds WHERE job_id = ? RETURNING amount", (job_id,))
    held = held_rows[0][0] if held_rows else 0
    charged = held if status == "completed" else 0
    remaining = _all(db,
        "UPDATE teams SET credits_held = credits_held - ?, credits_used = credits_used + ?, updated_at = ?, "
        "jobs_completed = jobs_completed + ?, jobs_failed = jobs_failed + ? "
        "WHERE team_id = ? RETURNING credits_allocated - credits_used",
        (held, charged, now, int(status == "completed"), int(status == "failed"), team_id),
    )
    merged = None
    if metadata:
        merged = json.loads(stored_metadata)
        merged.update(metadata)
    _close_job_in(db, job_id, team_id, status, charged, remaining[0][0], error_message, merged, now)
    return True


def _expire_job_in(db: sqlite3.Connection, job_id: str, now: float) -> bool:
    """Fail an open job past its expiry, as the sweep does; False (nothing written) while a call
    of it still runs, which the sweep waits for too."""
    try:
        return _finish_job_in(db, job_id, "failed", None, EXPIRED_JOB, now)
    except CallInProgress:
        return False


def _charge_interrupted_job_in(db: sqlite3.Connection, job_id: str, error_message: str | None, now: float) -> bool:
    """Charge an own job that a sweep failed as interrupted (releasing its hold) while its
    call's outcome, a charged one, waited in the process that served it; False if it is not
    such a job, or if the team's credits are all used or held by now (it stays failed then)."""
    rows = _all(db,
        "SELECT team_id, credits_held FROM jobs WHERE job_id = ? AND status = 'failed' AND error_message = ? "
        "AND credits_charged = 0",
        (job_id, INTERRUPTED_JOB),
    )
    if not rows:
        return False
    team_id, amount = rows[0]
    remaining = _all(db,
        "UPDATE teams SET credits_used = credits_used + :amount, updated_at = :now, "
        "jobs_completed = jobs_completed + 1, jobs_failed = jobs_failed - 1 "
        "WHERE team_id = :team AND credits_allocated - credits_used - credits_held >= :amount "
        "RETURNING credits_allocated - credits_used",
        {"amount": amount, "now": now, "team": team_id},
    )
    if not remaining:
        return False
    _close_job_in(db, job_id, team_id, "completed", amount, remaining[0][0], error_message, None, now)
    return True


def _close_job_in(
    db: sqlite3.Connection,
    job_id: str,
    team_id: str,
    status: str,
    charged: int,
    balance: int,
    error_message: str | None,
    metadata: dict[str, Any] | None,
    now: float,
) -> None:
    """A finish's last writes, once the team's credits are settled (`balance` is its
    credits_remaining after them): the ledger's entry for the charge, and the job's row
    (`metadata`, when given, replaces the job's)."""
    if charged:
        _ledger_entry(db, team_id, job_id, -charged, f"job {job_id} completed", now, balance_after=balance)
    db.execute(
        "UPDATE jobs SET status = ?, completed_at = ?, metadata = COALESCE(?, metadata), error_message = ?, "
        "credits_charged = ?, credits_remaining_after = ? WHERE job_id = ?",
        (status, now, None if metadata is None else _metadata_text(metadata), error_message, charged,
         balance, job_id),
    )


def _metadata_text(metadata: dict[str, Any]) -> str:
    """A job's metadata as stored, and as written into every page of jobs: the JSON its bound was
    measured as (validation.MAX_METADATA_BYTES: compact UTF-8). json.dumps's own, its escapes of
    up to twelve bytes for a character and its spaces, made the stored and listed text of metadata
    within the bound up to three times as large."""
    return dumps(metadata).decode("utf-8")


def _group(row: sqlite3.Row | tuple) -> ModelGroup:
    return ModelGroup(row[0], tuple(json.loads(row[1])), row[2], row[3], row[4])


def _team_in(db: sqlite3.Connection, team_id: str) -> Team:
    rows = _all(db, f"SELECT {_TEAM_COLUMNS} FROM teams t WHERE t.team_id = ?", (team_id,))
    if not rows:
        raise NotFound(f"Team '{team_id}' not found")
    return _team(rows[0])


# The team's own counts of its jobs (schema 7), for the totals of its job lists by these statuses:
# counting its jobs read each of them, half a second for a team of a million.
_TEAM_JOB_COUNTS = {None: "jobs_made", "completed": "jobs_completed", "failed": "jobs_failed"}
_RECOUNT_JOBS = (  # as schema 7 counted them (see schema.py)
    "UPDATE teams SET (jobs_made, jobs_completed, jobs_failed) = (SELECT COUNT(*), "
    "COUNT(CASE WHEN j.status = 'completed' THEN 1 END), COUNT(CASE WHEN j.status = 'failed' THEN 1 END) "
    "FROM jobs j WHERE j.team_id = teams.team_id)"
)


def _remaining_in(db: sqlite3.Connection, team_id: str) -> int:
    """The team's credits_remaining (0 for a team that does not exist)."""
    rows = _all(db, "SELECT credits_allocated - credits_used FROM teams WHERE team_id = ?", (team_id,))
    return rows[0][0] if rows else 0


def _grant_groups(db: sqlite3.Connection, team_id: str, groups: Iterable[str]) -> None:
    for position, group in enumerate(groups):
        try:
            db.execute(
                "INSERT INTO team_model_groups (team_id, model_group, position) VALUES (?, ?, ?)",
                (team_id, group, position),
            )
        except sqlite3.IntegrityError as exc:
            # The (team, group) key taken already: the list names the group twice.
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise Conflict(f"Model group '{group}' is named twice") from None
            raise NotFound(f"Model group '{group}' not found") from None


def _ledger_entry(
    db: sqlite3.Connection,
    team_id: str,
    job_id: str | None,
    amount: int,
    reason: str,
    now: float,
    balance_after: int | None = None,
) -> None:
    if balance_after is None:
        rows = _all(db,
            "SELECT credits_allocated - credits_used FROM teams WHERE team_id = ?", (team_id,)
        )
        balance_after = rows[0][0]
    db.execute(
        "INSERT INTO credit_ledger (team_id, job_id, amount, reason, balance_after, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (team_id, job_id, amount, reason, balance_after, now),
    )


# A sort or grouping SQLite cannot read off an index (a job list's page) goes to a temporary
# table, in a file of its own opened for it: a process out of descriptors, or a full temporary
# directory, failed the read (SQLITE_CANTOPEN) though the database was fine. Held in memory
# instead: they are a page of jobs at most. Not on the loop's connection, which writes calls:
# there it cost a call's writes 2,000 instructions more (bench/instructions.sh), for nothing.
_TEMP_IN_MEMORY = "PRAGMA temp_store = MEMORY"


def _set_up(connection: sqlite3.Connection, pragmas: Iterable[str], wait: float = 0.0) -> sqlite3.Connection:
    """The connection with its pragmas run; closed if one fails (a file that is not a database
    fails the first), not left to the garbage collector, which Python 3.13 warns of. A pragma
    the database's lock refuses is tried again for up to `wait` seconds: switching a new
    database to WAL while another process does (two starts at once on a file not made yet),
    SQLite refuses at once, never calling the busy handler, since a connection that holds a
    read lock and waits for another's write lock could deadlock with it."""
    deadline = time.monotonic() + wait
    try:
        for pragma in pragmas:
            while True:
                try:
                    connection.execute(pragma)
                    break
                except sqlite3.OperationalError as exc:
                    if not isinstance(busy_or(exc), StoreBusy) or time.monotonic() >= deadline:
                        raise
                time.sleep(0.01)
    except BaseException:
        connection.close()
        raise
    return connection


def _all(db: sqlite3.Connection, sql: str, params: Any = ()) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _same(value: T) -> T:
    return value
