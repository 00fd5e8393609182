"""The store stays exact with two processes and many concurrent writers on one SQLite file."""

import asyncio
import subprocess
import textwrap
import time

from proxy.config import DatabaseConfig
from proxy.records import Team
from proxy.store.sqlite import SQLiteStore
from tests.support import PYTHON, REPO

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from proxy.config import DatabaseConfig
    from proxy.store.sqlite import SQLiteStore

    async def main(path, team_id, changes):
        store = SQLiteStore(DatabaseConfig(url="sqlite:///" + path, busy_timeout=30))
        await store.open()
        amounts = [(1 if i % 3 else -1) for i in range(changes)]
        await asyncio.gather(*(store.add_credits(team_id, a, "concurrent change") for a in amounts))
        await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def make_team(path: str) -> SQLiteStore:
    store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
    await store.open()
    await store.create_organization("org", "Org")
    await store.create_team(Team("team", "org", "active", 1000, 0, 0, (), None, None, None, None, time.time()), "initial")
    return store


def test_two_processes_each_applying_200_credit_changes_end_exact(tmp_path):
    path = str(tmp_path / "shared.db")

    async def check() -> None:
        store = await make_team(path)
        workers = [
            subprocess.Popen([PYTHON, "-c", WORKER, path, "team", "200"], cwd=REPO) for _ in range(2)
        ]
        assert [w.wait(timeout=120) for w in workers] == [0, 0]
        team = await store.get_team("team")
        # Each process: 200 changes, a third of them -1 and the rest +1.
        per_process = sum(1 if i % 3 else -1 for i in range(200))
        assert team.credits_allocated == 1000 + 2 * per_process
        ledger = await store.ledger("team", 1000, 0)
        assert len([e for e in ledger if e.reason == "concurrent change"]) == 400
        assert await store.ledger_sum("team") == team.credits_remaining
        # Every entry's balance is a distinct step: no two writers saw the same balance.
        steps = sorted(ledger, key=lambda e: e.entry_id)
        assert all(b.balance_after - a.balance_after == b.amount for a, b in zip(steps, steps[1:]))
        await store.close()

    asyncio.run(check())


def test_schema_version_is_recorded_and_migration_is_idempotent(tmp_path):
    async def check() -> None:
        path = str(tmp_path / "v.db")
        for _ in range(2):
            store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
            await store.open()
            assert await store.schema_version() == 4
            await store.close()

    asyncio.run(check())


def test_concurrent_job_creation_never_holds_more_than_the_balance(tmp_path):
    async def check() -> None:
        store = await make_team(str(tmp_path / "holds.db"))
        await store.add_credits("team", -990, "leave ten")
        results = await asyncio.gather(
            *(store.create_job("team", "t", None, {}, 1) for _ in range(50)), return_exceptions=True
        )
        assert sum(not isinstance(r, Exception) for r in results) == 10
        team = await store.get_team("team")
        assert (team.credits_held, team.credits_available) == (10, 0)
        await store.close()

    asyncio.run(check())
