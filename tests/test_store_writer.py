"""The store's writer thread: concurrent writes share one commit, each succeeds or fails on
its own, and none is answered before it is durable."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from proxy.store.writer import Writer


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
    return db


def insert(n: int):
    def work(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO t (n) VALUES (?)", (n,))
        return n

    return work


def rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]


def test_a_failing_write_is_rolled_back_alone_and_the_others_in_its_batch_commit(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> list:
        writer = Writer(lambda: connect(path))
        await writer.start()
        # A duplicate key fails half-way through the batch these writes share.
        futures = [writer.submit(insert(n)) for n in (1, 2, 2, 3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await writer.stop()
        return results

    results = asyncio.run(run())
    assert results[:2] == [1, 2] and results[3] == 3
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert rows(path) == [1, 2, 3]


def test_concurrent_writes_are_grouped_into_fewer_commits(tmp_path):
    path = tmp_path / "w.db"
    commits: list[int] = []
    started, release = threading.Event(), threading.Event()

    def connect_counting() -> sqlite3.Connection:
        db = connect(path)
        db.set_trace_callback(lambda sql: commits.append(1) if sql == "COMMIT" else None)
        return db

    def blocker(db: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)  # holds the thread while the other writes queue up

    async def run() -> None:
        writer = Writer(connect_counting)
        await writer.start()
        first = writer.submit(blocker)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        futures = [writer.submit(insert(n)) for n in range(100)]
        release.set()
        await first
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
