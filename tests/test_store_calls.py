"""Call records in the store: the sweep of calls a dead process left running, and the schema
they live in."""

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from proxy import app as app_module
from proxy import sweeper as sweeper_module
from proxy.app import create_app
from proxy.config import DatabaseConfig, load_config
from proxy.ids import new_id
from proxy.metrics import Metrics
from proxy.records import IMPLICIT_JOB_TYPE, CallOutcome, Job, JobEnd, NewCall, Team
from proxy.store import Forbidden, StoreBusy, StoreError, StoreUnavailable, WrittenThenCancelled
from proxy.store.schema import MIGRATIONS, apply
from proxy.store import sqlite as store_module
from proxy.store.sqlite import SQLiteStore
from proxy.sweeper import sweep_forever, sweep_once
from tests.support import tollgate_config, wait_for
from tests.test_store_concurrency import make_team


def new_call(call_id: str, job_id: str, started_at: float) -> NewCall:
    return NewCall(call_id, job_id, "team", "key", "ChatAgent", None, False, started_at)


def outcome(call_id: str) -> CallOutcome:
    return CallOutcome(call_id, "success", "gpt-4o-mini", 10, 5, False, 0.0, 100, None, 1, None, 1_000.0)


def on_a_team_store(path: Path, check: Callable[[SQLiteStore], Awaitable[None]]) -> None:
    """Run `check` on a new store at `path` holding the team 'team', closed whatever it does."""

    async def run() -> None:
        store = await make_team(str(path))
        try:
            await check(store)
        finally:
            await store.close()

    asyncio.run(run())


async def statuses(store: SQLiteStore, job_id: str) -> dict[str, str]:
    view = await store.job_view(job_id)
    assert view is not None
    return {call.call_id: call.status for call in view[1]}


async def statuses_once(store: SQLiteStore, job_id: str, wanted: dict[str, str], timeout: float = 10.0) -> dict[str, str]:
    """The job's call statuses once they are `wanted`, or as they are at the deadline: a sweeper
    running on a slow machine gets there later than its bound."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (found := await statuses(store, job_id)) != wanted and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return found


async def start_cut(store: SQLiteStore, call: NewCall) -> BaseException:
    """What a call's start raises, cancelled (by the gateway's shutdown) once its write is under way."""
    starting = asyncio.create_task(store.start_call(call))
    await asyncio.sleep(0)  # its write submitted: the cancellation waits for it (writer.py)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError) as cut:
        await starting
    return cut.value


async def an_expired_job(path: Path) -> tuple[SQLiteStore, str]:
    """An open job of the team 'team', and a store (to be closed) opened on it past its expiry."""
    store = await make_team(str(path))
    job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
    await store.close()
    later = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"), clock=lambda: time.time() + 120, expire_after=60.0)
    await later.open()
    return later, job_id


def test_a_database_in_directories_not_made_yet_is_made_with_them(tmp_path):
    # README: database.url's directories are made as the store opens, as a fresh install needs.
    path = tmp_path / "not" / "made" / "yet.db"

    async def check() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        await store.close()

    asyncio.run(check())
    assert path.is_file()


def test_a_start_cut_short_once_written_says_the_call_started(tmp_path):
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        assert isinstance(await start_cut(store, new_call("cut", job_id, time.time())), WrittenThenCancelled)
        assert await statuses(store, job_id) == {"cut": "running"}

    on_a_team_store(tmp_path / "cut.db", check)


def test_a_start_cut_short_in_an_expired_job_says_nothing_was_started(tmp_path):
    # Its write went through, but wrote nothing of the call: taken for a start, the call would
    # be counted and answered with ids of a call that does not exist.
    async def check() -> None:
        later, job_id = await an_expired_job(tmp_path / "cut.db")
        try:
            assert not isinstance(await start_cut(later, new_call("cut", job_id, time.time())), WrittenThenCancelled)
            assert await statuses(later, job_id) == {}
        finally:
            await later.close()

    asyncio.run(check())


def test_a_start_cut_short_while_failing_its_expired_job_says_the_job_failed_now(tmp_path):
    # The job's failure went through: taken for nothing written, it would be failed without
    # being counted as failed, by this start or by the sweep (which finds it closed).
    async def check() -> None:
        later, job_id = await an_expired_job(tmp_path / "cut.db")
        assert later._writer is not None
        submit, submitted = later._writer.submit, asyncio.Event()

        def watched(*args: Any, **kwargs: Any) -> Any:
            write = submit(*args, **kwargs)
            submitted.set()
            return write

        later._writer.submit = watched  # type: ignore[method-assign]
        try:
            starting = asyncio.create_task(later.start_call(new_call("cut", job_id, time.time())))
            await submitted.wait()  # the start's write, which finds the job expired
            submitted.clear()
            await submitted.wait()  # the job's failure
            starting.cancel()
            with pytest.raises(store_module.JobExpired) as refused:
                await starting
            assert refused.value.failed_now
            job = await later.get_job(job_id)
            assert job is not None and job.status == "failed"
        finally:
            await later.close()

    asyncio.run(check())


def test_the_sweep_closes_only_calls_still_running_that_started_before_the_cutoff(tmp_path):
    async def check(store: SQLiteStore) -> None:
        first = (await store.create_job("team", "t", None, {}, 1)).job_id
        second = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("old-running", first, 100.0))
        await store.start_call(new_call("old-finished", first, 100.0))
        await store.finish_call(outcome("old-finished"))
        await store.start_call(new_call("new-running", first, 900.0))
        await store.start_call(new_call("other-job", second, 200.0))

        assert len(await store.cancel_stale_calls(500.0)) == 2

        assert await statuses(store, first) == {
            "old-running": "cancelled", "old-finished": "success", "new-running": "running"
        }
        assert await statuses(store, second) == {"other-job": "cancelled"}

    on_a_team_store(tmp_path / "sweep.db", check)


def test_the_sweep_closes_a_call_recorded_without_a_bound_only_once_stale_call_after_has_passed(tmp_path):
    # Calls written by an earlier release carry no bound of their own: the sweeper's applies.
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("stale", job_id, 430.0))
        await store.start_call(new_call("recent", job_id, 450.0))
        assert await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0) == (0, 1)
        assert await statuses(store, job_id) == {"stale": "cancelled", "recent": "running"}

    on_a_team_store(tmp_path / "unbounded.db", check)


def test_the_sweep_closes_a_call_at_the_bound_its_own_process_set_not_at_the_sweepers(tmp_path):
    # Processes sharing the database may be configured apart (a rolling change of
    # upstream.timeouts.total): the sweeper of the one with the shorter bound closed the other's
    # live calls as interrupted.
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(NewCall("long", job_id, "team", "key", "ChatAgent", None, True, 100.0, 800.0))
        await store.start_call(NewCall("short", job_id, "team", "key", "ChatAgent", None, True, 100.0, 300.0))
        assert len(await store.cancel_stale_calls(started_before=500.0, now=500.0)) == 1
        assert await statuses(store, job_id) == {"long": "running", "short": "cancelled"}
        assert len(await store.cancel_stale_calls(started_before=900.0, now=900.0)) == 1
        assert await statuses(store, job_id) == {"long": "cancelled", "short": "cancelled"}

    on_a_team_store(tmp_path / "bound.db", check)


def database_at(path, version: int, others: tuple[str, ...] = ()) -> sqlite3.Connection:
    """A database migrated as far as `version`, with the team 'team' in it, and `others` (of
    no credits)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    for number, migration in enumerate(MIGRATIONS[:version], start=1):
        apply(db, migration)
        db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (number,))
    db.execute("INSERT INTO organizations VALUES ('org', 'Org', 0)")
    db.execute(
        "INSERT INTO teams (team_id, organization_id, status, credits_allocated, credits_held, created_at, "
        "updated_at) VALUES ('team', 'org', 'active', 10, 1, 0, 0)"
    )
    for team_id in others:
        db.execute(
            "INSERT INTO teams (team_id, organization_id, status, credits_allocated, created_at, updated_at) "
            "VALUES (?, 'org', 'active', 0, 0, 0)", (team_id,)
        )
    return db


def add_job(db: sqlite3.Connection, job_id: str, team_id: str, status: str, created_at: float) -> None:
    """A job written straight into the database, holding no credits."""
    db.execute(
        "INSERT INTO jobs (job_id, team_id, job_type, status, created_at, credits_held) VALUES (?, ?, 't', ?, ?, 0)",
        (job_id, team_id, status, created_at),
    )


@pytest.mark.parametrize("status", ["pending", "in_progress"])
def test_a_teams_open_jobs_are_listed_through_an_index_of_its_open_jobs_alone(tmp_path, status):
    # Through the team's index of all its jobs, a team with a million finished ones took half a
    # second a page (and as long for its count), holding the connection every team's lists share.
    async def check(store: SQLiteStore) -> None:
        jobs = [(await store.create_job("team", "t", None, {}, 0)).job_id for _ in range(3)]
        await store.start_call(new_call("running", jobs[1], time.time()))
        await store.finish_job(jobs[2], "completed", None, None)
        assert store._listing is not None
        read: list[str] = []
        store._listing.set_trace_callback(read.append)
        page, total, _ = await store.team_jobs("team", status, 50, 0)
        store._listing.set_trace_callback(None)
        assert [job.job_id for job in page] == [jobs[0] if status == "pending" else jobs[1]] and total == 1
        of_jobs = [sql for sql in read if "FROM jobs j WHERE" in sql]
        assert len(of_jobs) == 2
        for sql in of_jobs:
            plan = " ".join(row[3] for row in store._listing.execute("EXPLAIN QUERY PLAN " + sql))
            assert "USING INDEX jobs_team_open " in plan, (sql, plan)

    on_a_team_store(tmp_path / "open.db", check)


def test_a_schema_2_database_upgrades_with_its_running_calls_still_swept(tmp_path):
    path = tmp_path / "v2.db"
    db = database_at(path, 2)
    db.execute(
        "INSERT INTO jobs (job_id, team_id, job_type, status, created_at, credits_held) "
        "VALUES ('job', 'team', 't', 'in_progress', 0, 1)"
    )
    db.execute(
        "INSERT INTO llm_calls (call_id, job_id, team_id, model_group, streamed, status, started_at) "
        "VALUES ('left-running', 'job', 'team', 'ChatAgent', 0, 'running', 100)"
    )
    db.close()

    async def check() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        assert await store.schema_version() == len(MIGRATIONS)
        assert len(await store.cancel_stale_calls(500.0)) == 1
        assert await statuses(store, "job") == {"left-running": "cancelled"}
        await store.close()

    asyncio.run(check())
    indexes = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "llm_calls_running" not in indexes and "llm_calls_job" in indexes


def test_a_schema_3_database_upgrades_with_every_call_kept_as_it_was(tmp_path):
    path = tmp_path / "v3.db"
    db = database_at(path, 3)
    for job_id, status in (("done", "in_progress"), ("fresh", "pending")):
        add_job(db, job_id, "team", status, 0)
    db.execute(
        "INSERT INTO llm_calls VALUES ('finished', 'done', 'team', 'key', 'ChatAgent', 'gpt-4o-mini', 'plan', 1, "
        "'success', 10, 5, 1, 0.25, 120, 40, 2, NULL, 100, 101)"
    )
    db.execute(
        "INSERT INTO llm_calls (call_id, job_id, team_id, model_group, streamed, status, started_at) "
        "VALUES ('running', 'done', 'team', 'ChatAgent', 0, 'running', 102)"
    )
    before = db.execute("SELECT * FROM llm_calls ORDER BY call_id").fetchall()
    db.close()

    async def upgrade() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        assert await store.schema_version() == len(MIGRATIONS)
        await store.start_call(new_call("new", "fresh", 200.0))  # the trigger still opens a pending job
        await store.close()

    asyncio.run(upgrade())
    db = sqlite3.connect(path, isolation_level=None)
    after = db.execute("SELECT * FROM llm_calls WHERE call_id != 'new' ORDER BY call_id").fetchall()
    assert [row[:-1] for row in after] == before and [row[-1] for row in after] == [None, None]  # stale_at: schema 5
    assert db.execute("SELECT status FROM jobs WHERE job_id = 'fresh'").fetchone() == ("in_progress",)
    assert {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'llm_calls'")} == {
        "llm_calls", "sqlite_autoindex_llm_calls_1", "llm_calls_job", "llm_calls_start_job"
    }
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute("UPDATE llm_calls SET status = 'lost' WHERE call_id = 'running'")


def test_a_migrations_last_statement_without_its_semicolon_is_applied_not_skipped():
    # A statement is only complete at its semicolon: the last one of a script without it was
    # dropped, and the migration recorded as applied without its change.
    db = sqlite3.connect(":memory:", isolation_level=None)
    apply(db, "CREATE TABLE t (x INTEGER);\nALTER TABLE t ADD COLUMN y INTEGER NOT NULL DEFAULT 0")
    assert [row[1] for row in db.execute("PRAGMA table_info(t)")] == ["x", "y"]


def test_a_migration_cut_short_leaves_the_database_as_it_was_and_the_next_start_migrates_it(tmp_path, monkeypatch):
    # A process killed as it migrates: the migrations run in one transaction, so the database
    # holds all of them or none, and nothing of a team's figures or its calls is half changed.
    path = tmp_path / "v3.db"
    db = database_at(path, 3)
    add_job(db, "done", "team", "completed", 0)
    db.execute(
        "INSERT INTO llm_calls (call_id, job_id, team_id, model_group, streamed, status, started_at) "
        "VALUES ('call', 'done', 'team', 'ChatAgent', 0, 'success', 100)"
    )
    db.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        before = db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()

    def killed(db: sqlite3.Connection) -> None:
        apply(db, "ALTER TABLE teams ADD COLUMN jobs_made INTEGER NOT NULL DEFAULT 0;")
        raise KeyboardInterrupt  # as a signal stops the process, after migrations 4 to 6

    async def start() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            assert await store.schema_version() == len(MIGRATIONS)
            assert await listed_totals(store, "team") == counted_totals(path, "team")
            view = await store.job_view("done")
            assert view is not None and [call.status for call in view[1]] == ["success"]
        finally:
            await store.close()

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS[:-1], killed])
    with pytest.raises(StoreError, match="KeyboardInterrupt"):
        asyncio.run(start())
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (3,)
        assert db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before
    monkeypatch.undo()
    asyncio.run(start())


def test_a_calls_status_is_checked_without_building_a_temporary_index_for_each_write(tmp_path):
    # An IN list of more than two constants is checked through an index SQLite builds for
    # every row written; a call writes its row twice. The connection that migrated the
    # database writes the calls from then on: it must not keep the schema it read before.
    def program(db: sqlite3.Connection) -> set[str]:
        explained = db.execute("EXPLAIN UPDATE llm_calls SET status = ? WHERE call_id = ?", ("success", "c"))
        return {row[1] for row in explained}

    database_at(tmp_path / "s.db", 3).close()  # read by the store before it migrates it

    async def writers_program() -> set[str]:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path}/s.db"))
        await store.open()
        try:
            return await store._writer.submit(program)
        finally:
            await store.close()

    assert "OpenEphemeral" not in asyncio.run(writers_program())
    assert "OpenEphemeral" not in program(sqlite3.connect(tmp_path / "s.db"))


def test_the_sweep_fails_the_own_job_of_a_v1_call_it_closed_as_interrupted(tmp_path):
    # Its client may know nothing of jobs: left open, it held its credit until it expired.
    async def check() -> None:
        store = await make_team(str(tmp_path / "implicit.db"))
        own = (await store.create_job("team", IMPLICIT_JOB_TYPE, None, {"implicit": True}, 1)).job_id
        answered = (await store.create_job("team", IMPLICIT_JOB_TYPE, None, {"implicit": True}, 1)).job_id
        await store.start_call(new_call("cut-by-a-crash", own, 100.0))
        await store.start_call(new_call("recorded-not-yet-charged", answered, 100.0))
        await store.finish_call(outcome("recorded-not-yet-charged"))
        try:
            await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0)

            assert (await store.get_job(own)).status == "failed"
            assert (await store.get_job(answered)).status == "in_progress"  # its own process charges it
            team = await store.get_team("team")
            assert team is not None and team.credits_held == 1
        finally:
            await store.close()  # left open, its writer thread keeps the test process alive

    asyncio.run(check())


def test_the_sweep_fails_the_own_job_of_a_v1_call_another_processs_sweep_closed_as_interrupted(tmp_path):
    # That sweeper may have stopped (its process ended) between closing the call and failing
    # the job: every sweep looks for such jobs, not only one that closed calls itself.
    async def check(store: SQLiteStore) -> None:
        own = (await store.create_job("team", IMPLICIT_JOB_TYPE, None, {"implicit": True}, 1)).job_id
        await store.start_call(new_call("cut-by-a-crash", own, 100.0))
        assert len(await store.cancel_stale_calls(500.0)) == 1  # the other process's sweep, no further
        assert await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0) == (0, 0)
        assert (await store.get_job(own)).status == "failed"

    on_a_team_store(tmp_path / "implicit.db", check)


def test_the_sweep_counts_the_calls_it_closes_as_interrupted_among_the_calls_metric(tmp_path):
    # The process that served them died before they ended, and its counts of them with it:
    # tollgate_llm_calls_total fell short of the calls recorded after every crash.
    async def check() -> dict[tuple[str, ...], float]:
        store = await make_team(str(tmp_path / "counted.db"))
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("cut-by-a-crash", job_id, 100.0))
        await store.start_call(new_call("still-running", job_id, 900.0))
        metrics = Metrics()
        try:
            await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0, metrics=metrics)
            text = (await metrics.render(store.team_balances)).decode()
        finally:
            await store.close()
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "tollgate_llm_calls"]
        return {
            tuple(s.labels[name] for name in ("team", "model_group", "model", "status", "stream")): s.value
            for s in family.samples if s.name == "tollgate_llm_calls_total"
        }

    assert asyncio.run(check()) == {("team", "ChatAgent", "none", "cancelled", "false"): 1.0}


def test_the_sweep_counts_the_jobs_it_fails_as_expired_among_failed_jobs(tmp_path):
    async def check() -> dict[tuple[str, ...], float]:
        store = await make_team(str(tmp_path / "expired.db"))
        await store.create_job("team", "t", None, {}, 1)
        metrics = Metrics()
        try:
            await sweep_once(store, expire_after=60, stale_call_after=60, now=time.time() + 120, metrics=metrics)
            text = (await metrics.render(store.team_balances)).decode()
        finally:
            await store.close()
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "tollgate_jobs"]
        return {(s.labels["team"], s.labels["status"]): s.value for s in family.samples if s.name == "tollgate_jobs_total"}

    assert asyncio.run(check()) == {("team", "failed"): 1.0}


def a_gateway_sweeping_ahead(
    tmp_path: Path, fake_url: str, monkeypatch: pytest.MonkeyPatch, ahead: Callable[[], float]
) -> tuple[Path, Any]:
    """A gateway's database and config (jobs expire after an hour), its sweeper running every
    50 ms on a wall clock `ahead()` seconds ahead of the real one."""
    database = tmp_path / "gateway.db"
    config_path = tmp_path / "config.yaml"
    jobs = {"sweep_interval": "50ms", "expire_after": "1h"}
    config_path.write_text(yaml.safe_dump(tollgate_config(database, upstream={"url": fake_url}, jobs=jobs)))
    sweeping = sweeper_module.sweep_forever
    monkeypatch.setattr(
        app_module, "sweep_forever", lambda *a, **k: sweeping(*a, clock=lambda: time.time() + ahead(), **k)
    )
    return database, load_config(str(config_path), env={})


def jobs_counted(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """What tollgate_jobs_total is counted up by from here, by (team, status)."""
    counted: Counter[tuple[str, str]] = Counter()

    def observe_jobs(self: Metrics, team_id: str, status: str, count: int = 1) -> None:
        counted[team_id, status] += count

    monkeypatch.setattr(Metrics, "observe_job", observe_jobs)
    monkeypatch.setattr(Metrics, "observe_jobs", observe_jobs)
    return counted


def test_a_job_the_sweep_fails_as_the_gateway_stops_is_counted_among_failed_jobs(
    tmp_path: Path, fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop cancelled the sweeper in the middle of its run: the job it was failing as expired
    # (its write waiting on another process's lock) was failed, its hold released, and never
    # counted in tollgate_jobs_total (one failed job in 46 stops of a worker under load).
    ahead = [0.0]  # the sweeper's wall clock, moved past the job's expiry once the lock is held
    database, config = a_gateway_sweeping_ahead(tmp_path, fake_url, monkeypatch, lambda: ahead[0])
    counted = jobs_counted(monkeypatch)
    failing: list[str] = []
    finish_job = SQLiteStore.finish_job

    async def finishing(self: SQLiteStore, job_id: str, *args: Any, **kwargs: Any) -> Any:
        failing.append(job_id)
        return await finish_job(self, job_id, *args, **kwargs)

    monkeypatch.setattr(SQLiteStore, "finish_job", finishing)

    async def open_job(store: SQLiteStore) -> None:
        await store.create_job("team", "t", None, {}, 1)

    on_a_team_store(database, open_job)
    with contextlib.closing(sqlite3.connect(database, isolation_level=None, check_same_thread=False)) as lock:
        with TestClient(create_app(config)):
            lock.execute("BEGIN IMMEDIATE")
            ahead[0] = 7200.0
            assert wait_for(lambda: failing, timeout=10)  # a run found the job expired; its write waits for the lock
            threading.Timer(1.0, lambda: lock.execute("COMMIT")).start()
        # The gateway has stopped (the lock let go meanwhile).
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT status FROM jobs").fetchall() == [("failed",)]
    assert counted == Counter({("team", "failed"): 1})


def test_a_stop_during_a_long_sweep_ends_it_between_batches_and_counts_every_job_it_failed(
    tmp_path: Path, fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start after a long outage finds thousands of jobs expired, failed batch after batch in
    # one run (about 470 a second). A stop meanwhile let the run go on through every batch until
    # the drain's time was up, then cancelled it half-way: the jobs of the batch under way were
    # failed, their holds released, and never counted in tollgate_jobs_total.
    database, config = a_gateway_sweeping_ahead(tmp_path, fake_url, monkeypatch, lambda: 7200.0)
    monkeypatch.setattr(sweeper_module, "BATCH", 2)
    monkeypatch.setattr(app_module, "DRAIN_TIMEOUT", 1.0)
    counted = jobs_counted(monkeypatch)
    finish_job = SQLiteStore.finish_job

    async def finishing_slowly(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        finished = await finish_job(self, *args, **kwargs)
        await asyncio.sleep(0.2)  # written: a slow disk's fsync, say
        return finished

    monkeypatch.setattr(SQLiteStore, "finish_job", finishing_slowly)

    async def open_jobs(store: SQLiteStore) -> None:
        for _ in range(40):
            await store.create_job("team", "t", None, {}, 1)

    on_a_team_store(database, open_jobs)

    def failed() -> int:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'failed'").fetchone()[0]

    with TestClient(create_app(config)):
        assert wait_for(lambda: failed() >= 2, timeout=10)  # the run is under way
    assert 0 < failed() < 40  # the stop ended the run; the next sweep fails the rest
    assert counted == Counter({("team", "failed"): failed()})


def a_long_and_a_short_history(path: Path) -> None:
    """A database holding the teams 'team', of 100 jobs, and 'big', of 4,000, completed and
    failed in turn (the newest failed), of two calls each: written as schema 6 wrote them, to be
    counted as the store migrates the database."""
    db = database_at(path, 6, others=("big",))
    db.execute("BEGIN")
    for team, count in (("team", 100), ("big", 4_000)):
        for n in range(count):
            job_id = f"{team}-{n:05}"
            add_job(db, job_id, team, ("completed", "failed")[n % 2], float(n))
            for call in range(2):
                db.execute(
                    "INSERT INTO llm_calls (call_id, job_id, team_id, model_group, streamed, status, started_at) "
                    "VALUES (?, ?, ?, 'ChatAgent', 0, 'success', ?)", (f"{job_id}-{call}", job_id, team, float(n))
                )
    db.execute("COMMIT")
    db.close()


def steps_of_pages(path: Path, status: str | None, offset: int) -> dict[str, tuple[int, list[Job], int]]:
    """For each team of `a_long_and_a_short_history`, a page of 20 of its jobs from `offset`: how
    many steps of 100 SQLite instructions it took, its jobs and its total."""

    async def steps(store: SQLiteStore, team: str) -> tuple[int, list[Job], int]:
        count = [0]

        def step() -> int:
            count[0] += 1
            return 0

        # A page is read on its connection of reads that must agree (with the team's balance).
        assert store._listing is not None
        store._listing.set_progress_handler(step, 100)
        jobs, total, _ = await store.team_jobs(team, status, 20, offset)
        store._listing.set_progress_handler(None, 100)
        return count[0], jobs, total

    async def pages() -> dict[str, tuple[int, list[Job], int]]:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            return {team: await steps(store, team) for team in ("team", "big")}
        finally:
            await store.close()

    return asyncio.run(pages())


@pytest.mark.parametrize("status", [None, "completed", "failed"])
def test_a_page_of_a_teams_jobs_reads_no_more_of_a_long_history_than_of_a_short_one(tmp_path, status):
    # A listing asks for one page; summing and sorting every job the team ever had for it
    # grew with the team's history, on the connection that job and page reads take one at a time.
    # So did the page's total, counted from the team's jobs: half a second for a million.
    a_long_and_a_short_history(tmp_path / "jobs.db")
    pages = steps_of_pages(tmp_path / "jobs.db", status, 0)
    for team, count in (("team", 100), ("big", 4_000)):
        _, jobs, total = pages[team]
        assert total == (count if status is None else count // 2)
        assert len(jobs) == 20 and jobs[0].costs.total_calls == 2
        assert jobs[0].job_id == f"{team}-{count - (2 if status == 'completed' else 1):05}"
    assert pages["big"][0] - pages["team"][0] < 3_900 / 100  # less than a step for every hundred jobs more


@pytest.mark.parametrize("status", [None, "completed", "failed"])
def test_a_page_past_the_last_of_a_teams_jobs_reads_none_of_them(tmp_path, status):
    # Skipped to, every job before the offset was read: a page past the end of a team's million
    # failed ones took 0.6 s to come back empty.
    a_long_and_a_short_history(tmp_path / "jobs.db")
    pages = steps_of_pages(tmp_path / "jobs.db", status, 4_000)
    assert [jobs for _, jobs, _ in pages.values()] == [[], []]
    assert pages["big"][0] - pages["team"][0] < 3_900 / 100


LISTED_STATUSES = (None, "pending", "in_progress", "completed", "failed")


async def listed_totals(store: SQLiteStore, team: str = "team") -> dict[str | None, int]:
    """The totals a team's job lists give, by the status they are filtered by (None: all)."""
    return {status: (await store.team_jobs(team, status, 1, 0))[1] for status in LISTED_STATUSES}


def counted_totals(path: Path, team: str = "team") -> dict[str | None, int]:
    """The same, counted from the team's jobs."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        counts = dict(db.execute("SELECT status, COUNT(*) FROM jobs WHERE team_id = ? GROUP BY status", (team,)))
    return {status: sum(counts.values()) if status is None else counts.get(status, 0) for status in LISTED_STATUSES}


def test_a_teams_job_totals_follow_every_way_a_job_is_made_and_ends(tmp_path):
    path = tmp_path / "totals.db"

    async def check(store: SQLiteStore) -> None:
        made = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(4)]
        await store.finish_job(made[0], "completed", None, None)
        await store.finish_job(made[1], "failed", None, "gave up")
        await store.finish_job(made[1], "failed", None, "gave up")  # again: no change
        await store.start_call(new_call("in-job", made[2], time.time()))
        # /v1 calls' own jobs: made with their call, ended with its outcome.
        for call_id, status in (("own-done", "completed"), ("own-failed", "failed")):
            own = new_id()
            await store.start_call(new_call(call_id, own, time.time()), own_job_default_credits=1)
            await store.finish_call_and_job(outcome(call_id), JobEnd(own, status, None))
        # One failed by a sweep as interrupted, then charged by its call's kept outcome.
        interrupted = await own_job_failed_as_interrupted(store)
        assert await listed_totals(store) == counted_totals(path)
        assert await kept_outcome_written(store, interrupted) == (True, True)
        assert await listed_totals(store) == counted_totals(path)
        # What is left open, failed as expired.
        await store.finish_call(outcome("in-job"))
        assert len(await store.expire_jobs(time.time() + 60, 10)) == 2
        assert await listed_totals(store) == counted_totals(path) == {
            None: 7, "pending": 0, "in_progress": 0, "completed": 3, "failed": 4,
        }

    on_a_team_store(path, check)


def test_a_job_refused_for_want_of_credits_is_not_among_the_teams_jobs(tmp_path):
    path = tmp_path / "refused.db"

    async def check(store: SQLiteStore) -> None:
        await store.add_credits("team", -998, "leave two")
        made = await asyncio.gather(*(store.create_job("team", "t", None, {}, 1) for _ in range(5)), return_exceptions=True)
        assert sum(isinstance(job, store_module.InsufficientCredits) for job in made) == 3
        assert await listed_totals(store) == counted_totals(path)
        assert (await listed_totals(store))[None] == 2

    on_a_team_store(path, check)


def test_a_job_failed_as_expired_by_the_call_it_refuses_is_among_the_teams_failed_jobs(tmp_path):
    async def check() -> None:
        later, job_id = await an_expired_job(tmp_path / "expired.db")
        try:
            with pytest.raises(store_module.JobExpired):
                await later.start_call(new_call("late", job_id, time.time()))
            assert await listed_totals(later) == counted_totals(tmp_path / "expired.db")
            assert (await listed_totals(later))["failed"] == 1
        finally:
            await later.close()

    asyncio.run(check())


def test_a_schema_6_database_upgrades_with_its_teams_job_totals_counted(tmp_path):
    path = tmp_path / "v6.db"
    db = database_at(path, 6, others=("other",))
    for n, (team, status) in enumerate(
        [("team", "pending"), ("team", "in_progress"), ("team", "completed"), ("team", "completed"),
         ("team", "failed"), ("other", "completed")]
    ):
        add_job(db, f"job-{n}", team, status, float(n))
    db.close()

    async def check() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            assert await store.schema_version() == len(MIGRATIONS)
            for team in ("team", "other"):
                assert await listed_totals(store, team) == counted_totals(path, team)
            assert (await listed_totals(store))[None] == 5
        finally:
            await store.close()

    asyncio.run(check())


def jobs_of_an_earlier_release(path: Path, team: str, count: int, created_at: float = 0.0) -> list[str]:
    """Jobs made as a release before schema 7, still running beside this one during a rolling
    restart, makes them: held for, and left out of the team's job totals it does not know of."""
    ids = [f"{team}-earlier-{n}" for n in range(count)]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for n, job_id in enumerate(ids):
            add_job(db, job_id, team, "pending", created_at + n)
            db.execute("INSERT INTO credit_holds VALUES (?, ?, 0, ?)", (job_id, team, created_at + n))
    return ids


def test_a_team_whose_jobs_an_earlier_release_made_alone_lists_them_all(tmp_path):
    # Its total stayed 0, and a page from 0 was taken for one past the end: the team's list was
    # empty, and stayed so, though the job views and the ledger showed its jobs.
    path = tmp_path / "earlier.db"

    async def check(store: SQLiteStore) -> None:
        earlier = jobs_of_an_earlier_release(path, "team", 3)
        page, total, _ = await store.team_jobs("team", None, 50, 0)
        assert sorted(job.job_id for job in page) == sorted(earlier) and total == 3

    on_a_team_store(path, check)


def test_paging_a_teams_jobs_by_their_total_reaches_the_jobs_an_earlier_release_made(tmp_path):
    # The total, short of the jobs an earlier release made, ended the paging before the last of them.
    path = tmp_path / "earlier.db"

    async def check(store: SQLiteStore) -> None:
        earlier = jobs_of_an_earlier_release(path, "team", 2)
        made = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(4)]
        seen: list[str] = []
        offset, total = 0, 1
        while offset < total:
            page, total, _ = await store.team_jobs("team", None, 2, offset)
            seen += [job.job_id for job in page]
            offset += 2
        assert sorted(seen) == sorted(earlier + made) and total == 6

    on_a_team_store(path, check)


def test_a_teams_job_totals_are_counted_again_once_a_page_finds_jobs_an_earlier_release_left_out(tmp_path):
    path = tmp_path / "earlier.db"

    async def check(store: SQLiteStore) -> None:
        made = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(2)]
        earlier = jobs_of_an_earlier_release(path, "team", 2)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            # Ended by the earlier release too: one of its own, one of this one's.
            db.execute("UPDATE jobs SET status = 'completed' WHERE job_id IN (?, ?)", (earlier[0], made[0]))
        await store.team_jobs("team", None, 50, 0)
        assert await listed_totals(store) == counted_totals(path)

    on_a_team_store(path, check)


def test_a_page_of_a_teams_completed_jobs_past_their_total_gives_their_total_counted_again(tmp_path):
    path = tmp_path / "earlier.db"

    async def check(store: SQLiteStore) -> None:
        made = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(3)]
        await store.finish_job(made[0], "completed", None, None)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            # Ended by an earlier release beside this one, which leaves them out of the total.
            db.execute("UPDATE jobs SET status = 'completed' WHERE job_id IN (?, ?)", (made[1], made[2]))
        page, total, _ = await store.team_jobs("team", "completed", 50, 0)
        assert len(page) == 3 and total == 3

    on_a_team_store(path, check)


def test_a_page_that_finds_jobs_past_its_total_is_listed_while_another_process_holds_the_write_lock(tmp_path):
    # Counting the totals again is a write: waiting on another process's write lock (a long
    # migration, a backup's), the listing, a read that needs no lock, failed with the busy
    # database's 503 after database.busy_timeout, where it had listed the page.
    path = tmp_path / "earlier.db"

    async def check() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}", busy_timeout=0.5))
        await store.open()
        await store.create_organization("org", "Org")
        await store.create_team(Team("team", "org", "active", 1000, 0, 0, (), None, None, None, None, time.time()), "initial")
        earlier = jobs_of_an_earlier_release(path, "team", 2)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            try:
                page, total, _ = await store.team_jobs("team", None, 50, 0)
            finally:
                other.execute("ROLLBACK")
                await store.close()
        assert sorted(job.job_id for job in page) == sorted(earlier) and total == 2

    asyncio.run(check())


def test_a_job_view_does_not_wait_for_a_page_of_another_teams_jobs(tmp_path, monkeypatch):
    # A page of a team with a million jobs reads for half a second or more (skipping to a deep
    # page, filtering by a rare status): on the connection job views were read on one at a
    # time, every team's GET of a job and every completion waited behind it.
    reading, release = threading.Event(), threading.Event()
    read = store_module._all

    def held_while_reading(db: sqlite3.Connection, sql: str, params=()):
        if "LIMIT ? OFFSET ?" in sql:  # the page's jobs
            reading.set()
            release.wait(10)
        return read(db, sql, params)

    async def check() -> None:
        store = await make_team(str(tmp_path / "views.db"))
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        monkeypatch.setattr(store_module, "_all", held_while_reading)
        page = asyncio.ensure_future(store.team_jobs("team", None, 50, 0))
        try:
            assert await asyncio.to_thread(reading.wait, 10)
            view = await asyncio.wait_for(store.job_view(job_id), 5)
            assert view is not None and view[0].job_id == job_id
        finally:
            release.set()
            await page
            await store.close()

    asyncio.run(check())


def test_the_sweeps_write_does_not_read_the_finished_calls_of_open_jobs(tmp_path):
    # Writes run on the event loop. Finding the running calls through the open jobs read every
    # call those jobs ever made there: long jobs of a thousand calls each, a few hundred open,
    # held the loop (every request and stream of the process) a quarter of a second a sweep.
    db = database_at(tmp_path / "sweep.db", len(MIGRATIONS))
    db.execute("BEGIN")
    for job_id in ("quiet", "busy"):
        add_job(db, job_id, "team", "in_progress", 0)
        db.execute(
            "INSERT INTO llm_calls (call_id, job_id, team_id, model_group, streamed, status, started_at) "
            "VALUES (?, ?, 'team', 'ChatAgent', 0, 'running', 100)", (f"{job_id}-left-running", job_id)
        )
    for n in range(5_000):
        db.execute(
            "INSERT INTO llm_calls (call_id, job_id, team_id, model_group, streamed, status, started_at) "
            "VALUES (?, 'busy', 'team', 'ChatAgent', 0, 'success', 50)", (f"busy-{n:05}",)
        )
    db.execute("COMMIT")
    db.close()

    async def check() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path}/sweep.db"))
        await store.open()
        count = [0]

        def step() -> int:
            count[0] += 1
            return 0

        loop_db = store._writer._loop_db
        assert loop_db is not None
        loop_db.set_progress_handler(step, 100)  # every 100 SQLite instructions
        try:
            assert len(await store.cancel_stale_calls(500.0)) == 2
            assert await statuses(store, "busy") == {
                **{f"busy-{n:05}": "success" for n in range(5_000)}, "busy-left-running": "cancelled"
            }
        finally:
            loop_db.set_progress_handler(None, 100)
            await store.close()
        # Reading the 5,000 finished calls takes several instructions each: fewer than one each in all.
        assert count[0] * 100 < 5_000

    asyncio.run(check())


def test_a_key_lookup_does_not_wait_for_the_sweeps_search_for_stale_calls(tmp_path):
    # The search reads every call of the open jobs (300 of 1,000 calls each: a quarter of a
    # second): on the reader, every key lookup and readiness probe of the process waited behind it.
    searching, release = threading.Event(), threading.Event()

    def held_while_searching() -> tuple[Callable[[str], None], Callable[[], int]]:
        """A connection's trace callback and progress handler that hold the search as it runs."""
        statement = [""]

        def progress() -> int:
            if statement[0].startswith("SELECT call_id FROM llm_calls"):
                searching.set()
                release.wait(10)
            return 0

        return lambda sql: statement.__setitem__(0, sql), progress

    async def check() -> None:
        store = await make_team(str(tmp_path / "search.db"))
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("left-running", job_id, 100.0))
        assert store._reader is not None and store._together is not None and store._listing is not None
        trace, progress = held_while_searching()
        await store._reader.set_trace_callback(trace)
        await store._reader.set_progress_handler(progress, 10)
        for db in (store._together, store._listing):
            trace, progress = held_while_searching()
            db.set_trace_callback(trace)
            db.set_progress_handler(progress, 10)
        sweep = asyncio.ensure_future(store.cancel_stale_calls(500.0))
        try:
            assert await asyncio.to_thread(searching.wait, 10)
            assert await asyncio.wait_for(store.lookup_key(b"no such key"), 5) is None
        finally:
            release.set()
            assert len(await sweep) == 1
            await store.close()

    asyncio.run(check())


async def own_job_failed_as_interrupted(store: SQLiteStore) -> str:
    """The own job of a streamed /v1 call whose outcome this process kept, failed uncharged (its
    hold released) by another process's sweep as it closed the call as interrupted: its id."""
    job = new_id()
    await store.start_call(new_call("streamed", job, 100.0), own_job_default_credits=1)
    await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0)  # the other worker's
    return job


async def kept_outcome_written(store: SQLiteStore, job: str) -> tuple[bool, bool]:
    """The stream's kept outcome written at last, over its call's interrupted close, its own job
    `job` ending completed (its client had the answer): whether recorded, whether the job ended."""
    return await store.finish_call_and_job(outcome("streamed"), JobEnd(job, "completed", None), over_interrupted=True)


def test_a_kept_stream_outcome_charges_its_own_job_though_another_processs_sweep_failed_it_as_interrupted(tmp_path):
    # With several workers, another one's sweeper may close a call whose outcome this process
    # kept (the store refused it) and, in the same pass, fail the call's own job uncharged. The
    # kept outcome of a stream, whose client had the answer, ends its job charged: written over
    # the interrupted close, it must charge the job too, not leave it failed for free.
    async def check(store: SQLiteStore) -> None:
        job = await own_job_failed_as_interrupted(store)
        assert (await store.get_job(job)).status == "failed"

        assert await kept_outcome_written(store, job) == (True, True)
        charged = await store.get_job(job)
        assert (charged.status, charged.credits_charged, charged.error_message) == ("completed", 1, None)
        team = await store.get_team("team")
        assert (team.credits_used, team.credits_held) == (1, 0)
        assert await store.ledger_sum("team") == team.credits_remaining
        # Written again (the shutdown's second try), it charges nothing more.
        assert await kept_outcome_written(store, job) == (False, False)
        assert (await store.get_team("team")).credits_used == 1

    on_a_team_store(tmp_path / "kept.db", check)


def test_a_kept_stream_outcome_leaves_its_interrupted_own_job_failed_when_the_team_cannot_pay_for_it_any_more(tmp_path):
    # The sweep released the job's hold; the credits it freed may be held or used by now, and
    # a balance is never spent twice (the teams table's check would refuse the write).
    async def check(store: SQLiteStore) -> None:
        job = await own_job_failed_as_interrupted(store)
        await store.create_job("team", "t", None, {}, 1000)  # holds all the team has
        assert await kept_outcome_written(store, job) == (True, False)
        assert (await store.get_job(job)).status == "failed"
        team = await store.get_team("team")
        assert (team.credits_used, team.credits_held) == (0, 1000)

    on_a_team_store(tmp_path / "kept.db", check)  # 1,000 credits


def test_a_jobs_total_cost_is_the_exact_sum_of_its_calls_costs_however_many_calls_it_has(tmp_path):
    # Summed in plain floating point (SQLite before 3.43 adds without compensation), the error of
    # each addition piled up: a thousand calls of $0.10 came to $99.999999999999, not $100, though
    # costs are documented to be exact to 1e-12 USD.
    async def check(store: SQLiteStore) -> None:
        job = (await store.create_job("team", "t", None, {}, 1)).job_id
        for n in range(1_000):
            call_id = f"call-{n:04}"
            await store.start_call(new_call(call_id, job, 100.0))
            await store.finish_call(
                CallOutcome(call_id, "success", "m", 10, 5, False, 0.1, 100, None, 1, None, 1_000.0)
            )
        view = await store.job_view(job)
        assert view is not None and view[0].costs.total_cost_usd == 100.0
        jobs, _, _ = await store.team_jobs("team", None, 10, 0)
        assert jobs[0].costs.total_cost_usd == 100.0

    on_a_team_store(tmp_path / "costs.db", check)


def test_a_jobs_costs_count_its_cancelled_calls_among_its_failed_calls(tmp_path):
    async def check(store: SQLiteStore) -> None:
        job = (await store.create_job("team", "t", None, {}, 1)).job_id
        for call_id, status in (("ok", "success"), ("bad", "error"), ("gone", "cancelled")):
            await store.start_call(new_call(call_id, job, 100.0))
            await store.finish_call(CallOutcome(call_id, status, "m", 10, 5, False, 0.1, 100, None, 1, None, 1_000.0))
        view = await store.job_view(job)
        assert view is not None
        costs = view[0].costs
        assert (costs.total_calls, costs.successful_calls, costs.failed_calls) == (3, 1, 2)

    on_a_team_store(tmp_path / "costs.db", check)


def test_a_jobs_avg_latency_is_the_mean_of_its_calls_latencies(tmp_path):
    async def check(store: SQLiteStore) -> None:
        job = (await store.create_job("team", "t", None, {}, 1)).job_id
        for call_id, latency_ms in (("fast", 100), ("slow", 300)):
            await store.start_call(new_call(call_id, job, 100.0))
            await store.finish_call(
                CallOutcome(call_id, "success", "m", 10, 5, False, 0.1, latency_ms, None, 1, None, 1_000.0)
            )
        view = await store.job_view(job)
        assert view is not None and view[0].costs.avg_latency_ms == 200
        jobs, _, _ = await store.team_jobs("team", None, 10, 0)
        assert jobs[0].costs.avg_latency_ms == 200

    on_a_team_store(tmp_path / "latency.db", check)


def on_a_job_exactly_as_old_as_its_expiry(path: Path, check: Callable[[SQLiteStore, str], Awaitable[None]]) -> None:
    """Run `check` on a store whose clock reads an open job of the team 'team' exactly
    jobs.expire_after (60 s) old: expired is older than that (the sweep's `created_at <` bound)."""

    async def run() -> None:
        now = [1_000.0]
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"), clock=lambda: now[0], expire_after=60.0)
        await store.open()
        try:
            await store.create_organization("org", "Org")
            team = Team("team", "org", "active", 10, 0, 0, (), None, None, None, None, 1_000.0)
            await store.create_team(team, "initial")
            job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
            now[0] = 1_060.0
            await check(store, job_id)
        finally:
            await store.close()

    asyncio.run(run())


def test_a_job_exactly_as_old_as_its_expiry_still_takes_a_call(tmp_path):
    async def check(store: SQLiteStore, job_id: str) -> None:
        await store.start_call(new_call("call", job_id, 1_060.0))
        assert await statuses(store, job_id) == {"call": "running"}

    on_a_job_exactly_as_old_as_its_expiry(tmp_path / "edge.db", check)


def test_a_job_exactly_as_old_as_its_expiry_is_still_charged_when_completed(tmp_path):
    async def check(store: SQLiteStore, job_id: str) -> None:
        job, changed = await store.finish_job(job_id, "completed", None, None)
        assert (changed, job.status, job.credits_charged) == (True, "completed", 1)

    on_a_job_exactly_as_old_as_its_expiry(tmp_path / "edge.db", check)


def test_a_sweep_leaves_a_job_exactly_as_old_as_its_expiry_open(tmp_path):
    async def check(store: SQLiteStore, job_id: str) -> None:
        expired, _ = await sweep_once(store, expire_after=60.0, stale_call_after=60.0, now=1_060.0)
        assert expired == 0
        assert (await store.get_job(job_id)).status == "pending"

    on_a_job_exactly_as_old_as_its_expiry(tmp_path / "edge.db", check)


def test_a_call_in_another_teams_job_is_refused_and_leaves_that_job_open(tmp_path):
    async def check(store: SQLiteStore) -> None:
        other = Team("other", "org", "active", 10, 0, 0, (), None, None, None, None, time.time())
        await store.create_team(other, "initial")
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        with pytest.raises(Forbidden):
            await store.start_call(NewCall("call", job_id, "other", "key", "ChatAgent", None, False, time.time()))
        job = await store.get_job(job_id)
        assert (job.status, job.credits_held) == ("pending", 1)
        assert await statuses(store, job_id) == {}

    on_a_team_store(tmp_path / "other.db", check)


def test_an_outcome_is_not_written_over_a_call_that_ended_in_an_error(tmp_path):
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("call", job_id, 100.0))
        ended = CallOutcome("call", "error", None, 0, 0, False, 0.0, 50, None, 1, "boom", 1_000.0)
        assert await store.finish_call(ended)
        assert not await store.finish_call(outcome("call"))
        assert await statuses(store, job_id) == {"call": "error"}

    on_a_team_store(tmp_path / "ended.db", check)


def test_the_sweep_leaves_a_call_running_at_the_very_moment_of_its_bound(tmp_path):
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(NewCall("call", job_id, "team", "key", "ChatAgent", None, False, 100.0, stale_at=500.0))
        assert await store.cancel_stale_calls(started_before=0.0, now=500.0) == []
        assert await statuses(store, job_id) == {"call": "running"}

    on_a_team_store(tmp_path / "bound.db", check)


def test_the_credits_remaining_metric_does_not_take_open_jobs_holds_off(tmp_path):
    async def check(store: SQLiteStore) -> None:
        await store.create_job("team", "t", None, {}, 1)
        text = (await Metrics().render(store.team_balances)).decode()
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "tollgate_credits_remaining"]
        assert {s.labels["team"]: s.value for s in family.samples} == {"team": 1000.0}

    on_a_team_store(tmp_path / "remaining.db", check)


def test_an_outcome_whose_call_and_own_job_were_never_written_records_nothing(tmp_path):
    # A start cut short by a cancellation may have made neither: its outcome is no failure.
    async def check(store: SQLiteStore) -> None:
        job_end = JobEnd(new_id(), "completed", None)
        assert await store.finish_call_and_job(outcome("never"), job_end) == (False, False)
        assert await store.get_job(job_end.job_id) is None

    on_a_team_store(tmp_path / "never.db", check)


class SteppedWall:
    """A wall clock that follows the loop's until `stepped` moves it on (an NTP correction, a
    VM resumed): what the sweeper reads in the tests of clock steps."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.stepped = 0.0

    def __call__(self) -> float:
        return 1_000_000.0 + self._loop.time() + self.stepped


async def start_bounded(store: SQLiteStore, call_id: str, job_id: str, wall: SteppedWall, bound: float) -> None:
    """Start a call whose process judges it stale `bound` seconds on."""
    await store.start_call(NewCall(call_id, job_id, "team", "key", "ChatAgent", None, True, wall(), wall() + bound))


@contextlib.asynccontextmanager
async def sweeping(store: SQLiteStore, stale_call_after: float, wall: SteppedWall) -> AsyncIterator[None]:
    """A sweeper on `wall`, every 10 ms; the store closed after it."""
    sweeper = asyncio.create_task(sweep_forever(store, 86_400, stale_call_after, 0.01, clock=wall))
    try:
        yield
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await store.close()


def test_a_step_of_the_wall_clock_forward_does_not_make_the_sweeper_close_live_calls(tmp_path):
    # A call's bound (stale_at) is wall time, set as it started. An NTP correction or a VM
    # resumed steps the wall clock forward, not the loop's: calls running on made every
    # sweeper take them for a dead process's, closed as interrupted while they ran (their job
    # then completable, an own job failed).
    async def check() -> None:
        store, wall = await make_team(str(tmp_path / "step.db")), SteppedWall()
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await start_bounded(store, "live", job_id, wall, 1.0)
        async with sweeping(store, 1.0, wall):
            await asyncio.sleep(0.1)
            wall.stepped = 3600.0  # the wall clock steps an hour forward
            await asyncio.sleep(0.3)
            assert await statuses(store, job_id) == {"live": "running"}

    asyncio.run(check())


def test_a_call_left_running_before_a_step_of_the_wall_clock_is_still_closed_once_past_its_bound(tmp_path):
    # The step is discounted only for calls that may have started before it: a dead process's
    # call is closed when the loop's clock, which the step did not move, shows it past its bound.
    async def check() -> None:
        store, wall = await make_team(str(tmp_path / "step.db")), SteppedWall()
        before = (await store.create_job("team", "t", None, {}, 1)).job_id
        after = (await store.create_job("team", "t", None, {}, 1)).job_id
        await start_bounded(store, "dead", before, wall, 0.5)
        async with sweeping(store, 0.5, wall):
            await asyncio.sleep(0.1)
            wall.stepped = 3600.0
            await asyncio.sleep(0.05)
            await start_bounded(store, "dead-too", after, wall, 0.5)
            # Both are past their bound within 0.5 s; the step, had it been discounted for
            # them, would have kept them running an hour.
            assert await statuses_once(store, before, {"dead": "cancelled"}) == {"dead": "cancelled"}
            assert await statuses_once(store, after, {"dead-too": "cancelled"}) == {"dead-too": "cancelled"}

    asyncio.run(check())


def test_a_call_started_after_a_step_of_the_wall_clock_but_before_the_sweeper_saw_it_is_closed_at_its_bound(tmp_path):
    # Its bound was written on the stepped clock already: only calls started before the step
    # are judged earlier, though the sweeper learns of the step only at its next run.
    async def check() -> None:
        store, wall = await make_team(str(tmp_path / "step.db")), SteppedWall()
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        sweeper = asyncio.create_task(sweep_forever(store, 86_400, 0.1, 0.3, clock=wall))
        try:
            await asyncio.sleep(0.1)  # the first run is over; the next comes in 0.2 s
            wall.stepped = 3600.0
            await start_bounded(store, "dead", job_id, wall, 0.1)
            assert await statuses_once(store, job_id, {"dead": "cancelled"}, timeout=3) == {"dead": "cancelled"}
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await store.close()

    asyncio.run(check())


def test_a_step_of_the_wall_clock_forward_spares_the_live_calls_of_a_process_with_longer_bounds(tmp_path):
    # Another process sharing the database, configured with a longer upstream timeout (a rolling
    # change): its call's bound is further off than this sweeper's own. The step was taken off
    # only while a call of this sweeper's own bound could still run: past that, the other's
    # live call was closed as interrupted.
    async def check() -> None:
        store, wall = await make_team(str(tmp_path / "step.db")), SteppedWall()
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await start_bounded(store, "long", job_id, wall, 5.0)  # the other process's: this sweeper's is 0.3 s
        async with sweeping(store, 0.3, wall):
            await asyncio.sleep(0.1)
            wall.stepped = 3600.0
            await asyncio.sleep(1.0)  # well past this sweeper's own bound
            assert await statuses(store, job_id) == {"long": "running"}

    asyncio.run(check())


def test_a_step_of_the_wall_clock_forward_is_still_taken_off_seconds_after_it(tmp_path):
    # A call started before the step may run as long as the longest bound of any process (up to
    # jobs.expire_after): the step is remembered that long, not only for a moment.
    async def check() -> None:
        store, wall = await make_team(str(tmp_path / "step.db")), SteppedWall()
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await start_bounded(store, "long", job_id, wall, 10.0)
        async with sweeping(store, 0.3, wall):
            await asyncio.sleep(0.1)
            wall.stepped = 3600.0
            await asyncio.sleep(2.0)
            assert await statuses(store, job_id) == {"long": "running"}

    asyncio.run(check())


def test_a_step_of_the_wall_clock_forward_is_remembered_while_the_sweepers_own_calls_run_though_jobs_expire_sooner(
    tmp_path,
):
    # jobs.expire_after shorter than a call may run (jobs of minutes, upstream.timeouts.total of
    # ten): the step was forgotten once expire_after had passed, and a call started before it,
    # still well within its process's bound, was closed as interrupted while it ran.
    async def check() -> None:
        store, wall = await make_team(str(tmp_path / "step.db")), SteppedWall()
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await start_bounded(store, "live", job_id, wall, 3.0)
        sweeper = asyncio.create_task(sweep_forever(store, 0.3, 3.0, 0.01, clock=wall))
        try:
            await asyncio.sleep(0.1)
            wall.stepped = 3600.0
            await asyncio.sleep(1.0)  # past expire_after, within the call's bound
            assert await statuses(store, job_id) == {"live": "running"}
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await store.close()

    asyncio.run(check())


def test_a_call_failing_its_expired_job_half_way_leaves_the_jobs_hold_as_it_was(tmp_path):
    # A call's start is written without a transaction of its own (one statement); failing an
    # expired job in that write committed each of its statements alone. One refused after the
    # hold was deleted (the database busy with another process's write, a full disk) left the
    # team's credit held for good: no hold was left for the sweep to release.
    path = str(tmp_path / "expiry.db")

    async def check() -> None:
        now = [1_000.0]
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"), clock=lambda: now[0], expire_after=60.0)
        await store.open()
        try:
            await store.create_organization("org", "Org")
            await store.create_team(Team("team", "org", "active", 10, 0, 0, (), None, None, None, None, 0.0), "initial")
            job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
            now[0] += 120.0  # past its expiry, before any sweep
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON teams BEGIN SELECT RAISE(ABORT, 'refused'); END")
            with pytest.raises(sqlite3.IntegrityError, match="refused"):
                await store.start_call(new_call("late", job_id, now[0]))
            db.execute("DROP TRIGGER refuse")
            db.close()
            await sweep_once(store, expire_after=60.0, stale_call_after=60.0, now=now[0])
            assert (await store.get_job(job_id)).status == "failed"
            assert (await store.get_team("team")).credits_held == 0
        finally:
            await store.close()

    asyncio.run(check())


def sweeper_failures_logged(store, runs: int, caplog) -> list[logging.LogRecord]:
    """What the sweeper logs of its failures over `runs` runs (counted by the store) in a row."""

    async def run() -> None:
        sweeper = asyncio.create_task(sweep_forever(store, 86_400, 60, 0.001))
        while store.runs < runs:
            await asyncio.sleep(0.001)
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="tollgate.sweeper"):
        asyncio.run(run())
    return [record for record in caplog.records if "sweeper" in record.getMessage()]


def test_a_sweep_failing_the_same_way_run_after_run_logs_its_traceback_once(caplog):
    # A damaged database file failed every run alike: a full traceback every sweep_interval.
    class Unreadable:
        def __init__(self) -> None:
            self.runs = 0

        async def cancel_stale_calls(self, *args: object) -> list[object]:
            self.runs += 1
            if self.runs == 4:
                raise StoreUnavailable("disk I/O error (another)")
            raise StoreUnavailable("database disk image is malformed")

    failures = sweeper_failures_logged(Unreadable(), 5, caplog)
    assert [record.exc_info is not None for record in failures[:5]] == [True, False, False, True, True]
    assert "malformed" in failures[1].getMessage()


def test_a_sweep_failing_again_after_a_run_that_succeeded_logs_its_traceback_again(caplog):
    # Once runs succeed again, a failure is news again, though it reads as the last one did.
    class FailsThenRecovers:
        def __init__(self) -> None:
            self.runs = 0

        async def cancel_stale_calls(self, *args: object) -> list[object]:
            self.runs += 1
            if self.runs in (1, 3):
                raise StoreUnavailable("database is locked")
            return []

        async def fail_interrupted_implicit_jobs(self, *args: object) -> list[object]:
            return []

        async def expire_jobs(self, *args: object) -> list[object]:
            return []

    failures = sweeper_failures_logged(FailsThenRecovers(), 4, caplog)
    assert [record.exc_info is not None for record in failures] == [True, True]


def cancelled(call_id: str, error: str) -> CallOutcome:
    return CallOutcome(call_id, "cancelled", "gpt-4o-mini", 10, 0, True, 0.0, 100, None, 1, error, 1_000.0)


def test_an_outcome_written_again_over_a_call_found_recorded_already_leaves_its_own_job_as_it_was(tmp_path):
    # The shutdown writes a kept outcome once more (over a sweeper's closing it as interrupted);
    # the call was recorded by then, and its own job left failed, the team unable to pay for it.
    # A write that records nothing must not charge the job later, once the team can pay again.
    async def check(store: SQLiteStore) -> None:
        job = await own_job_failed_as_interrupted(store)
        holder = (await store.create_job("team", "t", None, {}, 1000)).job_id  # all the team has
        assert await kept_outcome_written(store, job) == (True, False)
        await store.finish_job(holder, "failed", None, None)  # its credits free again
        assert await kept_outcome_written(store, job) == (False, False)
        assert (await store.get_job(job)).status == "failed"
        team = await store.get_team("team")
        assert (team.credits_used, team.credits_held) == (0, 0)

    on_a_team_store(tmp_path / "kept.db", check)  # 1,000 credits


def test_a_kept_stream_outcome_charges_its_interrupted_own_job_with_the_teams_last_free_credit(tmp_path):
    async def check(store: SQLiteStore) -> None:
        job = await own_job_failed_as_interrupted(store)
        await store.create_job("team", "t", None, {}, 999)  # leaves exactly the one credit the job held
        assert await kept_outcome_written(store, job) == (True, True)
        team = await store.get_team("team")
        assert (team.credits_used, team.credits_held, team.credits_available) == (1, 999, 0)
        assert await store.ledger_sum("team") == team.credits_remaining

    on_a_team_store(tmp_path / "kept.db", check)  # 1,000 credits


def test_a_kept_stream_outcome_does_not_charge_its_own_job_once_it_was_failed_as_expired(tmp_path):
    # Only a job failed as interrupted (by a sweep that could not know of the kept outcome) is
    # charged when the outcome is written at last: an expired job is failed uncharged for good.
    async def check(store: SQLiteStore) -> None:
        job = new_id()
        await store.start_call(new_call("streamed", job, 100.0), own_job_default_credits=1)
        assert len(await store.cancel_stale_calls(500.0, now=500.0)) == 1
        assert [j.job_id for j in await store.expire_jobs(time.time() + 60, 10)] == [job]
        assert await kept_outcome_written(store, job) == (True, False)
        failed = await store.get_job(job)
        assert (failed.status, failed.credits_charged) == ("failed", 0)
        assert failed.error_message.startswith("expired")
        team = await store.get_team("team")
        assert (team.credits_used, team.credits_held) == (0, 0)

    on_a_team_store(tmp_path / "kept.db", check)


def test_an_outcome_is_not_written_over_a_call_its_client_cancelled(tmp_path):
    # Outcomes are written over a sweeper's closing a call as interrupted (which knew nothing of
    # them), and over nothing else: a hang-up's record is the call's own end.
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("hung-up", job_id, 100.0))
        assert await store.finish_call(cancelled("hung-up", "client disconnected"), over_interrupted=True)
        assert not await store.finish_call(outcome("hung-up"), over_interrupted=True)
        view = await store.job_view(job_id)
        assert [(c.status, c.error, c.completion_tokens) for c in view[1]] == [
            ("cancelled", "client disconnected", 0)
        ]

    on_a_team_store(tmp_path / "cancelled.db", check)


def test_a_call_that_ends_between_the_sweeps_search_and_its_write_keeps_its_record(tmp_path):
    # The sweep finds stale calls on one connection and closes them in a later write: one
    # recorded meanwhile (its record slowed by a locked database) is not closed as interrupted.
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("late", job_id, 100.0))
        search = store._read_together

        async def search_then_record(*args, **kwargs):
            store._read_together = search  # once
            found = await search(*args, **kwargs)
            assert await store.finish_call(outcome("late"))
            return found

        store._read_together = search_then_record
        assert await store.cancel_stale_calls(500.0, now=500.0) == []
        assert await statuses(store, job_id) == {"late": "success"}

    on_a_team_store(tmp_path / "race.db", check)


def test_the_sweep_leaves_an_api_job_whose_call_it_closed_as_interrupted_open_for_its_client(tmp_path):
    # Only a /v1 call's own job is failed with its interrupted call: a job of /api is its
    # client's to complete (and is charged then), or it expires.
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("cut-by-a-crash", job_id, 100.0))
        await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0)
        assert await statuses(store, job_id) == {"cut-by-a-crash": "cancelled"}
        assert (await store.get_job(job_id)).status == "in_progress"
        job, changed = await store.finish_job(job_id, "completed", None, None)
        assert (job.status, job.credits_charged, changed) == ("completed", 1, True)

    on_a_team_store(tmp_path / "api.db", check)


def test_open_jobs_expire_whether_a_call_started_them_or_not(tmp_path):
    async def check(store: SQLiteStore) -> None:
        pending = (await store.create_job("team", "t", None, {}, 1)).job_id
        started = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("done", started, 100.0))
        await store.finish_call(outcome("done"))
        assert (await store.get_job(started)).status == "in_progress"
        expired = await store.expire_jobs(time.time() + 60, 10)
        assert sorted(j.job_id for j in expired) == sorted([pending, started])
        assert {(await store.get_job(j)).status for j in (pending, started)} == {"failed"}
        assert (await store.get_team("team")).credits_held == 0

    on_a_team_store(tmp_path / "expire.db", check)


def test_a_sweep_fails_every_expired_job_batch_after_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeper_module, "BATCH", 2)

    async def check(store: SQLiteStore) -> None:
        jobs = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(5)]
        expired, _ = await sweep_once(store, expire_after=60, stale_call_after=60, now=time.time() + 120)
        assert expired == 5
        assert {(await store.get_job(job_id)).status for job_id in jobs} == {"failed"}

    on_a_team_store(tmp_path / "batches.db", check)


def test_a_sweep_goes_on_past_a_batch_another_processs_sweep_took_jobs_of(tmp_path, monkeypatch):
    # The workers of `serve --workers N` start together and sweep every interval, at about the
    # same moments: each took jobs of the other's batch, each batch came back short of BATCH,
    # and each run stopped after its first. The jobs left held their credits for more intervals
    # (two stores sweeping 3,000 expired jobs at once left 2,480 of them open).
    monkeypatch.setattr(sweeper_module, "BATCH", 2)

    async def check(store: SQLiteStore) -> None:
        jobs = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(5)]
        later = time.time() + 120
        other = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 'two.db'}"))
        await other.open()
        read = store._read

        async def read_as_the_other_sweeps(sql: str, *args: Any, **kwargs: Any) -> Any:
            found = await read(sql, *args, **kwargs)
            if "ORDER BY created_at" in sql:  # the search for expired jobs
                store._read = read  # once
                assert [j.job_id for j in await other.expire_jobs(later - 60, 1)] == [jobs[0]]  # of this batch
            return found

        store._read = read_as_the_other_sweeps
        try:
            await sweep_once(store, expire_after=60, stale_call_after=60, now=later)
        finally:
            await other.close()
        assert [(await store.get_job(job_id)).status for job_id in jobs] == ["failed"] * 5
        assert (await store.get_team("team")).credits_held == 0

    on_a_team_store(tmp_path / "two.db", check)


def test_a_sweep_fails_every_own_job_of_a_v1_call_it_closed_as_interrupted_batch_after_batch(tmp_path, monkeypatch):
    # A process that died serving thousands of /v1 calls left as many own jobs, each holding its
    # team's credit: one batch a pass released them over as many sweep intervals (minutes), the
    # team refused new jobs for want of credits meanwhile.
    monkeypatch.setattr(sweeper_module, "BATCH", 2)

    async def check(store: SQLiteStore) -> None:
        own = [await store.create_job("team", IMPLICIT_JOB_TYPE, None, {"implicit": True}, 1) for _ in range(5)]
        jobs = [job.job_id for job in own]
        for job_id in jobs:
            await store.start_call(new_call(f"cut-{job_id}", job_id, 100.0))
        await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0)
        assert {(await store.get_job(job_id)).status for job_id in jobs} == {"failed"}
        assert (await store.get_team("team")).credits_held == 0

    on_a_team_store(tmp_path / "implicit-batches.db", check)


def test_the_sweep_counts_the_own_jobs_of_v1_calls_it_fails_as_interrupted_among_failed_jobs(tmp_path):
    async def check(store: SQLiteStore) -> None:
        own = await store.create_job("team", IMPLICIT_JOB_TYPE, None, {"implicit": True}, 1)
        await store.start_call(new_call("cut", own.job_id, 100.0))
        metrics = Metrics()
        await sweep_once(store, expire_after=86_400, stale_call_after=60, now=500.0, metrics=metrics)
        text = (await metrics.render(store.team_balances)).decode()
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "tollgate_jobs"]
        counted = {(s.labels["team"], s.labels["status"]): s.value for s in family.samples if s.name == "tollgate_jobs_total"}
        assert counted == {("team", "failed"): 1.0}

    on_a_team_store(tmp_path / "implicit-counted.db", check)


def test_a_sweep_fails_expired_jobs_many_to_a_durable_write(tmp_path, monkeypatch):
    # One write each, each waiting for its fsync: about 470 jobs a second, so that a backlog of a
    # million (after an outage) took more than half an hour to release its credits.
    from proxy.store.writer import Writer

    commits = []
    commit = Writer._commit
    monkeypatch.setattr(Writer, "_commit", lambda self, db, batch: commits.append(len(batch)) or commit(self, db, batch))

    async def check(store: SQLiteStore) -> None:
        jobs = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(2 * store_module.FAIL_TOGETHER)]
        commits.clear()
        assert len(await store.expire_jobs(time.time() + 60, len(jobs))) == len(jobs)
        assert commits == [store_module.FAIL_TOGETHER] * 2
        assert (await store.get_team("team")).credits_held == 0

    on_a_team_store(tmp_path / "together.db", check)


def test_a_sweep_fails_the_expired_jobs_of_a_batch_around_one_finished_meanwhile(tmp_path):
    async def check(store: SQLiteStore) -> None:
        jobs = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(3)]
        read = store._read

        async def read_then_complete(*args, **kwargs):
            store._read = read  # once
            found = await read(*args, **kwargs)
            await store.finish_job(jobs[1], "completed", None, None)
            return found

        store._read = read_then_complete
        assert sorted(j.job_id for j in await store.expire_jobs(time.time() + 60, 10)) == sorted([jobs[0], jobs[2]])
        assert [(await store.get_job(j)).status for j in jobs] == ["failed", "completed", "failed"]

    on_a_team_store(tmp_path / "around.db", check)


def test_a_sweeps_batch_of_expired_jobs_is_not_taken_up_by_jobs_finished_already(tmp_path):
    # The sweep fails expired jobs a batch at a time, oldest first, and stops at a batch that
    # is not full: jobs finished long ago must not fill it, or open ones would never expire.
    async def check(store: SQLiteStore) -> None:
        finished = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.finish_job(finished, "failed", None, None)
        still_open = (await store.create_job("team", "t", None, {}, 1)).job_id
        assert [j.job_id for j in await store.expire_jobs(time.time() + 60, 1)] == [still_open]

    on_a_team_store(tmp_path / "batch.db", check)


def test_a_job_finished_between_the_sweeps_search_and_its_write_is_not_counted_as_failed_by_it(tmp_path):
    # The jobs a sweep returns are counted in tollgate_jobs_total{status="failed"}: one its client
    # (or another process's sweep) finished meanwhile was counted there twice.
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        read = store._read

        async def read_then_fail(*args, **kwargs):
            store._read = read  # once
            found = await read(*args, **kwargs)
            await store.finish_job(job_id, "failed", None, "the client gave up")
            return found

        store._read = read_then_fail
        assert await store.expire_jobs(time.time() + 60, 10) == []
        assert (await store.get_job(job_id)).error_message == "the client gave up"

    on_a_team_store(tmp_path / "counted.db", check)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE teams SET credits_used = credits_allocated, credits_held = 1",  # spent and held at once
        "UPDATE teams SET credits_held = -1",
        "UPDATE teams SET credits_used = -1",
        "INSERT INTO credit_ledger (team_id, job_id, amount, reason, balance_after, created_at) "
        "SELECT team_id, job_id, -1, 'charged again', 0, 0 FROM credit_ledger WHERE job_id IS NOT NULL",
    ],
)
def test_the_database_itself_refuses_to_spend_a_balance_twice_or_charge_a_job_twice(tmp_path, statement):
    # README's "What Tollgate guarantees": the constraints hold whatever the code above them does.
    path = tmp_path / "guards.db"

    async def setup() -> None:
        store = await make_team(str(path))
        try:
            job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
            await store.finish_job(job_id, "completed", None, None)
        finally:
            await store.close()

    asyncio.run(setup())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(statement)
    finally:
        db.close()


@pytest.mark.parametrize("reading", ["a job's view", "a page of the team's jobs"])
def test_reads_that_must_agree_see_no_write_that_lands_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reading: str
) -> None:
    path = tmp_path / "moment.db"
    read = store_module._all

    def credits_added_after_the_jobs_are_read(db: sqlite3.Connection, sql: str, params: Any = ()) -> list[Any]:
        rows = read(db, sql, params)
        if "FROM jobs j" in sql and "COUNT(*)" not in sql:
            with contextlib.closing(sqlite3.connect(path)) as other:
                other.execute("UPDATE teams SET credits_allocated = credits_allocated + 5 WHERE team_id = 'team'")
                other.commit()
        return rows

    async def check(store: SQLiteStore) -> None:
        job = await store.create_job("team", "t", None, {}, 1)
        monkeypatch.setattr(store_module, "_all", credits_added_after_the_jobs_are_read)
        if reading == "a job's view":
            view = await store.job_view(job.job_id)
            assert view is not None
            remaining = view[2]
        else:
            remaining = (await store.team_jobs("team", None, 10, 0))[2]
        assert remaining == 1000  # as of the jobs' read, before the credits came
        team = await store.get_team("team")
        assert team is not None and team.credits_allocated == 1005

    on_a_team_store(path, check)


def test_a_job_views_calls_are_in_the_order_they_started(tmp_path: Path) -> None:
    async def check(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        for call_id, started_at in [("b", 100.0), ("a", 200.0), ("c", 300.0)]:
            await store.start_call(new_call(call_id, job_id, started_at))
        view = await store.job_view(job_id)
        assert view is not None and [call.call_id for call in view[1]] == ["b", "a", "c"]

    on_a_team_store(tmp_path / "order.db", check)


def test_the_gateways_sweep_leaves_a_call_recorded_without_a_bound_running_within_the_margin(
    tmp_path: Path, fake_url: str
) -> None:
    # jobs.stale_call_margin past upstream.timeouts.total: a call may still be recording then.
    database = tmp_path / "gateway.db"
    config_path = tmp_path / "config.yaml"
    upstream = {"url": fake_url, "timeouts": {"total": "600s"}}
    jobs = {"sweep_interval": "50ms", "stale_call_margin": "60s"}
    config_path.write_text(yaml.safe_dump(tollgate_config(database, upstream=upstream, jobs=jobs)))
    config = load_config(str(config_path), env={})

    async def calls_begun_long_ago(store: SQLiteStore) -> None:
        job_id = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("past the margin", job_id, time.time() - 700))
        await store.start_call(new_call("within the margin", job_id, time.time() - 630))

    on_a_team_store(database, calls_begun_long_ago)

    def statuses_now() -> dict[str, str]:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return dict(db.execute("SELECT call_id, status FROM llm_calls").fetchall())

    with TestClient(create_app(config)):
        assert wait_for(lambda: statuses_now()["past the margin"] == "cancelled", timeout=30)
    assert statuses_now()["within the margin"] == "running"


def test_jobs_a_sweep_failed_before_the_store_refused_the_next_are_counted_among_failed_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweep fails expired jobs FAIL_TOGETHER at a time: a refusal of a later group (another
    # process's lock outlasting the busy timeout) left the jobs of the groups before it failed,
    # their holds released, and never counted in tollgate_jobs_total.
    counted = jobs_counted(monkeypatch)
    finish_job = SQLiteStore.finish_job
    finishing: list[str] = []

    async def refused_after_the_first_group(self: SQLiteStore, job_id: str, *args: Any, **kwargs: Any) -> Any:
        finishing.append(job_id)
        if len(finishing) > store_module.FAIL_TOGETHER:
            raise StoreBusy("The database is busy; try again shortly")
        return await finish_job(self, job_id, *args, **kwargs)

    monkeypatch.setattr(SQLiteStore, "finish_job", refused_after_the_first_group)

    async def check() -> int:
        store = await make_team(str(tmp_path / "refused.db"))
        try:
            for _ in range(store_module.FAIL_TOGETHER + 1):
                await store.create_job("team", "t", None, {}, 1)
            with pytest.raises(StoreBusy):
                await sweep_once(store, expire_after=60, stale_call_after=60, now=time.time() + 120, metrics=Metrics())
            (failed,) = await store._read("SELECT COUNT(*) FROM jobs WHERE status = 'failed'")
            return failed[0]
        finally:
            await store.close()

    assert asyncio.run(check()) == store_module.FAIL_TOGETHER
    assert counted == Counter({("team", "failed"): store_module.FAIL_TOGETHER})


# --- a job's hold refused while the team's expired jobs, not swept yet, hold its credits ------------


async def a_team_held_by_expired_jobs(path: Path, count: int = 1, spare: int = 0) -> tuple[SQLiteStore, list[str]]:
    """The team 'team' with `count` open jobs of a credit each, oldest first, and `spare` credits
    besides; a store (to be closed) opened on it past their expiry, before any sweep."""
    store = await make_team(str(path))
    await store.add_credits("team", count + spare - 1000, "leave the jobs' credits")
    job_ids = [(await store.create_job("team", "t", None, {}, 1)).job_id for _ in range(count)]
    await store.close()
    later = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"), clock=lambda: time.time() + 120, expire_after=60.0)
    await later.open()
    return later, job_ids


async def failed_as_expired(store: SQLiteStore, job_id: str) -> bool:
    job = await store.get_job(job_id)
    assert job is not None
    return (job.status, job.error_message, job.credits_charged) == ("failed", store_module.EXPIRED_JOB, 0)


async def credits(store: SQLiteStore) -> tuple[int, int, int]:
    """The team's (credits_used, credits_held, credits_remaining), the last checked against its ledger."""
    team = await store.get_team("team")
    assert team is not None
    assert await store.ledger_sum("team") == team.credits_remaining
    return team.credits_used, team.credits_held, team.credits_remaining


def dump(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.iterdump())


def test_a_job_is_made_at_once_with_the_credit_an_expired_job_not_swept_yet_holds(tmp_path):
    # Its hold was due back at its expiry: only the sweep's round still kept it.
    path = tmp_path / "room.db"

    async def check() -> None:
        later, (expired,) = await a_team_held_by_expired_jobs(path)
        try:
            made_room: list[str] = []
            job = await later.create_job("team", "t", None, {}, 1, made_room)
            assert made_room == [expired] and await failed_as_expired(later, expired)
            assert job.credits_held == 1 and await credits(later) == (0, 1, 1)
            assert await listed_totals(later) == counted_totals(path)
        finally:
            await later.close()

    asyncio.run(check())


def test_a_v1_calls_own_job_is_made_at_once_with_the_credit_an_expired_job_not_swept_yet_holds(tmp_path):
    path = tmp_path / "room.db"

    async def check() -> None:
        later, (expired,) = await a_team_held_by_expired_jobs(path)
        try:
            made_room: list[str] = []
            own = new_id()
            await later.start_call(new_call("own", own, time.time()), 1, made_room)
            assert made_room == [expired] and await failed_as_expired(later, expired)
            assert await statuses(later, own) == {"own": "running"}
            assert await credits(later) == (0, 1, 1)
            assert await listed_totals(later) == counted_totals(path)
        finally:
            await later.close()

    asyncio.run(check())


def test_only_the_oldest_expired_jobs_whose_credits_the_hold_needs_are_failed(tmp_path):
    async def check() -> None:
        later, (oldest, second, newest) = await a_team_held_by_expired_jobs(tmp_path / "room.db", count=3)
        try:
            await later.update_team("team", {"credits_per_job": 2})
            made_room: list[str] = []
            await later.create_job("team", "t", None, {}, 1, made_room)
            assert made_room == [oldest, second]
            assert [(await later.get_job(j)).status for j in (oldest, second, newest)] == ["failed", "failed", "pending"]
            assert await credits(later) == (0, 3, 3)
        finally:
            await later.close()

    asyncio.run(check())


def test_an_expired_job_with_a_call_still_running_is_not_failed_to_make_room(tmp_path):
    # The sweep waits for that call too: its end may charge the job.
    path = tmp_path / "room.db"

    async def check() -> None:
        store = await make_team(str(path))
        await store.add_credits("team", -999, "leave one")
        busy = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("long", busy, time.time()))
        await store.close()
        later = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"), clock=lambda: time.time() + 120, expire_after=60.0)
        await later.open()
        try:
            before = dump(path)
            with pytest.raises(store_module.InsufficientCredits):
                await later.create_job("team", "t", None, {}, 1)
            with pytest.raises(store_module.InsufficientCredits):
                await later.start_call(new_call("own", new_id(), time.time()), 1)
            assert dump(path) == before
            assert await statuses(later, busy) == {"long": "running"}
        finally:
            await later.close()

    asyncio.run(check())


def test_a_team_that_cannot_pay_even_with_its_expired_jobs_credits_is_refused_as_before_with_nothing_written(tmp_path):
    path = tmp_path / "room.db"

    async def check() -> None:
        later, (expired,) = await a_team_held_by_expired_jobs(path, spare=1)
        try:
            await later.update_team("team", {"credits_per_job": 3})
            before = dump(path)
            with pytest.raises(store_module.InsufficientCredits) as refused:
                await later.create_job("team", "t", None, {}, 1)
            assert str(refused.value) == (
                "Insufficient credits: team 'team' has 1 available (2 remaining, 1 held by open jobs); a job needs 3"
            )
            with pytest.raises(store_module.InsufficientCredits):
                await later.start_call(new_call("own", new_id(), time.time()), 1)
            assert dump(path) == before
            assert (await later.get_job(expired)).status == "pending"
        finally:
            await later.close()

    asyncio.run(check())


def test_an_expired_job_failed_to_make_room_is_counted_once_though_two_processes_want_its_credit(tmp_path):
    # Each process fails only jobs it finds open in its own write: the one that failed it says
    # so, the other finds it failed, and the sweep, in either, finds nothing to fail.
    path = tmp_path / "room.db"

    async def check() -> dict[tuple[str, ...], float]:
        later, (expired,) = await a_team_held_by_expired_jobs(path)
        other = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"), clock=lambda: time.time() + 120, expire_after=60.0)
        await other.open()
        metrics = Metrics()
        try:
            rooms: tuple[list[str], list[str]] = ([], [])
            made = await asyncio.gather(
                later.create_job("team", "t", None, {}, 1, rooms[0]),
                other.create_job("team", "t", None, {}, 1, rooms[1]),
                return_exceptions=True,
            )
            assert sorted(type(m).__name__ for m in made) == ["InsufficientCredits", "Job"]
            assert rooms[0] + rooms[1] == [expired]
            for store in (later, other):
                await sweep_once(store, expire_after=60, stale_call_after=60, now=time.time() + 120, metrics=metrics)
            assert await credits(later) == (0, 1, 1)
            text = (await metrics.render(later.team_balances)).decode()
        finally:
            await other.close()
            await later.close()
        return {(s.labels["team"], s.labels["status"]): s.value
                for f in text_string_to_metric_families(text) if f.name == "tollgate_jobs"
                for s in f.samples if s.name == "tollgate_jobs_total"}

    assert asyncio.run(check()) == {}  # the sweeps counted none of it


def test_a_start_cut_short_once_written_still_names_the_expired_jobs_it_failed_to_make_room(tmp_path):
    # Failed for good: left out, they would be counted by nobody, the sweep finding them failed.
    async def check() -> None:
        later, (expired,) = await a_team_held_by_expired_jobs(tmp_path / "cut.db")
        try:
            made_room: list[str] = []
            starting = asyncio.create_task(later.start_call(new_call("cut", new_id(), time.time()), 1, made_room))
            await asyncio.sleep(0)  # its write submitted: the cancellation waits for it (writer.py)
            starting.cancel()
            with pytest.raises(WrittenThenCancelled):
                await starting
            assert made_room == [expired] and await failed_as_expired(later, expired)
        finally:
            await later.close()

    asyncio.run(check())


def test_a_job_made_as_the_shutdown_cuts_it_still_names_the_expired_jobs_it_failed_to_make_room(tmp_path):
    async def check() -> None:
        later, (expired,) = await a_team_held_by_expired_jobs(tmp_path / "cut.db")
        try:
            made_room: list[str] = []
            creating = asyncio.create_task(later.create_job("team", "t", None, {}, 1, made_room))
            await asyncio.sleep(0)
            creating.cancel()
            assert (await creating).status == "pending"  # a request's write: answered as done (`_write`)
            assert made_room == [expired]
        finally:
            await later.close()

    asyncio.run(check())
