"""The store's writer thread: concurrent writes share one commit, each succeeds or fails on
its own, and none is answered before it is durable."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from proxy.store import StoreError
from proxy.store.writer import Writer


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
    return db


def insert(n: int):
    def work(db: sqlite3.Connection) -> int:  # one statement
        db.execute("INSERT INTO t (n) VALUES (?)", (n,))
        return n

    return work


def insert_both(n: int):
    def work(db: sqlite3.Connection) -> int:  # two statements: all or nothing
        db.execute("INSERT INTO t (n) VALUES (?)", (n + 1000,))
        db.execute("INSERT INTO t (n) VALUES (?)", (n,))
        return n

    return work


async def hold(writer: Writer) -> threading.Event:
    """Keep the writer thread busy until the returned event is set, so that what is
    submitted meanwhile makes one batch."""
    started, release = threading.Event(), threading.Event()

    def blocker(db: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)

    writer.submit(blocker)
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    return release


def rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]


def test_a_failing_write_is_rolled_back_alone_and_the_others_in_its_batch_commit(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> list:
        writer = Writer(lambda: connect(path))
        await writer.start()
        release = await hold(writer)
        # A duplicate key fails half-way through the batch these writes share: as one
        # statement, and as a write of several statements.
        futures = [writer.submit(insert(n), atomic=False) for n in (1, 2, 2, 3)]
        futures += [writer.submit(insert_both(n)) for n in (4, 5, 4, 6)]
        release.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await writer.stop()
        return results

    results = asyncio.run(run())
    assert results[:2] == [1, 2] and results[3] == 3
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert results[4:6] == [4, 5] and results[7] == 6
    assert isinstance(results[6], sqlite3.IntegrityError)
    # The second insert of 4 went in before the first failed: rolled back with it.
    assert rows(path) == [1, 2, 3, 4, 5, 6, 1004, 1005, 1006]


def test_concurrent_writes_are_grouped_into_fewer_commits(tmp_path):
    path = tmp_path / "w.db"
    commits: list[int] = []

    def connect_counting() -> sqlite3.Connection:
        db = connect(path)
        db.set_trace_callback(lambda sql: commits.append(1) if sql == "COMMIT" else None)
        return db

    async def run() -> None:
        writer = Writer(connect_counting)
        await writer.start()
        release = await hold(writer)
        futures = [writer.submit(insert(n)) for n in range(100)]
        release.set()
        await asyncio.gather(*futures)
        await writer.stop()

    asyncio.run(run())
    assert rows(path) == list(range(100))
    assert len(commits) == 2  # the blocker's batch, then all 100 together


def test_a_write_is_answered_only_once_it_is_committed(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> None:
        writer = Writer(lambda: connect(path))
        await writer.start()
        for n in range(20):
            await writer.submit(insert(n))
            assert n in rows(path)  # another connection sees it at once
        await writer.stop()

    asyncio.run(run())


def test_stop_finishes_the_writes_already_submitted(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> None:
        writer = Writer(lambda: connect(path))
        await writer.start()
        futures = [writer.submit(insert(n)) for n in range(50)]
        await writer.stop()
        await asyncio.gather(*futures)

    asyncio.run(run())
    assert rows(path) == list(range(50))


def test_a_database_that_cannot_be_opened_fails_start(tmp_path):
    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    async def run() -> None:
        with pytest.raises(sqlite3.OperationalError):
            await Writer(broken).start()

    asyncio.run(run())


def test_a_write_submitted_after_stop_is_refused_not_left_waiting(tmp_path):
    async def run() -> None:
        writer = Writer(lambda: connect(tmp_path / "w.db"))
        await writer.start()
        await writer.stop()
        with pytest.raises(StoreError):
            writer.submit(insert(1))

    asyncio.run(run())


def test_a_write_that_blows_up_fails_alone_and_the_writer_carries_on(tmp_path):
    path = tmp_path / "w.db"

    class Boom(BaseException):
        pass

    def explode(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (n) VALUES (99)")
        raise Boom()

    def stop_iteration(db: sqlite3.Connection) -> None:
        next(iter(()))

    async def run() -> None:
        writer = Writer(lambda: connect(path))
        await writer.start()
        with pytest.raises(StoreError):
            await writer.submit(explode)
        with pytest.raises(RuntimeError):
            await writer.submit(stop_iteration)
        assert await writer.submit(insert(1)) == 1
        await writer.stop()

    asyncio.run(run())
    assert rows(path) == [1]


def test_a_write_of_several_statements_failing_alone_leaves_nothing_behind(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> None:
        writer = Writer(lambda: connect(path))
        await writer.start()
        await writer.submit(insert(4))
        with pytest.raises(sqlite3.IntegrityError):
            await writer.submit(insert_both(4))  # 1004 goes in, then 4 clashes
        await writer.stop()

    asyncio.run(run())
    assert rows(path) == [4]
