"""Call records in the store: the sweep of calls a dead process left running, and the schema
they live in."""

import asyncio
import sqlite3

from proxy.config import DatabaseConfig
from proxy.records import CallOutcome, NewCall
from proxy.store.schema import MIGRATIONS
from proxy.store.sqlite import SQLiteStore, _statements
from tests.test_store_concurrency import make_team


def new_call(call_id: str, job_id: str, started_at: float) -> NewCall:
    return NewCall(call_id, job_id, "team", "key", "ChatAgent", None, False, started_at)


def outcome(call_id: str) -> CallOutcome:
    return CallOutcome(call_id, "success", "gpt-4o-mini", 10, 5, False, 0.0, 100, None, 1, None, 1_000.0)


async def statuses(store: SQLiteStore, job_id: str) -> dict[str, str]:
    return {call.call_id: call.status for call in await store.job_calls(job_id)}


def test_the_sweep_closes_only_calls_still_running_that_started_before_the_cutoff(tmp_path):
    async def check() -> None:
        store = await make_team(str(tmp_path / "sweep.db"))
        first = (await store.create_job("team", "t", None, {}, 1)).job_id
        second = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(new_call("old-running", first, 100.0))
        await store.start_call(new_call("old-finished", first, 100.0))
        await store.finish_call(outcome("old-finished"))
        await store.start_call(new_call("new-running", first, 900.0))
        await store.start_call(new_call("other-job", second, 200.0))

        assert await store.cancel_stale_calls(500.0) == 2

        assert await statuses(store, first) == {
            "old-running": "cancelled", "old-finished": "success", "new-running": "running"
        }
        assert await statuses(store, second) == {"other-job": "cancelled"}
        await store.close()

    asyncio.run(check())


def test_a_schema_2_database_upgrades_with_its_running_calls_still_swept(tmp_path):
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    for version, script in enumerate(MIGRATIONS[:2], start=1):
        for statement in _statements(script):
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    db.execute("INSERT INTO organizations VALUES ('org', 'Org', 0)")
    db.execute(
        "INSERT INTO teams (team_id, organization_id, status, credits_allocated, credits_held, created_at, "
        "updated_at) VALUES ('team', 'org', 'active', 10, 1, 0, 0)"
    )
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
        assert await store.schema_version() == 3
        assert await store.cancel_stale_calls(500.0) == 1
        assert await statuses(store, "job") == {"left-running": "cancelled"}
        await store.close()

    asyncio.run(check())
    indexes = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "llm_calls_running" not in indexes and "llm_calls_job" in indexes
