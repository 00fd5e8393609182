"""The store's writer: concurrent writes share one commit, each succeeds or fails on its own,
and none is answered before it is durable; on the loop when they can be, on its thread when
they must wait."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import platform
import queue
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from proxy.config import DatabaseConfig
from proxy.store import StoreBusy, StoreError, StoreUnavailable, Unsaved
from proxy.store import sqlite as sqlite_store
from proxy.store import writer as writer_module
from proxy.store.sqlite import SQLiteStore
from proxy.store.aio_fsync import _SYSCALLS, AioFsync
from proxy.store.writer import START_SYNC_AFTER, WAL_SIZE_LIMIT, Writer, busy_or
from tests.support import wait_for


def connect(path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=factory)
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


@contextlib.asynccontextmanager
async def started(writer: Writer) -> AsyncIterator[Writer]:
    """`writer`, started, and stopped when the block ends, however it ends: a test that fails
    leaves no writer thread running into the next."""
    await writer.start()
    try:
        yield writer
    except BaseException:
        # Bounded: a failing test may leave held what stop() waits for (the kernel's sync, a
        # checkpoint), and a stop that waited for good would hide the failure behind a hang.
        await asyncio.wait_for(writer.stop(), 5)
        raise
    await writer.stop()


def test_a_failing_write_is_rolled_back_alone_and_the_others_in_its_batch_commit(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> list:
        async with started(Writer(lambda: connect(path))) as writer:
            release = await hold(writer)
            # A duplicate key fails half-way through the batch these writes share: as one
            # statement, and as a write of several statements.
            futures = [writer.submit(insert(n), atomic=False) for n in (1, 2, 2, 3)]
            futures += [writer.submit(insert_both(n)) for n in (4, 5, 4, 6)]
            release.set()
            results = await asyncio.gather(*futures, return_exceptions=True)
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
        async with started(Writer(connect_counting)) as writer:
            release = await hold(writer)
            futures = [writer.submit(insert(n)) for n in range(100)]
            release.set()
            await asyncio.gather(*futures)

    asyncio.run(run())
    assert rows(path) == list(range(100))
    assert len(commits) == 2  # the blocker's batch, then all 100 together


def test_a_write_is_answered_only_once_it_is_committed(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(Writer(lambda: connect(path))) as writer:
            for n in range(20):
                await writer.submit(insert(n))
                assert n in rows(path)  # another connection sees it at once

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


def noting_connections(monkeypatch: pytest.MonkeyPatch) -> list[sqlite3.Connection]:
    """Every SQLite connection opened from now on, as it is opened."""
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def noting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", noting)
    return opened


def all_closed(connections: list[sqlite3.Connection]) -> bool:
    for connection in connections:
        try:
            connection.execute("SELECT 1")
        except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
            continue
        return False
    return True


def test_a_store_whose_file_is_not_a_database_fails_to_open_and_leaves_no_connection_open(tmp_path, monkeypatch):
    # Its settings failed on a connection that was then left to the garbage collector: Python 3.13
    # warns of each (ResourceWarning), a line more after `tollgate org list`'s one line of error.
    database = tmp_path / "not-a.db"
    database.write_text("this is not a database\n" * 100)
    opened = noting_connections(monkeypatch)
    with pytest.raises(sqlite3.DatabaseError, match="file is not a database"):
        asyncio.run(SQLiteStore(DatabaseConfig(url=f"sqlite:///{database}")).open())
    assert opened and all_closed(opened)


def test_a_store_refusing_a_newer_schema_leaves_no_connection_or_writer_thread_behind(tmp_path, monkeypatch):
    # The refusal comes after the writer has started (its thread and its connections open): they
    # were left running, closed only by the garbage collector, which Python 3.13 warns of.
    from proxy.store.schema import MIGRATIONS

    database = tmp_path / "newer.db"
    config = DatabaseConfig(url=f"sqlite:///{database}")
    asyncio.run(opened_and_closed(config))
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    opened = noting_connections(monkeypatch)
    threads_before = set(threading.enumerate())
    with pytest.raises(sqlite_store.SchemaTooNew):
        asyncio.run(SQLiteStore(config).open())
    assert opened and all_closed(opened)
    assert wait_for(lambda: set(threading.enumerate()) <= threads_before, timeout=5)


def test_a_store_refusing_a_newer_schema_leaves_its_journal_mode_as_it_found_it(tmp_path):
    # The writer, started before the schema was read, put the database in WAL mode for good: a
    # newer release that keeps its database in rollback mode found it changed by one that refused it.
    from proxy.store.schema import MIGRATIONS

    database = tmp_path / "newer.db"
    asyncio.run(opened_and_closed(DatabaseConfig(url=f"sqlite:///{database}")))
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (len(MIGRATIONS) + 1,))
        assert db.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    with pytest.raises(sqlite_store.SchemaTooNew):
        asyncio.run(SQLiteStore(DatabaseConfig(url=f"sqlite:///{database}")).open())
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


async def opened_and_closed(config: DatabaseConfig) -> None:
    store = SQLiteStore(config)
    await store.open()
    await store.close()


def test_a_write_submitted_after_stop_is_refused_not_left_waiting(tmp_path):
    async def run() -> None:
        writer = Writer(lambda: connect(tmp_path / "w.db"))
        await writer.start()
        await writer.stop()
        # Closed, not unavailable: a stop is no failure (no 503, no readiness failing for it).
        with pytest.raises(StoreError, match="closed") as refused:
            writer.submit(insert(1))
        assert not isinstance(refused.value, StoreUnavailable)

    asyncio.run(run())


class ThreadStopsFirst(queue.SimpleQueue):  # type: ignore[type-arg]
    """The writer's queue, on which the first write handed to the thread arrives only once the
    thread has stopped: it was seen alive, and it drained its queue and went just before."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: threading.Thread | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.thread is not None and isinstance(item, writer_module._Job):
            thread, self.thread = self.thread, None
            super().put(None)  # the thread stops, as it does at the end of a stop()
            thread.join(5)
        super().put(item)


def test_a_write_handed_to_the_writer_thread_as_it_stops_is_answered_not_left_waiting(tmp_path: Path) -> None:
    async def run() -> None:
        writer = Writer(lambda: connect(tmp_path / "w.db"))
        writer._queue = handoff = ThreadStopsFirst()
        await writer.start()
        handoff.thread = writer._thread
        try:
            write = writer.submit(insert(1))
            await asyncio.wait({write}, timeout=5)
        finally:
            await asyncio.wait_for(writer.stop(), 5)
        assert write.done(), "the write was never answered"
        assert isinstance(write.exception(), StoreError)

    asyncio.run(run())


class Boom(BaseException):
    """What no handler of a write's errors expects."""


def explode(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO t (n) VALUES (99)")
    raise Boom()


def test_a_write_that_blows_up_fails_alone_and_the_writer_carries_on(tmp_path):
    path = tmp_path / "w.db"

    def stop_iteration(db: sqlite3.Connection) -> None:
        next(iter(()))

    async def run() -> None:
        async with started(Writer(lambda: connect(path))) as writer:
            with pytest.raises(StoreError):
                await writer.submit(explode)
            with pytest.raises(RuntimeError):
                await writer.submit(stop_iteration)
            assert await writer.submit(insert(1)) == 1

    asyncio.run(run())
    assert rows(path) == [1]


def one_batch(
    path: Path, works: list[Callable[[sqlite3.Connection], Any]], after: int,
    factory: type[sqlite3.Connection] = sqlite3.Connection,
) -> list[BaseException | int]:
    """How each of `works`, submitted as one batch, is answered; the writer must then still
    commit `insert(after)`."""

    async def run() -> list[BaseException | int]:
        async with started(Writer(lambda: connect(path, factory))) as writer:
            release = await hold(writer)
            batch = [writer.submit(work) for work in works]
            release.set()
            outcomes = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 5)
            assert await asyncio.wait_for(writer.submit(insert(after)), 5) == after
            return outcomes

    return asyncio.run(run())


def test_a_write_that_blows_up_in_a_shared_batch_fails_the_batch_and_the_writer_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    outcomes = one_batch(path, [insert(1), explode, insert(3)], after=4)
    assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
    assert rows(path) == [4]


def test_a_write_of_several_statements_failing_alone_leaves_nothing_behind(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(Writer(lambda: connect(path))) as writer:
            await writer.submit(insert(4))
            with pytest.raises(sqlite3.IntegrityError):
                await writer.submit(insert_both(4))  # 1004 goes in, then 4 clashes

    asyncio.run(run())
    assert rows(path) == [4]


def test_when_a_failing_write_ends_its_batchs_transaction_each_other_write_hears_its_own_outcome(
    tmp_path: Path,
) -> None:
    # SQLite rolls a whole transaction back on some errors (a full disk, an I/O error): the
    # others go again without the one that failed.
    path = tmp_path / "w.db"

    def ends_the_transaction(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (n) VALUES (100)")
        db.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    async def run() -> list[BaseException | int]:
        async with started(Writer(lambda: connect(path))) as writer:
            release = await hold(writer)
            batch = [writer.submit(insert(1)), writer.submit(ends_the_transaction), writer.submit(insert(3))]
            release.set()
            return await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 5)

    first, failed, third = asyncio.run(run())
    assert (first, third) == (1, 3)
    assert isinstance(failed, sqlite3.OperationalError)
    assert rows(path) == [1, 3]


class SecondCommitFails(sqlite3.Connection):
    """The thread's connection, whose second COMMIT fails and leaves its transaction open, as a
    commit SQLite could not finish may."""

    commits = 0

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql == "COMMIT":
            SecondCommitFails.commits += 1
            if SecondCommitFails.commits == 2:
                raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


def test_a_batch_whose_commit_failed_leaves_no_transaction_open_for_the_next(tmp_path: Path) -> None:
    SecondCommitFails.commits = 0  # one_batch's hold is the first commit, the batch's the second
    path = tmp_path / "w.db"
    outcomes = one_batch(path, [insert(1), insert(2)], after=3, factory=SecondCommitFails)
    assert all(isinstance(outcome, sqlite3.OperationalError) for outcome in outcomes), outcomes
    assert rows(path) == [3]


# --- writes committed on the event loop ----------------------------------------------------


class Fsyncs:
    """Stands in for os.fdatasync: records what is synced, and can hold it up."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.allowed = threading.Event()
        self.allowed.set()
        self.error: OSError | None = None

    def __call__(self, fd: int) -> None:
        self.allowed.wait(10)
        if self.error is not None:
            raise self.error
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fdatasync(fd)


def loop_writer(
    path: Path,
    fsyncs: Fsyncs | None = None,
    trace: list[str] | None = None,
    kernel: Callable | None = None,
    thread_connection: type[sqlite3.Connection] = sqlite3.Connection,
) -> Writer:
    def on_loop() -> sqlite3.Connection:
        db = connect(path)
        for pragma in ("PRAGMA busy_timeout = 0", "PRAGMA synchronous = NORMAL", "PRAGMA wal_autocheckpoint = 0"):
            db.execute(pragma)
        if trace is not None:
            db.set_trace_callback(trace.append)
        return db

    return Writer(
        lambda: connect(path, thread_connection), on_loop, sync_wal=True, fsync=fsyncs or Fsyncs(), fsync_from_loop=kernel
    )


def insert_noting_thread(n: int, threads: set[int]):
    def work(db: sqlite3.Connection) -> int:
        threads.add(threading.get_ident())
        return insert(n)(db)

    return work


def test_writes_of_one_turn_of_the_loop_commit_together_on_the_loop_itself(tmp_path):
    path = tmp_path / "w.db"
    trace: list[str] = []
    threads: set[int] = set()

    async def run() -> None:
        async with started(loop_writer(path, trace=trace)) as writer:
            await asyncio.gather(*(writer.submit(insert_noting_thread(n, threads)) for n in range(100)))

    asyncio.run(run())
    assert rows(path) == list(range(100))
    assert threads == {threading.get_ident()}
    assert trace.count("COMMIT") == 1


def test_a_durable_write_is_answered_only_once_the_wal_is_on_disk(tmp_path):
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            fsyncs.allowed.clear()
            write = writer.submit(insert(1))
            await asyncio.sleep(0.2)
            assert rows(path) == [1]  # committed...
            assert not write.done()  # ...but not yet on disk: not answered
            fsyncs.allowed.set()
            assert await write == 1

    asyncio.run(run())
    assert fsyncs.paths == [f"{os.path.realpath(path)}-wal"]


def test_a_caller_cancelled_while_its_write_waits_hears_of_it_only_once_the_write_is_durable(tmp_path):
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            fsyncs.allowed.clear()
            write = writer.submit(insert(1))
            caller = asyncio.ensure_future(write_awaited(write))
            await asyncio.sleep(0.2)
            caller.cancel()
            await asyncio.sleep(0.1)
            assert not caller.done() and not write.cancelled()  # the cancellation waits for the write
            fsyncs.allowed.set()
            with pytest.raises(asyncio.CancelledError):
                await caller
            assert write.result() == 1

    asyncio.run(run())
    assert rows(path) == [1]


async def write_awaited(write: asyncio.Future) -> object:
    return await write


def test_a_write_that_need_not_be_durable_is_answered_at_its_commit(tmp_path):
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            fsyncs.allowed.clear()
            assert await asyncio.wait_for(writer.submit(insert(1), durable=False), 2) == 1
            assert rows(path) == [1]
            assert fsyncs.paths == []  # answered before any fsync
            fsyncs.allowed.set()

    asyncio.run(run())


def test_a_writer_that_does_not_fsync_the_wal_answers_writes_on_the_loop_at_their_commit(tmp_path: Path) -> None:
    # synchronous = NORMAL: the store makes no fsync of its own, durable or not.
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    def on_loop() -> sqlite3.Connection:
        db = connect(path)
        db.execute("PRAGMA busy_timeout = 0")
        return db

    async def run() -> None:
        async with started(Writer(lambda: connect(path), on_loop, sync_wal=False, fsync=fsyncs)) as writer:
            assert await asyncio.wait_for(writer.submit(insert(1), durable=False), 5) == 1
            await asyncio.sleep(START_SYNC_AFTER + 0.2)  # when a sync for it would have come
            assert await asyncio.wait_for(writer.submit(insert(2)), 5) == 2

    asyncio.run(run())
    assert rows(path) == [1, 2]
    assert fsyncs.paths == []


def test_a_write_answered_at_its_commit_is_fsynced_soon_though_no_durable_write_follows(tmp_path):
    # A call's start, with no call ending after it: a stream runs for minutes, and a power cut
    # meanwhile left no record of a call its client was seeing answered.
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            await writer.submit(insert(1), durable=False)
            assert await asyncio.to_thread(wait_for, lambda: fsyncs.paths, START_SYNC_AFTER + 2)

    asyncio.run(run())
    assert fsyncs.paths == [f"{os.path.realpath(path)}-wal"]


def test_a_write_answered_at_its_commit_is_synced_by_the_kernel_soon_though_no_durable_write_follows(tmp_path):
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        async with started(loop_writer(path, kernel=kernel.open)) as writer:
            await writer.submit(insert(1), durable=False)
            await asyncio.sleep(START_SYNC_AFTER + 0.2)
            assert kernel.paths == [f"{os.path.realpath(path)}-wal"]
            kernel.end()

    asyncio.run(run())


def test_a_write_answered_at_its_commit_costs_no_fsync_of_its_own_when_a_durable_write_follows(tmp_path):
    # The common case: a call's end comes within a moment of its start, and its fsync covers both.
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            await writer.submit(insert(1), durable=False)
            await writer.submit(insert(2))
            await asyncio.sleep(START_SYNC_AFTER + 0.2)

    asyncio.run(run())
    assert len(fsyncs.paths) == 1


def test_a_write_answered_at_its_commit_that_failed_costs_no_fsync(tmp_path: Path) -> None:
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(tmp_path / "w.db", fsyncs)) as writer:
            await writer.submit(insert(1))
            synced = len(fsyncs.paths)
            with pytest.raises(sqlite3.IntegrityError):
                await writer.submit(insert(1), durable=False)  # nothing of it committed
            await asyncio.sleep(START_SYNC_AFTER + 0.2)  # when a sync for it would have come
            assert len(fsyncs.paths) == synced

    asyncio.run(run())


def test_writes_answered_at_their_commit_after_a_sync_began_get_one_of_their_own(tmp_path):
    # A sync running when they committed began before them, and does not cover them.
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        async with started(loop_writer(path, kernel=kernel.open)) as writer:
            durable = writer.submit(insert(1))
            await asyncio.sleep(0.01)
            await writer.submit(insert(2), durable=False)
            assert len(kernel.paths) == 1
            await asyncio.sleep(START_SYNC_AFTER + 0.1)
            kernel.end()  # the first write's
            assert await durable == 1
            await asyncio.sleep(START_SYNC_AFTER + 0.2)
            assert len(kernel.paths) == 2
            kernel.end()

    asyncio.run(run())


def test_a_write_answered_at_its_commit_costs_no_fsync_of_its_own_when_a_sync_begins_right_after_it(
    tmp_path: Path,
) -> None:
    # A durable write committed before it waited for the sync running: the next sync, begun once
    # that one ended, covers both.
    kernel = KernelSyncs()

    async def run() -> None:
        async with started(loop_writer(tmp_path / "w.db", kernel=kernel.open)) as writer:
            try:
                first = writer.submit(insert(1))
                assert not await settled(first)  # its sync runs
                second = writer.submit(insert(2))
                assert not await settled(second)  # committed, waits for the next sync
                await writer.submit(insert(3), durable=False)
                kernel.end()
                assert await first == 1
                assert len(kernel.paths) == 2  # the next sync, begun after the third write's commit
                kernel.end()
                assert await second == 2
                await asyncio.sleep(START_SYNC_AFTER + 0.2)  # when a sync of its own would have come
                assert len(kernel.paths) == 2
            finally:
                if kernel.running is not None:
                    kernel.end()

    asyncio.run(run())


def test_a_write_answered_at_its_commit_just_before_the_store_stops_is_fsynced_before_it_closes(tmp_path):
    # stop() cancelled the timer of its fsync: a call's start committed in the last 0.1 s was left
    # to SQLite's close, which fsyncs nothing while another process still has the database open.
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()
    other = connect(path)  # another process sharing the database
    other.execute("SELECT 1 FROM sqlite_master").fetchall()

    async def run() -> None:
        writer = loop_writer(path, fsyncs)
        await writer.start()
        await writer.submit(insert(1), durable=False)
        await writer.stop()

    asyncio.run(run())
    other.close()
    assert fsyncs.paths == [f"{os.path.realpath(path)}-wal"]


def test_stop_waits_for_the_kernels_sync_of_writes_answered_at_their_commit(tmp_path):
    # Such a sync is for no write waiting on it, and stop() closed Linux AIO under it: io_destroy
    # then blocks the event loop until the disk is done.
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        writer = loop_writer(path, kernel=kernel.open)
        await writer.start()
        await writer.submit(insert(1), durable=False)
        await asyncio.sleep(START_SYNC_AFTER + 0.2)
        assert kernel.busy
        stopping = asyncio.ensure_future(writer.stop())
        await asyncio.sleep(0.05)
        assert not kernel.closed
        kernel.end()
        await stopping
        assert kernel.closed

    asyncio.run(run())


def test_a_writer_that_takes_no_more_writes_stops_though_a_write_answered_at_its_commit_was_never_fsynced(
    tmp_path: Path,
) -> None:
    # No fsync may come for it: stop() must not wait for one.
    path = tmp_path / "w.db"

    async def run() -> None:
        writer = loop_writer(path)
        await writer.start()
        await writer.submit(insert(1), durable=False)
        os.unlink(f"{path}-shm")  # found out at once, before the write's fsync is due
        with pytest.raises(StoreUnavailable):
            writer.check()
        await asyncio.wait_for(writer.stop(), 5)

    asyncio.run(run())


def test_a_failed_fsync_fails_the_writes_it_was_for_and_the_store_takes_no_more(tmp_path):
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()
    fsyncs.error = OSError(5, "Input/output error")

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            with pytest.raises(StoreError, match="may not be on disk"):
                await asyncio.wait_for(writer.submit(insert(1)), 5)
            # Linux marks the lost pages clean: a later fsync would succeed without them.
            fsyncs.error = None
            with pytest.raises(StoreError, match="no more writes"):
                writer.submit(insert(2))

    asyncio.run(run())
    assert fsyncs.paths == []
    assert rows(path) == [1]  # committed: its caller was told it may not be on disk, not that it failed


def test_a_write_whose_fsync_failed_is_told_so_with_what_it_returned(tmp_path):
    # The store answers such a write as done (the database holds it): it needs the result.
    fsyncs = Fsyncs()
    fsyncs.error = OSError(5, "Input/output error")

    def insert_and_count(db: sqlite3.Connection) -> int:
        insert(7)(db)
        return db.execute("SELECT COUNT(*) FROM t").fetchone()[0]

    async def run() -> Unsaved:
        async with started(loop_writer(tmp_path / "w.db", fsyncs)) as writer:
            with pytest.raises(Unsaved) as raised:
                await asyncio.wait_for(writer.submit(insert_and_count), 5)
            return raised.value

    assert asyncio.run(run()).value == 1


def test_after_a_failed_fsync_the_writes_are_refused_as_store_unavailable(tmp_path):
    fsyncs = Fsyncs()
    fsyncs.error = OSError(5, "Input/output error")

    async def run() -> None:
        async with started(loop_writer(tmp_path / "w.db", fsyncs)) as writer:
            with pytest.raises(StoreUnavailable, match="may not be on disk"):
                await asyncio.wait_for(writer.submit(insert(1)), 5)
            with pytest.raises(StoreUnavailable, match="no more writes.*Input/output error"):
                writer.submit(insert(2))
            with pytest.raises(StoreUnavailable, match="no more writes.*Input/output error"):
                writer.check()

    asyncio.run(run())


def test_a_full_disk_is_store_unavailable(tmp_path):
    def fill(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA max_page_count = 1")  # as small as the file already is: a full disk
        db.execute("WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s LIMIT 100000) "
                   "INSERT INTO t SELECT n FROM s")

    async def run() -> None:
        async with started(loop_writer(tmp_path / "w.db")) as writer:
            with pytest.raises(StoreUnavailable, match="SQLITE_FULL"):
                await writer.submit(fill)

    asyncio.run(run())
    assert rows(tmp_path / "w.db") == []


def read_only(path: Path) -> sqlite3.Error:
    connect(path).close()
    try:
        sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("INSERT INTO t VALUES (1)")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("a read-only database took a write")


def cannot_open(path: Path) -> sqlite3.Error:
    try:
        sqlite3.connect(path / "missing" / "w.db")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("a database in a missing directory opened")


def locked(path: Path) -> sqlite3.Error:
    holder = connect(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        sqlite3.connect(path, timeout=0).execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        return exc
    finally:
        holder.close()
    raise AssertionError("a locked database took a write")


@pytest.mark.parametrize("error, expected", [
    (read_only, StoreUnavailable),
    (cannot_open, StoreUnavailable),
    (locked, StoreBusy),
])
def test_sqlite_errors_that_mean_the_database_cannot_be_written_now_are_store_unavailable(tmp_path, error, expected):
    assert isinstance(busy_or(error(tmp_path / "w.db")), expected)


def test_a_file_that_is_not_a_database_is_an_outage_not_a_fault_of_the_request(tmp_path: Path) -> None:
    # SQLite's "file is not a database" (a file put in the database's place) is a DatabaseError
    # like a damaged page's: the database cannot be written now, whatever the request.
    path = tmp_path / "w.db"
    path.write_bytes(b"not a database" * 512)
    try:
        sqlite3.connect(path).execute("SELECT * FROM sqlite_master")
    except sqlite3.Error as exc:
        error = exc
    else:
        raise AssertionError("a file that is no database was read as one")
    assert isinstance(busy_or(error), StoreUnavailable)


def test_a_damaged_database_file_is_an_outage_not_a_fault_of_the_request(tmp_path):
    # SQLite's "database disk image is malformed" is a DatabaseError, not an OperationalError:
    # it escaped as itself, a 500 (a /metrics scrape too, which goes on without the balances
    # when the store is unavailable).
    path = tmp_path / "s.db"

    async def run() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            await store.create_organization("org", "Org")
            for n in range(200):  # pages enough to damage one the reads need but not the schema's
                await store.create_organization(f"org-{n}", "x" * 500)
        finally:
            await store.close()  # the WAL copied into the file
        with open(path, "r+b") as file:  # a page of the table, overwritten with garbage
            file.seek(4096 * 3)
            file.write(b"\xff" * 4096)
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            with pytest.raises(StoreUnavailable, match="SQLITE_CORRUPT"):
                await store.list_organizations()
        finally:
            await store.close()

    asyncio.run(run())


def test_the_ping_of_a_store_that_takes_no_more_writes_fails_saying_why(tmp_path, monkeypatch):
    async def stop_taking_writes(store: SQLiteStore, fsyncs: Fsyncs) -> None:
        await store.ping()
        fsyncs.error = OSError(5, "Input/output error")
        await store.create_organization("org", "Org")  # committed, so answered; its fsync fails

    _assert_the_ping_fails_for_want_of_saving(tmp_path, monkeypatch, stop_taking_writes)


def test_the_ping_whose_probe_write_is_committed_but_not_saved_fails(tmp_path, monkeypatch):
    # A write committed before its fsync failed is answered as done; the probe must not be: a
    # readiness probe that made the store stop taking writes would have said it was ready.
    async def fail_the_probes_fsync(store: SQLiteStore, fsyncs: Fsyncs) -> None:
        # A write refused for want of disk earlier: the ping probes with a write of its own.
        store._unwritable = StoreUnavailable("The database cannot be written now: database or disk is full")
        fsyncs.error = OSError(5, "Input/output error")

    _assert_the_ping_fails_for_want_of_saving(tmp_path, monkeypatch, fail_the_probes_fsync)


def _assert_the_ping_fails_for_want_of_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: Callable[[SQLiteStore, Fsyncs], Awaitable[None]]
) -> None:
    """The ping of a store whose fsyncs fail on demand, after `before`, fails saying why."""
    fsyncs = Fsyncs()
    monkeypatch.setattr(sqlite_store, "Writer", functools.partial(Writer, fsync=fsyncs))

    async def run() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 's.db'}", aio_fsync=False))
        await store.open()
        try:
            await before(store, fsyncs)
            with pytest.raises(StoreUnavailable, match="saving to disk failed.*Input/output error"):
                await store.ping()
        finally:
            await store.close()

    asyncio.run(run())


def test_the_wal_synced_is_the_one_sqlite_writes_when_the_path_is_a_symbolic_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    path = tmp_path / "link" / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            await writer.submit(insert(1))

    asyncio.run(run())
    assert fsyncs.paths == [str(tmp_path / "real" / "w.db-wal")]


def test_a_loop_connection_that_cannot_be_opened_fails_start_and_stops_the_thread(tmp_path):
    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    async def run() -> None:
        writer = Writer(lambda: connect(tmp_path / "w.db"), broken, sync_wal=True)
        with pytest.raises(sqlite3.OperationalError):
            await writer.start()
        assert not any(t.name == "tollgate-sqlite-writer" for t in threading.enumerate())

    asyncio.run(run())


def test_writes_wait_for_another_processs_lock_on_the_thread_while_the_loop_runs_on(tmp_path):
    path = tmp_path / "w.db"
    other = connect(path)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def run() -> None:
        async with started(loop_writer(path)) as writer:
            ticker = asyncio.create_task(tick())
            first = writer.submit(insert(1))
            await asyncio.sleep(0.05)
            later = [writer.submit(insert(n)) for n in range(2, 6)]  # queue behind the first
            asyncio.get_running_loop().call_later(0.5, other.rollback)
            assert await asyncio.wait_for(asyncio.gather(first, *later), 5) == [1, 2, 3, 4, 5]
            ticker.cancel()
            # and once the thread has no writes left, the loop commits again
            await writer.submit(insert(6))

    asyncio.run(run())
    assert ticks >= 30  # the loop was never held up by the lock
    assert rows(path) == [1, 2, 3, 4, 5, 6]


def test_writes_of_one_turn_that_find_the_lock_taken_wait_for_it_on_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    other = connect(path)

    async def run() -> list[int]:
        async with started(loop_writer(path)) as writer:
            other.execute("BEGIN IMMEDIATE")  # another process's write transaction
            writes = [writer.submit(insert(n)) for n in (1, 2)]  # one transaction on the loop, refused
            assert not await settled(asyncio.gather(*writes))
            other.rollback()
            return await asyncio.wait_for(asyncio.gather(*writes), 5)

    assert asyncio.run(run()) == [1, 2]
    other.close()
    assert rows(path) == [1, 2]


def test_checkpoints_keep_the_wal_from_growing(tmp_path, monkeypatch):
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 20)
    path = tmp_path / "w.db"

    def insert_page(n: int):
        def work(db: sqlite3.Connection) -> None:
            db.execute("CREATE TABLE IF NOT EXISTS pages (n INTEGER PRIMARY KEY, filler BLOB)")
            db.execute("INSERT INTO pages VALUES (?, ?)", (n, os.urandom(4000)))

        return work

    async def run() -> int:
        async with started(loop_writer(path)) as writer:
            for n in range(600):  # one commit each: about 2.4 MB of WAL without checkpoints
                await writer.submit(insert_page(n))
            size = os.path.getsize(f"{path}-wal")
        return size

    assert asyncio.run(run()) < 600_000


def test_readers_that_always_overlap_do_not_keep_the_wal_growing(tmp_path, monkeypatch):
    # A passive checkpoint cannot copy what an open snapshot needs, nor can the WAL start over
    # while anyone reads from it: with two readers taking turns, one is always reading.
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 20)
    monkeypatch.setattr("proxy.store.writer.RESTART_AT_FRAMES", 200)
    path = tmp_path / "w.db"
    with connect(path) as db:
        db.execute("CREATE TABLE pages (n INTEGER PRIMARY KEY, filler BLOB)")
    stop = threading.Event()

    def insert_page(n: int):
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO pages VALUES (?, ?)", (n, os.urandom(4000)))

        return work

    def report(start_after: float) -> None:
        db = sqlite3.connect(path, isolation_level=None)
        stop.wait(start_after)
        while not stop.is_set():
            db.execute("BEGIN")
            db.execute("SELECT count(*) FROM pages").fetchall()
            stop.wait(0.004)
            db.execute("COMMIT")
        db.close()

    async def run() -> int:
        async with started(loop_writer(path)) as writer:
            readers = [threading.Thread(target=report, args=(delay,)) for delay in (0, 0.002)]
            for reader in readers:
                reader.start()
            try:
                for n in range(1500):  # about 6 MB of pages, and 18 MB of WAL if it never starts over
                    await writer.submit(insert_page(n))
                    await asyncio.sleep(0.0005)
                return os.path.getsize(f"{path}-wal")
            finally:
                stop.set()
                for reader in readers:
                    reader.join()

    assert asyncio.run(run()) < 3_000_000


def test_a_wal_that_grew_is_cut_back_when_it_starts_over(tmp_path, monkeypatch):
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 10_000)  # none until the test asks
    store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path}/t.db"))
    wal = tmp_path / "t.db-wal"

    async def run() -> tuple[int, int]:
        await store.open()
        try:
            def grow(db: sqlite3.Connection) -> None:
                db.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
                db.execute("INSERT INTO filler VALUES (zeroblob(?))", (WAL_SIZE_LIMIT + 1_000_000,))

            await store._writer.submit(grow)
            grown = os.path.getsize(wal)
            with sqlite3.connect(tmp_path / "t.db") as db:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await store._writer.submit(lambda db: db.execute("INSERT INTO filler VALUES (x'00')"))  # starts it over
            return grown, os.path.getsize(wal)
        finally:
            await store.close()

    grown, after = asyncio.run(run())
    assert grown > WAL_SIZE_LIMIT
    assert after <= WAL_SIZE_LIMIT


class HeldCheckpoints(sqlite3.Connection):
    """The thread's connection, which holds the checkpoint passes numbered in `held` (from 1)
    until the test lets them run."""

    held: set[int] = set()
    passes = 0
    running = threading.Event()
    release = threading.Event()

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA wal_checkpoint"):
            HeldCheckpoints.passes += 1
            if HeldCheckpoints.passes in HeldCheckpoints.held:
                HeldCheckpoints.running.set()
                HeldCheckpoints.release.wait(10)
        return super().execute(sql, *args)


@pytest.fixture
def held_checkpoints(monkeypatch):
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)  # one after every commit on the loop
    HeldCheckpoints.passes = 0
    HeldCheckpoints.running.clear()
    HeldCheckpoints.release.clear()
    yield HeldCheckpoints
    HeldCheckpoints.release.set()


def test_writes_made_while_a_checkpoint_makes_its_first_pass_commit_on_the_loop_at_once(tmp_path, held_checkpoints):
    held_checkpoints.held = {1}
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(loop_writer(path, kernel=AioFsync.open, thread_connection=held_checkpoints)) as writer:
            assert await writer.submit(insert(1)) == 1  # its commit starts a checkpoint
            await asyncio.get_running_loop().run_in_executor(None, held_checkpoints.running.wait, 5)
            # committed and synced (by the kernel) while the checkpoint's first pass is still held
            assert await asyncio.wait_for(asyncio.gather(*(writer.submit(insert(n)) for n in range(2, 6))), 5) == [
                2, 3, 4, 5
            ]
            held_checkpoints.release.set()

    asyncio.run(run())
    assert rows(path) == [1, 2, 3, 4, 5]


def test_writes_made_while_a_checkpoint_makes_its_closing_pass_wait_for_it_and_then_commit_together(
    tmp_path, held_checkpoints
):
    held_checkpoints.held = {2}
    path = tmp_path / "w.db"
    trace: list[str] = []
    threads: set[int] = set()

    async def run() -> None:
        async with started(loop_writer(path, trace=trace, thread_connection=held_checkpoints)) as writer:
            assert await writer.submit(insert_noting_thread(1, threads), atomic=False) == 1  # starts a checkpoint
            await asyncio.get_running_loop().run_in_executor(None, held_checkpoints.running.wait, 5)
            later = [writer.submit(insert_noting_thread(n, threads)) for n in range(2, 6)]
            assert not await settled(asyncio.gather(*later))
            assert rows(path) == [1] and trace.count("COMMIT") == 0  # not committed anywhere yet
            held_checkpoints.release.set()
            assert await asyncio.wait_for(asyncio.gather(*later), 5) == [2, 3, 4, 5]

    asyncio.run(run())
    assert rows(path) == [1, 2, 3, 4, 5]
    assert threads == {threading.get_ident()}  # all on the loop, none on the thread
    assert trace.count("COMMIT") == 1  # the four that waited, together


class StagedCheckpoints(sqlite3.Connection):
    """The thread's connection, whose checkpoint passes (numbered from 1) each wait for the
    test's word, and say when they start and when they are over."""

    started: dict[int, threading.Event] = {}
    go: dict[int, threading.Event] = {}
    over: dict[int, threading.Event] = {}
    passes = 0

    @classmethod
    def reset(cls) -> None:
        cls.passes = 0
        cls.started, cls.go, cls.over = ({n: threading.Event() for n in (1, 2, 3)} for _ in range(3))

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if not sql.startswith("PRAGMA wal_checkpoint"):
            return super().execute(sql, *args)
        StagedCheckpoints.passes += 1
        number = StagedCheckpoints.passes
        StagedCheckpoints.started[number].set()
        StagedCheckpoints.go[number].wait(10)
        try:
            return super().execute(sql, *args)
        finally:
            StagedCheckpoints.over[number].set()


def test_a_write_submitted_just_as_a_first_pass_ends_waits_for_the_closing_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its turn on the loop was asked for before the first pass's end was heard: the closing
    # pass had begun by the time it came.
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)
    StagedCheckpoints.reset()
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(loop_writer(path, thread_connection=StagedCheckpoints)) as writer:
            try:
                await writer.submit(insert(1))  # its commit starts a checkpoint
                await asyncio.get_running_loop().run_in_executor(None, StagedCheckpoints.started[1].wait, 5)
                StagedCheckpoints.go[1].set()
                # The loop held up (no await) until the first pass's end is on its way to it.
                assert StagedCheckpoints.over[1].wait(5)
                time.sleep(0.1)
                write = writer.submit(insert(2))
                await asyncio.get_running_loop().run_in_executor(None, StagedCheckpoints.started[2].wait, 5)
                assert not await settled(write)
                assert rows(path) == [1]  # not committed while the closing pass runs
                StagedCheckpoints.go[2].set()
                StagedCheckpoints.go[3].set()
                assert await asyncio.wait_for(write, 5) == 2
            finally:
                for event in StagedCheckpoints.go.values():
                    event.set()

    asyncio.run(run())
    assert rows(path) == [1, 2]


async def checkpoint_over(writer: Writer) -> None:
    """Until the writer's running checkpoint, both passes, has ended on the loop."""
    for _ in range(500):
        if not writer._checkpoint_running:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the checkpoint never ended")


def test_a_commit_during_a_checkpoint_starts_no_second_one(tmp_path: Path, held_checkpoints: type) -> None:
    held_checkpoints.held = {1}

    async def run() -> None:
        async with started(
            loop_writer(tmp_path / "w.db", kernel=AioFsync.open, thread_connection=held_checkpoints)
        ) as writer:
            await writer.submit(insert(1))  # its commit starts a checkpoint (one after every commit)
            await asyncio.get_running_loop().run_in_executor(None, held_checkpoints.running.wait, 5)
            await asyncio.wait_for(asyncio.gather(*(writer.submit(insert(n)) for n in range(2, 6))), 5)
            held_checkpoints.release.set()
            await checkpoint_over(writer)

    asyncio.run(run())
    assert held_checkpoints.passes == 2  # the first checkpoint's two passes, and no other


def test_a_checkpoint_comes_once_every_so_many_commits_on_the_loop(
    tmp_path: Path, held_checkpoints: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 3)
    held_checkpoints.held = set()

    async def run() -> None:
        async with started(loop_writer(tmp_path / "w.db", thread_connection=held_checkpoints)) as writer:
            for n in range(9):
                await writer.submit(insert(n))
                await checkpoint_over(writer)

    asyncio.run(run())
    assert held_checkpoints.passes == 3 * 2


def test_after_a_checkpoint_waited_for_readers_the_thread_waits_for_a_lock_as_long_as_before(
    tmp_path: Path, held_checkpoints: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The closing pass shortens the busy timeout to RESTART_WAIT while it waits: only for itself.
    monkeypatch.setattr("proxy.store.writer.RESTART_AT_FRAMES", 0)  # every closing pass waits
    held_checkpoints.held = set()
    path = tmp_path / "w.db"
    other = connect(path)

    async def run() -> int:
        async with started(loop_writer(path, thread_connection=held_checkpoints)) as writer:
            await writer.submit(insert(1))  # its commit starts a checkpoint
            await checkpoint_over(writer)
            other.execute("BEGIN IMMEDIATE")  # another process's write transaction
            asyncio.get_running_loop().call_later(1.0, other.rollback)  # well past RESTART_WAIT
            return await asyncio.wait_for(writer.submit(insert(2)), 5)

    assert asyncio.run(run()) == 2
    other.close()
    assert rows(path) == [1, 2]


class NotedCheckpoints(sqlite3.Connection):
    """The thread's connection, which notes its checkpoints' statements; `restart_at_first`:
    at the first, RESTART_AT_FRAMES is set to the pages then in the WAL."""

    statements: list[str] = []
    restart_at_first = False

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA wal_checkpoint"):
            if NotedCheckpoints.restart_at_first and not NotedCheckpoints.statements:
                ((_, _, main),) = [row for row in super().execute("PRAGMA database_list") if row[1] == "main"]
                # A WAL never started over: a header, then its pages, each with its own.
                writer_module.RESTART_AT_FRAMES = (os.path.getsize(f"{main}-wal") - 32) // (24 + 4096)
            NotedCheckpoints.statements.append(sql)
        return super().execute(sql, *args)


@pytest.fixture
def noted_checkpoints(monkeypatch: pytest.MonkeyPatch) -> type[NotedCheckpoints]:
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)  # one after every commit on the loop
    monkeypatch.setattr("proxy.store.writer.RESTART_AT_FRAMES", writer_module.RESTART_AT_FRAMES)  # put back after
    NotedCheckpoints.statements = []
    NotedCheckpoints.restart_at_first = False
    return NotedCheckpoints


async def checkpointed_writes(path: Path, count: int) -> None:
    """`count` writes, each followed by the checkpoint its commit starts."""
    async with started(loop_writer(path, thread_connection=NotedCheckpoints)) as writer:
        for n in range(count):
            await writer.submit(insert(n))
            await checkpoint_over(writer)


def test_a_closing_pass_waits_for_readers_once_the_wal_holds_restart_at_frames_pages(
    tmp_path: Path, noted_checkpoints: type[NotedCheckpoints]
) -> None:
    noted_checkpoints.restart_at_first = True
    asyncio.run(checkpointed_writes(tmp_path / "w.db", 1))
    assert noted_checkpoints.statements == ["PRAGMA wal_checkpoint(PASSIVE)", "PRAGMA wal_checkpoint(RESTART)"]


def test_a_checkpoints_first_pass_never_waits_for_readers_however_long_the_wal(
    tmp_path: Path, noted_checkpoints: type[NotedCheckpoints], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes commit on the loop meanwhile: a pass that waited would hold them up.
    monkeypatch.setattr("proxy.store.writer.RESTART_AT_FRAMES", 0)
    asyncio.run(checkpointed_writes(tmp_path / "w.db", 2))
    assert noted_checkpoints.statements[0::2] == ["PRAGMA wal_checkpoint(PASSIVE)"] * 2


def test_stop_waits_for_a_running_checkpoint_then_commits_what_waited_for_it(tmp_path, held_checkpoints):
    held_checkpoints.held = {2}
    path = tmp_path / "w.db"

    async def run() -> int:
        writer = loop_writer(path, thread_connection=held_checkpoints)
        await writer.start()
        await writer.submit(insert(1))
        await asyncio.get_running_loop().run_in_executor(None, held_checkpoints.running.wait, 5)
        waiting = writer.submit(insert(2))
        stopping = asyncio.ensure_future(writer.stop())
        assert not await settled(stopping)
        held_checkpoints.release.set()
        await asyncio.wait_for(stopping, 5)
        return await waiting

    assert asyncio.run(run()) == 2
    assert rows(path) == [1, 2]


def test_two_stops_during_a_checkpoint_both_return_and_a_stop_given_up_on_leaves_the_next_one_working(
    tmp_path: Path, held_checkpoints: type
) -> None:
    held_checkpoints.held = {2}

    async def run() -> None:
        writer = loop_writer(tmp_path / "w.db", thread_connection=held_checkpoints)
        await writer.start()
        await writer.submit(insert(1))  # its commit starts a checkpoint
        await asyncio.get_running_loop().run_in_executor(None, held_checkpoints.running.wait, 5)
        given_up = asyncio.ensure_future(writer.stop())
        assert not await settled(given_up)
        given_up.cancel()
        stops = [asyncio.ensure_future(writer.stop()) for _ in range(2)]
        assert not await settled(asyncio.gather(*stops))
        held_checkpoints.release.set()
        await asyncio.wait_for(asyncio.gather(*stops), 5)

    asyncio.run(run())


class BrokenCheckpoints(sqlite3.Connection):
    """The thread's connection, whose closing checkpoint pass raises what no handler expects."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA wal_checkpoint"):
            HeldCheckpoints.passes += 1
            if HeldCheckpoints.passes == 2:
                HeldCheckpoints.running.set()
                HeldCheckpoints.release.wait(10)
                raise RuntimeError("the checkpoint blew up")
        return super().execute(sql, *args)


async def writes_waiting_for_a_closing_pass_that_blows_up(writer: Writer, checkpoints: type) -> list[BaseException]:
    """What the writes (of 2 and 3) that waited on the loop for a closing pass that blew up
    came to; the writer's thread connection BrokenCheckpoints, under `held_checkpoints`."""
    await writer.submit(insert(1))  # starts a checkpoint
    await asyncio.get_running_loop().run_in_executor(None, checkpoints.running.wait, 5)
    waiting = [writer.submit(insert(n)) for n in range(2, 4)]
    checkpoints.release.set()
    return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)


def test_writes_waiting_for_a_closing_pass_that_blows_up_are_answered_not_left_waiting(tmp_path, held_checkpoints):
    path = tmp_path / "w.db"

    async def run() -> list:
        writer = loop_writer(path, thread_connection=BrokenCheckpoints)
        await writer.start()
        outcomes = await writes_waiting_for_a_closing_pass_that_blows_up(writer, held_checkpoints)
        # The writer has stopped: refused as unavailable (a 503, readiness failing), not a 500.
        with pytest.raises(StoreUnavailable, match="no more writes.*writer thread stopped"):
            await asyncio.wait_for(writer.submit(insert(9)), 5)
        await asyncio.wait_for(writer.stop(), 5)
        return outcomes

    outcomes = asyncio.run(run())
    assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes


def test_writes_waiting_for_a_closing_pass_that_blows_up_are_refused_not_committed(
    tmp_path: Path, held_checkpoints: type
) -> None:
    # The writer thread is gone: the store takes no more writes, those that waited included.
    path = tmp_path / "w.db"

    async def run() -> list[BaseException]:
        writer = loop_writer(path, thread_connection=BrokenCheckpoints)
        await writer.start()
        try:
            return await writes_waiting_for_a_closing_pass_that_blows_up(writer, held_checkpoints)
        finally:
            await asyncio.wait_for(writer.stop(), 5)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, StoreUnavailable) and not isinstance(o, Unsaved) for o in outcomes), outcomes
    assert rows(path) == [1]


def test_once_the_lock_is_had_writes_return_to_the_loop_though_others_are_still_on_the_thread(tmp_path):
    path = tmp_path / "w.db"
    other = connect(path)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    slow_started, slow_release = threading.Event(), threading.Event()

    def slow(db: sqlite3.Connection) -> None:
        slow_started.set()
        slow_release.wait(10)
        insert(2)(db)

    async def run() -> None:
        async with started(loop_writer(path)) as writer:
            first = writer.submit(insert(1))  # finds the lock taken: the thread waits for it
            await asyncio.sleep(0.2)
            second = writer.submit(slow, atomic=False)  # follows it to the thread; holds no lock while slow
            other.rollback()
            await asyncio.wait_for(first, 5)
            await asyncio.get_running_loop().run_in_executor(None, slow_started.wait, 5)
            # Under steady load there is always some write on the thread: the loop must not
            # wait for all of them to be answered before it commits writes again.
            assert await asyncio.wait_for(writer.submit(insert(3), durable=False), 2) == 3
            assert not second.done()
            slow_release.set()
            await second

    asyncio.run(run())
    assert rows(path) == [1, 2, 3]


def test_a_durable_write_committed_on_the_loop_is_not_held_up_by_a_write_on_the_thread_waiting_for_a_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()
    other = connect(path)

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            fsyncs.allowed.clear()
            first = writer.submit(insert(0))  # its fsync holds the thread up meanwhile
            assert not await settled(first)
            synced = writer.submit(insert(1))  # committed on the loop: its fsync queues on the thread
            assert not await settled(synced)
            other.execute("BEGIN IMMEDIATE")  # another process's write transaction
            waiting = writer.submit(insert(2))  # finds the lock taken: queues on the thread too
            assert not await settled(waiting)
            fsyncs.allowed.set()
            assert await asyncio.wait_for(synced, 2) == 1  # though the thread still waits for the lock
            assert not waiting.done()
            other.rollback()
            assert await asyncio.wait_for(waiting, 5) == 2

    asyncio.run(run())
    other.close()


def test_stop_commits_the_writes_still_waiting_for_their_turn_on_the_loop(tmp_path):
    path = tmp_path / "w.db"

    async def run() -> list[int]:
        writer = loop_writer(path)
        await writer.start()
        futures = [writer.submit(insert(n)) for n in range(20)]
        await writer.stop()
        return await asyncio.gather(*futures)

    assert asyncio.run(run()) == list(range(20))
    assert rows(path) == list(range(20))


# --- the WAL fsynced by the kernel (Linux AIO) ----------------------------------------------


class KernelSyncs:
    """Stands in for AioFsync: records what it syncs, and each sync runs until the test ends it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.running: Callable[[OSError | None], None] | None = None
        self.refusal: OSError | None = None
        self.closed = False

    def open(self, loop: asyncio.AbstractEventLoop) -> "KernelSyncs":
        self.loop = loop
        return self

    @property
    def busy(self) -> bool:
        return self.running is not None

    def start(self, fd: int, done: Callable[[OSError | None], None]) -> None:
        if self.refusal is not None:
            raise self.refusal
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.running = done

    def end(self, error: OSError | None = None) -> None:
        done, self.running = self.running, None
        assert done is not None
        done(error)

    def close(self) -> None:
        self.closed = True


async def settled(future: asyncio.Future) -> bool:
    await asyncio.sleep(0.05)
    return future.done()


def test_the_kernel_fsyncs_a_file_and_reports_on_the_loop(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)

    async def run() -> OSError | None:
        loop = asyncio.get_running_loop()
        aio = AioFsync.open(loop)
        assert aio is not None  # Linux on x86_64 or aarch64: Linux AIO is there
        fd = os.open(path, os.O_RDWR)
        ended: asyncio.Future[OSError | None] = loop.create_future()
        aio.start(fd, ended.set_result)
        assert aio.busy
        error = await asyncio.wait_for(ended, 5)
        assert not aio.busy
        aio.close()
        os.close(fd)
        return error

    assert asyncio.run(run()) is None


def test_the_kernel_refuses_a_sync_it_cannot_do_and_none_is_left_running():
    async def run() -> None:
        aio = AioFsync.open(asyncio.get_running_loop())
        assert aio is not None
        read, write = os.pipe()  # a pipe cannot be fsynced
        with pytest.raises(OSError, match="Linux AIO refused"):
            aio.start(read, lambda error: None)
        assert not aio.busy
        aio.close()
        os.close(read)
        os.close(write)

    asyncio.run(run())


def test_the_kernel_takes_one_sync_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        aio = AioFsync.open(loop)
        assert aio is not None
        fd = os.open(path, os.O_RDONLY)
        try:
            ended: asyncio.Future[OSError | None] = loop.create_future()
            aio.start(fd, ended.set_result)
            with pytest.raises(RuntimeError, match="already running"):
                aio.start(fd, ended.set_result)
            assert await asyncio.wait_for(ended, 5) is None
        finally:
            aio.close()
            os.close(fd)

    asyncio.run(run())


def test_the_kernels_syncs_open_again_on_the_same_loop_once_closed(tmp_path: Path) -> None:
    # A store closed and opened again in one process: the eventfd's number is given out again,
    # and the loop must not be watching the one closed still.
    path = tmp_path / "f"
    path.write_bytes(b"x")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(2):
                aio = AioFsync.open(loop)
                assert aio is not None
                ended: asyncio.Future[OSError | None] = loop.create_future()
                aio.start(fd, ended.set_result)
                assert await asyncio.wait_for(ended, 5) is None
                aio.close()
        finally:
            os.close(fd)

    asyncio.run(run())


def test_with_the_kernel_syncing_durable_writes_are_answered_and_the_thread_syncs_nothing(tmp_path):
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()
    synced: list[str] = []

    def recording(loop: asyncio.AbstractEventLoop) -> AioFsync | None:
        aio = AioFsync.open(loop)
        assert aio is not None
        start = aio.start

        def start_recorded(fd: int, done: Callable[[OSError | None], None]) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            start(fd, done)

        aio.start = start_recorded  # type: ignore[method-assign]
        return aio

    async def run() -> None:
        async with started(loop_writer(path, fsyncs, kernel=recording)) as writer:
            assert await asyncio.wait_for(asyncio.gather(*(writer.submit(insert(n)) for n in range(10))), 5) == list(
                range(10)
            )
            assert await asyncio.wait_for(writer.submit(insert(10)), 5) == 10

    asyncio.run(run())
    assert rows(path) == list(range(11))
    assert synced == [f"{os.path.realpath(path)}-wal"] * 2  # one sync per commit on the loop
    assert fsyncs.paths == []


def test_a_write_committed_while_the_kernel_syncs_waits_for_the_next_sync(tmp_path):
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        async with started(loop_writer(path, kernel=kernel.open)) as writer:
            first = writer.submit(insert(1))
            await asyncio.sleep(0.05)
            second = writer.submit(insert(2))  # committed after the running sync began
            assert not await settled(first) and not await settled(second)
            assert rows(path) == [1, 2] and len(kernel.paths) == 1
            kernel.end()
            assert await settled(first) and not await settled(second)
            assert len(kernel.paths) == 2  # the next sync, for the second write
            kernel.end()
            assert await second == 2

    asyncio.run(run())
    assert kernel.closed


def test_a_sync_the_kernel_failed_fails_its_writes_and_the_store_takes_no_more(tmp_path):
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        async with started(loop_writer(path, kernel=kernel.open)) as writer:
            first = writer.submit(insert(1))
            await asyncio.sleep(0.05)
            second = writer.submit(insert(2))
            await asyncio.sleep(0.05)
            kernel.end(OSError(5, "Input/output error"))
            for write in (first, second):
                with pytest.raises(StoreError, match="may not be on disk"):
                    await asyncio.wait_for(write, 5)
            with pytest.raises(StoreError, match="no more writes"):
                writer.submit(insert(3))

    asyncio.run(run())
    assert len(kernel.paths) == 1  # never synced again after the failure
    assert rows(path) == [1, 2]


def test_when_the_kernel_will_not_start_a_sync_the_thread_syncs_from_then_on(tmp_path):
    path = tmp_path / "w.db"
    kernel = KernelSyncs()
    kernel.refusal = OSError(22, "Invalid argument")
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs, kernel=kernel.open)) as writer:
            assert await asyncio.wait_for(writer.submit(insert(1)), 5) == 1
            assert kernel.closed
            assert await asyncio.wait_for(writer.submit(insert(2)), 5) == 2

    asyncio.run(run())
    assert fsyncs.paths == [f"{os.path.realpath(path)}-wal"] * 2
    assert rows(path) == [1, 2]


def test_stop_waits_for_the_sync_the_kernel_is_running(tmp_path):
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        writer = loop_writer(path, kernel=kernel.open)
        await writer.start()
        write = writer.submit(insert(1))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(writer.stop())
        assert not await settled(stopping) and not kernel.closed
        kernel.end()
        await asyncio.wait_for(stopping, 5)
        assert await write == 1 and kernel.closed

    asyncio.run(run())


def sync_on_a_failing_disk(path: Path, looks_finding_nothing: int = 0, interrupted_looks: int = 0) -> OSError | None:
    """What the kernel's sync of a file ends with when the disk fails it (its result -EIO, as the
    kernel writes it), the first `looks_finding_nothing` looks for that result finding none and
    the `interrupted_looks` after them interrupted by a signal (EINTR)."""
    path.write_bytes(b"x")

    async def run() -> OSError | None:
        loop = asyncio.get_running_loop()
        aio = AioFsync.open(loop)
        assert aio is not None
        real = aio._syscall
        getevents = _SYSCALLS[platform.machine()][2]
        looks = 0

        def failing_disk(number: ctypes.c_long, *args: object) -> int:
            nonlocal looks
            if number.value == getevents:
                looks += 1
                if looks <= looks_finding_nothing:
                    return 0
                if looks <= looks_finding_nothing + interrupted_looks:
                    ctypes.set_errno(errno.EINTR)  # what get_errno() reads after a call made with use_errno
                    return -1
            got = real(number, *args)
            if number.value == getevents and got == 1:
                # struct io_event as the kernel writes it: data, obj, then res = -EIO
                data, obj = struct.unpack_from("<QQ", ctypes.string_at(ctypes.addressof(aio._event), 16))
                ctypes.memmove(ctypes.addressof(aio._event), struct.pack("<QQqq", data, obj, -errno.EIO, 0), 32)
            return got

        aio._syscall = failing_disk  # type: ignore[method-assign]
        fd = os.open(path, os.O_RDONLY)
        ended: asyncio.Future[OSError | None] = loop.create_future()
        aio.start(fd, ended.set_result)
        error = await asyncio.wait_for(ended, 5)
        aio.close()
        os.close(fd)
        return error

    return asyncio.run(run())


def test_an_error_the_kernel_reports_for_a_sync_reaches_the_writer(tmp_path):
    error = sync_on_a_failing_disk(tmp_path / "f")
    assert isinstance(error, OSError) and error.errno == errno.EIO


def test_a_syncs_result_not_yet_to_be_read_when_its_end_is_signalled_is_looked_for_again(tmp_path: Path) -> None:
    # The eventfd says so only once: a look that found nothing must not be the last.
    error = sync_on_a_failing_disk(tmp_path / "f", looks_finding_nothing=1)
    assert isinstance(error, OSError) and error.errno == errno.EIO


def test_a_look_for_a_syncs_result_that_a_signal_interrupted_is_made_again(tmp_path: Path) -> None:
    # EINTR is no answer about the sync: the disk's own error is what the writer must hear.
    error = sync_on_a_failing_disk(tmp_path / "f", interrupted_looks=2)
    assert isinstance(error, OSError) and error.errno == errno.EIO


def test_two_stops_at_once_both_return_and_a_stop_given_up_on_leaves_the_next_one_working(tmp_path):
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> None:
        writer = loop_writer(path, kernel=kernel.open)
        await writer.start()
        write = writer.submit(insert(1))
        await asyncio.sleep(0.05)
        given_up = asyncio.ensure_future(writer.stop())
        await asyncio.sleep(0.05)
        given_up.cancel()
        stops = [asyncio.ensure_future(writer.stop()) for _ in range(2)]
        assert not await settled(asyncio.gather(*stops))
        kernel.end()
        await asyncio.wait_for(asyncio.gather(*stops), 5)
        assert await write == 1 and kernel.closed

    asyncio.run(run())


def test_a_durable_write_from_another_event_loop_is_answered_on_its_own_loop(tmp_path):
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()
    other_loop = asyncio.new_event_loop()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs, kernel=AioFsync.open)) as writer:

            async def from_the_other_loop() -> int:
                return await asyncio.wait_for(writer.submit(insert(2)), 5)

            assert await asyncio.wait_for(writer.submit(insert(1)), 5) == 1
            answer = await asyncio.get_running_loop().run_in_executor(
                None, other_loop.run_until_complete, from_the_other_loop()
            )
            assert answer == 2

    try:
        asyncio.run(run())
    finally:
        other_loop.close()
    assert rows(path) == [1, 2]
    assert fsyncs.paths == [f"{os.path.realpath(path)}-wal"]  # the other loop's write, by the thread


@pytest.mark.parametrize("aio_fsync", [True, False])
def test_the_store_fsyncs_through_linux_aio_unless_configured_not_to(tmp_path, monkeypatch, aio_fsync):
    opened: list[bool] = []
    real_open = AioFsync.open

    def noting_open(loop: asyncio.AbstractEventLoop) -> AioFsync | None:
        aio = real_open(loop)
        opened.append(aio is not None)
        return aio

    monkeypatch.setattr(AioFsync, "open", noting_open)

    async def run() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 's.db'}", aio_fsync=aio_fsync))
        await store.open()
        await store.create_organization("org", "Org")
        await store.close()

    asyncio.run(run())
    assert opened == ([True] if aio_fsync else [])


@pytest.mark.parametrize("aio_fsync", [True, False])
def test_a_store_out_of_file_descriptors_at_its_first_fsync_still_takes_writes(tmp_path, monkeypatch, aio_fsync):
    # The WAL's descriptor for fsyncs was opened at the first fsync: a process out of
    # descriptors then (a burst of connections under a low `ulimit -n`) took the failed open
    # for a failed fsync, and its store refused every write until Tollgate was restarted.
    url = f"sqlite:///{tmp_path / 's.db'}"
    real_open = os.open

    def out_of_descriptors(path: Any, *args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files", path)

    async def run() -> None:
        store = SQLiteStore(DatabaseConfig(url=url, aio_fsync=aio_fsync))
        await store.open()  # a database already made: this start writes nothing
        try:
            monkeypatch.setattr(os, "open", out_of_descriptors)
            await store.create_organization("org", "Org")
            monkeypatch.setattr(os, "open", real_open)
            await store.create_organization("org2", "Org 2")
            await store.ping()
        finally:
            await store.close()

    async def make() -> None:
        store = SQLiteStore(DatabaseConfig(url=url))
        await store.open()
        await store.close()

    asyncio.run(make())
    asyncio.run(run())


def test_the_stores_connection_on_the_loop_never_waits_for_a_lock_syncs_or_checkpoints(tmp_path: Path) -> None:
    # Any of them would stall the event loop: the thread waits, fsyncs and checkpoints for it.
    async def run() -> tuple[int, int, int]:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 's.db'}"))
        await store.open()
        try:
            assert store._writer is not None and store._writer._loop_db is not None
            db = store._writer._loop_db
            (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
            (synchronous,) = db.execute("PRAGMA synchronous").fetchone()
            (autocheckpoint,) = db.execute("PRAGMA wal_autocheckpoint").fetchone()
            return timeout, synchronous, autocheckpoint
        finally:
            await store.close()

    assert asyncio.run(run()) == (0, 1, 0)  # no wait; synchronous = NORMAL; no checkpoint


def test_the_stores_reading_connections_keep_temporary_tables_in_memory(tmp_path: Path) -> None:
    # In a file each, opened as needed: a job list's sort failed with SQLITE_CANTOPEN in a
    # process out of descriptors, or with a full temporary directory, the database being fine.
    async def run() -> list[int]:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 's.db'}"))
        await store.open()
        try:
            assert store._writer is not None and store._writer._loop_db is not None
            assert store._reader is not None and store._together is not None and store._listing is not None
            (reader,) = await store._reader.execute_fetchall("PRAGMA temp_store")
            others = [store._together, store._listing]
            return [reader[0]] + [db.execute("PRAGMA temp_store").fetchone()[0] for db in others]
        finally:
            await store.close()

    assert asyncio.run(run()) == [2, 2, 2]  # 2: MEMORY


class DyingCheckpoints(sqlite3.Connection):
    """The thread's connection, whose first checkpoint pass waits for the test's word and then
    raises what no handler expects: the writer thread dies."""

    running = threading.Event()
    release = threading.Event()

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA wal_checkpoint"):
            DyingCheckpoints.running.set()
            DyingCheckpoints.release.wait(10)
            raise RuntimeError("the writer thread blew up")
        return super().execute(sql, *args)


def write_committed_on_the_loop_as_the_writer_thread_dies(path: Path) -> asyncio.Future:
    """A write (of 2) committed on the loop while the writer thread dies, as the writer
    answered it; set CHECKPOINT_EVERY to 1 first."""
    DyingCheckpoints.running.clear()
    DyingCheckpoints.release.clear()

    async def run() -> asyncio.Future:
        writer = loop_writer(path, thread_connection=DyingCheckpoints)
        await writer.start()
        thread = writer._thread
        assert await writer.submit(insert(1)) == 1  # its commit starts a checkpoint
        await asyncio.get_running_loop().run_in_executor(None, DyingCheckpoints.running.wait, 5)

        def meanwhile(db: sqlite3.Connection) -> int:
            # Committed on the loop while the thread dies: the thread had not failed when the
            # batch began, and has gone by the time the WAL is to be fsynced.
            DyingCheckpoints.release.set()
            thread.join(5)
            return insert(2)(db)

        write = writer.submit(meanwhile)
        await asyncio.wait({write}, timeout=5)
        try:
            await asyncio.wait_for(writer.stop(), 5)
        finally:
            DyingCheckpoints.release.set()
        return write

    return asyncio.run(run())


def test_a_write_committed_on_the_loop_as_the_writer_thread_dies_is_answered_not_left_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)
    write = write_committed_on_the_loop_as_the_writer_thread_dies(tmp_path / "w.db")
    assert write.done(), "the write was never answered"
    assert isinstance(write.exception(), StoreError)


def test_a_write_committed_on_the_loop_as_the_writer_thread_dies_is_told_so_with_what_it_returned(
    tmp_path, monkeypatch
):
    # Committed, but never fsynced: the store answers it as done, as one whose fsync failed
    # (SQLiteStore._write), rather than have its caller try again, paying twice.
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)
    write = write_committed_on_the_loop_as_the_writer_thread_dies(tmp_path / "w.db")
    assert isinstance(write.exception(), Unsaved) and write.exception().value == 2
    assert rows(tmp_path / "w.db") == [1, 2]


async def committed_during_a_checkpoint(writer: Writer, checkpoints: type) -> Any:
    """How a write committed on the loop while the writer's thread holds a checkpoint (until
    `checkpoints.release`) is answered: its fsync waits for the thread."""
    await writer.submit(insert(1))  # its commit starts a checkpoint
    await asyncio.get_running_loop().run_in_executor(None, checkpoints.running.wait, 5)
    write = writer.submit(insert(2))
    assert not await settled(write)
    checkpoints.release.set()
    return await settled_soon(write)


def test_a_write_whose_fsync_waited_for_the_writer_thread_as_it_died_is_told_so_with_what_it_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Committed, and its fsync asked of the thread before the thread failed: never fsynced.
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)
    DyingCheckpoints.running.clear()
    DyingCheckpoints.release.clear()

    async def run() -> Any:
        writer = loop_writer(tmp_path / "w.db", thread_connection=DyingCheckpoints)
        await writer.start()
        try:
            return await committed_during_a_checkpoint(writer, DyingCheckpoints)
        finally:
            DyingCheckpoints.release.set()
            await asyncio.wait_for(writer.stop(), 5)

    outcome = asyncio.run(run())
    assert isinstance(outcome, Unsaved) and outcome.value == 2


# --- an fsync SQLite itself makes fails (fsyncgate) -------------------------------------------


def sqlite_fsync_failure(code: int = 1034, name: str = "SQLITE_IOERR_FSYNC") -> sqlite3.OperationalError:
    """What SQLite raises when an fsync of its own fails: a commit's on the thread (synchronous
    = FULL), a checkpoint's, or the WAL header's as the WAL starts over."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    error.sqlite_errorname = name  # type: ignore[attr-defined]
    return error


class FirstCommitFsyncFails(sqlite3.Connection):
    """The thread's connection, whose first commit's fsync fails: SQLite rolls the transaction
    back and says so. Its next fsync succeeds, as Linux reports a lost page once."""

    failed = False

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql == "COMMIT" and not FirstCommitFsyncFails.failed:
            FirstCommitFsyncFails.failed = True
            super().execute("ROLLBACK")
            raise sqlite_fsync_failure()
        return super().execute(sql, *args)


def test_after_sqlite_fails_to_fsync_a_commit_on_the_thread_the_store_takes_no_more_writes(tmp_path):
    FirstCommitFsyncFails.failed = False
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(Writer(lambda: connect(path, FirstCommitFsyncFails))) as writer:  # every write on the thread
            with pytest.raises(StoreUnavailable):
                await writer.submit(insert(1))
            # The pages that fsync lost are marked clean: a later commit's fsync would succeed
            # without them, and a write after them said durable would not be.
            with pytest.raises(StoreUnavailable, match="no more writes"):
                await writer.submit(insert(2))
            with pytest.raises(StoreUnavailable, match="saving to disk failed"):
                writer.check()

    asyncio.run(run())
    assert rows(path) == []


def test_writes_queued_on_the_thread_behind_a_commit_whose_fsync_failed_are_refused_not_committed(
    tmp_path: Path,
) -> None:
    FirstCommitFsyncFails.failed = False
    path = tmp_path / "w.db"

    async def run() -> list[BaseException | int]:
        async with started(Writer(lambda: connect(path, FirstCommitFsyncFails))) as writer:  # every write on the thread
            release = await hold(writer)  # its commit is the one whose fsync fails
            queued = [writer.submit(insert(n)) for n in (1, 2)]
            release.set()
            return await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 5)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, StoreUnavailable) and not isinstance(o, Unsaved) for o in outcomes), outcomes
    assert rows(path) == []


def test_a_failed_fsync_of_the_databases_directory_stops_the_store_taking_writes(tmp_path: Path) -> None:
    def directory_fsync_fails(db: sqlite3.Connection) -> None:
        raise sqlite_fsync_failure(1290, "SQLITE_IOERR_DIR_FSYNC")

    async def run() -> None:
        async with started(Writer(lambda: connect(tmp_path / "w.db"))) as writer:
            with pytest.raises(StoreUnavailable):
                await writer.submit(directory_fsync_fails)
            with pytest.raises(StoreUnavailable, match="no more writes.*saving to disk failed"):
                writer.submit(insert(1))

    asyncio.run(run())


class CheckpointFsyncFails(sqlite3.Connection):
    """The thread's connection, whose checkpoints fail to fsync."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA wal_checkpoint"):
            raise sqlite_fsync_failure()
        return super().execute(sql, *args)


def test_a_checkpoint_whose_fsync_fails_stops_the_store_taking_writes(tmp_path, monkeypatch):
    monkeypatch.setattr("proxy.store.writer.CHECKPOINT_EVERY", 1)  # one after every commit on the loop

    async def run() -> None:
        async with started(loop_writer(tmp_path / "w.db", thread_connection=CheckpointFsyncFails)) as writer:
            assert await writer.submit(insert(1)) == 1  # its commit starts a checkpoint
            for _ in range(500):
                await asyncio.sleep(0.01)
                try:
                    writer.check()
                except StoreUnavailable:
                    break
            with pytest.raises(StoreUnavailable, match="no more writes.*saving to disk failed"):
                writer.submit(insert(2))

    asyncio.run(run())


class HeldCheckpointFsyncFails(sqlite3.Connection):
    """The thread's connection, whose checkpoints wait for the test's word (as HeldCheckpoints)
    and then fail to fsync."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA wal_checkpoint"):
            HeldCheckpoints.running.set()
            HeldCheckpoints.release.wait(10)
            raise sqlite_fsync_failure()
        return super().execute(sql, *args)


def test_a_write_committed_on_the_loop_as_a_checkpoint_fails_its_fsync_gets_no_fsync_of_ours(
    tmp_path: Path, held_checkpoints: type
) -> None:
    # Its fsync was asked of the thread before the checkpoint failed: an fsync then would
    # succeed without the pages lost.
    fsyncs = Fsyncs()

    async def run() -> Any:
        async with started(
            loop_writer(tmp_path / "w.db", fsyncs, thread_connection=HeldCheckpointFsyncFails)
        ) as writer:
            return await committed_during_a_checkpoint(writer, held_checkpoints)

    outcome = asyncio.run(run())
    assert isinstance(outcome, Unsaved) and outcome.value == 2
    assert len(fsyncs.paths) == 1  # the first write's


def test_writes_committed_on_the_loop_as_sqlite_fails_an_fsync_get_no_fsync_of_ours(tmp_path):
    # The WAL starting over fsyncs its header: when that fails, the pages lost are marked clean,
    # and an fsync of ours for the writes that did commit would succeed without them.
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    def fsync_of_the_wal_header_fails(db: sqlite3.Connection) -> None:
        raise sqlite_fsync_failure()

    async def run() -> list:
        async with started(loop_writer(path, kernel=kernel.open)) as writer:
            batch = [writer.submit(insert(1)), writer.submit(fsync_of_the_wal_header_fails), writer.submit(insert(3))]
            answers = [await settled_soon(write) for write in batch]
            if kernel.running is not None:
                kernel.end()
        return answers

    first, failed, third = asyncio.run(run())
    assert isinstance(first, Unsaved) and first.value == 1
    assert isinstance(third, Unsaved) and third.value == 3
    assert isinstance(failed, StoreUnavailable) and not isinstance(failed, Unsaved)
    assert kernel.paths == []


async def settled_soon(write: asyncio.Future) -> Any:
    """What `write` came to within a second: its result or exception, or None."""
    try:
        return await asyncio.wait_for(asyncio.shield(write), 1)
    except asyncio.TimeoutError:
        return None
    except Exception as exc:
        return exc


def test_writes_of_a_batch_in_which_sqlite_fails_an_fsync_are_not_answered_as_durable(tmp_path):
    path = tmp_path / "w.db"

    def starts_the_wal_over_and_its_header_fsync_fails(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (n) VALUES (100)")
        db.execute("ROLLBACK")  # SQLite rolls the whole transaction back on an I/O error
        raise sqlite_fsync_failure()

    async def run() -> list:
        async with started(Writer(lambda: connect(path))) as writer:
            release = await hold(writer)
            # one batch on the thread: the others go again without the one that failed
            batch = [writer.submit(insert(1)), writer.submit(starts_the_wal_over_and_its_header_fsync_fails),
                     writer.submit(insert(3))]
            release.set()
            return await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 5)

    outcomes = asyncio.run(run())
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes


def test_the_store_writes_where_the_system_has_no_fdatasync(tmp_path):
    # macOS: os.fdatasync is missing, and the writer's default named it as the module loaded,
    # so Tollgate could not even start there. fsync does the same and more.
    script = f"""
import asyncio, os, sys
del os.fdatasync
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from proxy.config import DatabaseConfig
from proxy.store.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(DatabaseConfig(url="sqlite:///{tmp_path}/m.db", aio_fsync=False))
    await store.open()
    await store.create_organization("acme", "Acme")
    await store.close()

asyncio.run(main())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("SELECT organization_id FROM organizations").fetchall() == [("acme",)]


def replace_with_a_backup(path: Path) -> None:
    """A restore made while the store runs: a copy of the database moved over it."""
    backup = sqlite3.connect(path)
    backup.execute(f"VACUUM INTO '{path}.backup'")
    backup.close()
    os.replace(f"{path}.backup", path)


@contextlib.asynccontextmanager
async def store_whose_file_was_replaced(path: Path) -> AsyncIterator[SQLiteStore]:
    """An open store that has written once, its database then replaced by a backup of it."""
    store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
    await store.open()
    try:
        await store.create_organization("before", "Before")
        replace_with_a_backup(path)
        yield store
    finally:
        await store.close()


def test_a_store_whose_database_file_is_replaced_takes_no_more_writes_and_its_ping_says_why(tmp_path):
    # A restore made while Tollgate served (a backup moved over the database): the store went on
    # committing into the file it had open, which no later process opens, answered every write
    # as done and stayed ready; at the next start the old file's WAL was read into the new one.
    path = tmp_path / "s.db"

    async def run() -> None:
        async with store_whose_file_was_replaced(path) as store:
            with pytest.raises(StoreUnavailable, match=f"{path} was replaced or removed"):
                await store.ping()
            with pytest.raises(StoreUnavailable, match=f"no more writes.*{path} was replaced or removed"):
                await store.create_organization("later", "Later")

    asyncio.run(run())


def replace_the_wal(path: Path) -> None:
    """The WAL that SQLite writes deleted, and a new file made at its path."""
    wal = Path(f"{path}-wal")
    os.unlink(wal)
    wal.write_bytes(b"")


def test_a_wal_replaced_under_the_writer_is_not_fsynced_in_place_of_the_one_sqlite_writes(tmp_path, monkeypatch):
    # The WAL a connection writes stays the file it opened; a new file at its path (another
    # process made one after it was deleted) was fsynced instead, and the writes answered as on
    # disk though their WAL never was.
    monkeypatch.setattr(writer_module, "FILES_CHECK_EVERY", 0.0)  # at every fsync, not once a second
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            await writer.submit(insert(1))
            replace_the_wal(path)
            with pytest.raises(StoreUnavailable):  # committed into the WAL deleted: lost, not Unsaved
                await asyncio.wait_for(writer.submit(insert(2)), 5)
            with pytest.raises(StoreUnavailable, match="was replaced or removed"):
                writer.check()

    asyncio.run(run())
    assert fsyncs.paths == [f"{path}-wal"]


def test_a_wal_replaced_within_a_second_of_the_first_look_is_not_the_one_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The descriptor fsyncs go through is opened by path, once: opened after a mere glance
    # (within the second of the store's first look), it was the new file's.
    monkeypatch.setattr(writer_module, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    path = tmp_path / "w.db"
    fsyncs = Fsyncs()

    async def run() -> None:
        async with started(loop_writer(path, fsyncs)) as writer:
            writer.check()  # the files' first look, as the store opens
            replace_the_wal(path)
            with pytest.raises(StoreUnavailable, match="-wal was replaced or removed"):
                await asyncio.wait_for(writer.submit(insert(1)), 5)

    asyncio.run(run())
    assert fsyncs.paths == []


def test_a_write_committed_before_its_wal_was_found_replaced_is_refused_though_its_sync_then_fails(
    tmp_path: Path,
) -> None:
    # The first failure is the one that stands: the write went into a WAL no later opening reads.
    path = tmp_path / "w.db"
    kernel = KernelSyncs()

    async def run() -> Any:
        async with started(loop_writer(path, kernel=kernel.open)) as writer:
            write = writer.submit(insert(1))
            assert not await settled(write)  # its sync runs
            replace_the_wal(path)
            with pytest.raises(StoreUnavailable, match="-wal was replaced or removed"):
                writer.check()
            kernel.end(OSError(5, "Input/output error"))
            return await settled_soon(write)

    outcome = asyncio.run(run())
    assert isinstance(outcome, StoreUnavailable) and not isinstance(outcome, Unsaved), outcome


def test_a_writer_whose_shared_memory_index_is_deleted_takes_no_more_writes(tmp_path, monkeypatch):
    # Another process opening the database then makes an index of its own, and the two write
    # over each other's commits in the WAL: a CLI command's credits, answered as added, vanished.
    monkeypatch.setattr(writer_module, "FILES_CHECK_EVERY", 0.0)  # at every fsync, not once a second
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(loop_writer(path)) as writer:
            await writer.submit(insert(1))
            os.unlink(f"{path}-shm")
            with pytest.raises(Unsaved):
                await asyncio.wait_for(writer.submit(insert(2)), 5)
            with pytest.raises(StoreUnavailable, match=f"{path}-shm was replaced or removed"):
                writer.check()

    asyncio.run(run())


def test_the_files_are_looked_at_by_an_fsync_once_a_second(tmp_path, monkeypatch):
    # Three stat results at every fsync were 5% of a call's instructions. Between two looks an
    # fsync is still of the file SQLite writes (its descriptor is never opened again).
    clock = [1000.0]
    monkeypatch.setattr(writer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    path = tmp_path / "w.db"

    async def run() -> None:
        async with started(loop_writer(path)) as writer:
            await writer.submit(insert(1))  # the first fsync: the first look
            os.unlink(f"{path}-shm")
            await writer.submit(insert(2))  # within the second
            clock[0] += writer_module.FILES_CHECK_EVERY
            with pytest.raises(Unsaved):
                await asyncio.wait_for(writer.submit(insert(3)), 5)

    asyncio.run(run())


def test_a_readiness_probe_looks_at_the_files_at_once_within_the_second_of_an_fsyncs_look(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    path = tmp_path / "p.db"

    async def run() -> None:
        async with started(loop_writer(path)) as writer:
            await writer.submit(insert(1))  # the fsync's look: the next in a second
            os.unlink(f"{path}-shm")
            with pytest.raises(StoreUnavailable, match="-shm was replaced or removed"):
                writer.check()

    asyncio.run(run())


def test_a_write_committed_after_its_database_file_was_replaced_is_refused_not_answered_as_done(tmp_path, monkeypatch):
    # Its commit went into the file the store had open, which no later opening of the database
    # reads as its own: answered as done (as after a failed fsync, where the database does hold
    # it), credits added so were lost all the same, and the client was told it need not try again.
    monkeypatch.setattr(writer_module, "FILES_CHECK_EVERY", 0.0)  # at every fsync, not once a second
    path = tmp_path / "s.db"

    async def run() -> None:
        async with store_whose_file_was_replaced(path) as store:
            with pytest.raises(StoreUnavailable, match=f"{path} was replaced or removed"):
                await store.create_organization("after", "After")

    asyncio.run(run())


def test_a_database_file_replaced_before_the_stores_first_write_is_found_out(tmp_path):
    # A start on a database already migrated writes nothing as it opens: the files were first
    # looked at by the first fsync or readiness probe, which took a restore made before it for
    # the files SQLite opened, and the store went on committing into the old ones for good.
    path = tmp_path / "s.db"

    async def run() -> None:
        first = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await first.open()
        await first.close()
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            replace_with_a_backup(path)
            with pytest.raises(StoreUnavailable, match=f"{path} was replaced or removed"):
                await store.ping()
        finally:
            await store.close()

    asyncio.run(run())


def test_a_closed_store_answers_a_ping_that_it_is_closed(tmp_path: Path) -> None:
    async def ping_after_close() -> str:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 'closed.db'}"))
        await store.open()
        await store.close()
        with pytest.raises(StoreError) as info:
            await store.ping()
        return str(info.value)

    assert asyncio.run(ping_after_close()) == "The store is closed"
