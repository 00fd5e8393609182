"""The store stays exact with two processes and many concurrent writers on one SQLite file."""

import asyncio
import subprocess
import sqlite3
import textwrap
import time

from proxy.config import DatabaseConfig
from proxy.records import Team
from proxy.store.schema import MIGRATIONS
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
            try:
                assert await store.schema_version() == len(MIGRATIONS)
            finally:
                await store.close()

    asyncio.run(check())


def test_opening_a_database_already_migrated_waits_for_no_other_processs_write(tmp_path):
    # Every start took the write lock to migrate, whether or not there was anything to do: a
    # worker uvicorn started again after a crash, finding another process's long write, gave up
    # after database.busy_timeout, and uvicorn then stopped the healthy worker with it.
    path = str(tmp_path / "m.db")

    async def check() -> None:
        first = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await first.open()
        await first.close()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write, still going on
        try:
            store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}", busy_timeout=0.2))
            await store.open()
            assert await store.schema_version() == len(MIGRATIONS)
            await store.close()
        finally:
            other.execute("ROLLBACK")
            other.close()

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


def test_one_teams_page_of_jobs_being_decoded_does_not_hold_another_teams_job_reads(tmp_path, monkeypatch):
    # A page of 500 jobs is up to 64 MB of metadata: decoded while the consistent-read connection
    # was held, it kept every other team's job reads and completions (which answer with the job)
    # waiting for seconds, and a team asking for several pages at once for tens of seconds.
    import threading

    from proxy.store import sqlite

    async def check() -> None:
        store = await make_team(str(tmp_path / "shared.db"))
        await store.create_team(Team("other", "org", "active", 10, 0, 0, (), None, None, None, None, time.time()), "initial")
        await store.create_job("team", "wide", None, {"wide": list(range(100))}, 1)
        theirs = await store.create_job("other", "small", None, {}, 1)
        decoding, decoded = threading.Event(), threading.Event()
        job_record = sqlite._job

        def slow_job(row, *args, **kwargs):
            if row[1] == "team":  # its team: the big page's
                decoding.set()
                decoded.wait(10)
            return job_record(row, *args, **kwargs)

        monkeypatch.setattr(sqlite, "_job", slow_job)
        page = asyncio.ensure_future(store.team_jobs("team", None, 500, 0))
        assert await asyncio.to_thread(decoding.wait, 10)
        try:
            view = await asyncio.wait_for(store.job_view(theirs.job_id), 3)
        finally:
            decoded.set()
        assert view is not None and view[0].job_id == theirs.job_id
        jobs, total, _ = await page
        assert total == 1 and jobs[0].job_type == "wide"
        await store.close()

    asyncio.run(check())


def test_a_page_of_jobs_carries_their_metadata_as_stored_without_decoding_it(tmp_path, monkeypatch):
    # Up to 500 jobs of up to 128 KiB of metadata each, which a team may make millions of small
    # values: decoded and encoded again, one page took seconds of CPU, and reads are not limited.
    import json

    from proxy.json_codec import dumps
    from proxy.store import sqlite

    async def check() -> None:
        store = await make_team(str(tmp_path / "shared.db"))
        metadata = {"doc": 7, "exact": 123456789012345678901234567890, "text": "caf\u00e9", "list": [[], {}]}
        for _ in range(3):
            await store.create_job("team", "t", None, metadata, 1)
        decoded = []
        monkeypatch.setattr(sqlite.json, "loads", lambda text, *a, **k: decoded.append(text) or json.loads(text))
        jobs, total, _ = await store.team_jobs("team", None, 500, 0)
        monkeypatch.undo()
        assert total == 3 and decoded == []
        assert [json.loads(dumps({"metadata": job.metadata}))["metadata"] for job in jobs] == [metadata] * 3
        await store.close()

    asyncio.run(check())


def test_credits_added_are_answered_as_added_though_the_shutdown_cuts_the_request_once_they_are_written(tmp_path):
    # README: credits whose write went through as the shutdown cut the request are answered as
    # added, since an admin told otherwise adds them again. A cut coming just after the write, as
    # the team was read back for the answer, still answered them as cut (a 503 to retry).
    async def check() -> None:
        store = await make_team(str(tmp_path / "cut.db"))
        read, reading = store._read, asyncio.Event()

        async def read_slowly(sql, params=()):
            reading.set()
            await asyncio.sleep(0.5)
            return await read(sql, params)

        store._read = read_slowly  # type: ignore[method-assign]
        adding = asyncio.create_task(store.add_credits("team", 5, "invoice 7"))
        read_begun = asyncio.ensure_future(reading.wait())
        await asyncio.wait([adding, read_begun], return_when=asyncio.FIRST_COMPLETED)
        read_begun.cancel()
        adding.cancel()  # the shutdown's cut, the credits written
        try:
            team = await adding
        finally:
            store._read = read  # type: ignore[method-assign]
            await store.close()
        assert team.credits_allocated == 1005

    asyncio.run(check())


def test_a_new_database_another_process_is_making_at_the_same_moment_is_waited_for_not_refused(tmp_path):
    # Two processes starting on a database not made yet (`serve` and a CLI command run beside
    # it on a new volume): the one whose switch of the new file to WAL met the other's write
    # failed at once with "database is locked", its busy timeout never used. SQLite calls no
    # busy handler there: a connection holding a read lock that waited for one writing could
    # deadlock with it.
    path = str(tmp_path / "new.db")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process's first write to the new file, going on
    other.execute("CREATE TABLE made_by_another_process (x)")

    async def check() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, other.execute, "COMMIT")
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}", busy_timeout=5))
        try:
            await store.open()
            assert await store.schema_version() == len(MIGRATIONS)
        finally:
            await store.close()

    try:
        asyncio.run(check())
    finally:
        other.close()
