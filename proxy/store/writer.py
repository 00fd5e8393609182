"""Group-committed SQLite writes: on the event loop when they can be, on one writer thread
when they must wait.

Every write is a plain function of a `sqlite3.Connection`. The writes submitted during one
turn of the event loop run together in one `BEGIN IMMEDIATE` transaction on the loop's own
connection, each inside its own savepoint where it needs one, and commit once. A write that
raises is rolled back alone; the others still commit. The statements take microseconds; what
cost a call most was handing each write to a thread and back (bench/RESULTS.md).

The thread does what must not stall the loop:
- waiting for another process's write lock: a transaction that cannot start at once goes to
  the thread, which waits on SQLite's busy timeout; while it holds writes, new ones queue
  behind them;
- the disk: the loop's connection commits without fsync (`synchronous = NORMAL`, which keeps
  checkpoints safe) and the WAL is then fsynced, once for all the commits made since the
  last fsync began: by the kernel where Linux AIO takes it (`aio_fsync.py`: no thread, no
  GIL, far less CPU), else by the thread. A durable write is answered only after that, so
  nobody hears "done" before its record would survive a power cut (other readers may see it
  a moment earlier). A write
  submitted with `durable=False` (a call's start) is answered at its commit: the fsync after
  any later commit covers it as well, since the WAL is written in order, and if none has begun
  within START_SYNC_AFTER one is made for it (a stream runs for minutes, and a start lost to a
  power cut would leave no record at all of a call its client saw answered). A failed fsync
  (ours, or one SQLite makes: a commit's on the thread, a checkpoint's) stops the store taking
  writes: what it was for is committed but perhaps not on disk (`Unsaved`, with each write's
  result), and Linux may not report the loss twice;
- checkpoints, which copy the WAL into the database file and fsync it, in two passes. The
  first copies what is there while the loop goes on committing; the second copies what was
  committed meanwhile, a few pages, and new writes wait on the loop for it to end and then
  commit there together: a write committed during it would keep the next commit from starting
  the WAL over, and the file would grow (and every fsync's cost with it).

Without a loop connection every write runs on the thread, which group-commits the same way
and fsyncs at each commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar, Union

from . import StoreBusy, StoreError, StoreUnavailable, Unsaved
from .aio_fsync import AioFsync

log = logging.getLogger("tollgate.store")
T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]
Outcome = tuple[bool, Any]  # (succeeded, its result or its exception)
MAX_BATCH = 256
CHECKPOINT_EVERY = 250  # commits on the loop between checkpoints: about SQLite's 1,000 pages
RESTART_AT_FRAMES = 4096  # pages in the WAL (16 MiB of 4 KiB pages) past which a checkpoint waits for readers
RESTART_WAIT = 0.2  # seconds it waits for them at most, writes held meanwhile
WAL_SIZE_LIMIT = RESTART_AT_FRAMES * 4096  # bytes: a WAL that grew past it is cut back when it starts over
# macOS has no fdatasync (os.fdatasync is missing there, and Tollgate would not even start):
# fsync, which also writes the file's metadata, does it there.
DATA_SYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
# Seconds between two checks, at an fsync, that the database's files are still those SQLite
# opened (`_OpenedFiles`); a readiness probe checks at once.
FILES_CHECK_EVERY = 1.0
# Seconds a write answered at its commit may wait for an fsync: its call's end (within it for
# most calls) or any other durable write comes first and covers it at no cost of its own.
START_SYNC_AFTER = 0.1


class WriteFuture(asyncio.Future):  # type: ignore[type-arg]
    """What a submitted write comes to. It cannot be cancelled: a task cancelled while it
    waits for one hears of its cancellation once the write is done (asyncio delivers it at the
    task's next step when the future it waits for refuses), so a client hanging up never
    leaves a write half-known. asyncio.shield gave the same for two more futures, four
    callbacks and a turn of the loop more per write."""

    __slots__ = ()

    def cancel(self, msg: Any = None) -> bool:
        return False


@dataclass
class _Job(Generic[T]):
    work: Work[T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    atomic: bool  # False: one statement, which needs no transaction of its own
    durable: bool = True  # False: may be answered before its commit is on disk
    barrier: bool = False  # sent to the thread to wait for a lock: later writes follow it there


@dataclass
class _Sync:
    """Writes committed on the loop, to be answered once the WAL is on disk."""

    committed: list[tuple[_Job[Any], Any]]


@dataclass
class _Checkpoint:
    loop: asyncio.AbstractEventLoop
    closing: bool  # the second pass, which writes wait for


_Item = Union[_Job[Any], _Sync, _Checkpoint]


class Writer:
    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        connect_on_loop: Callable[[], sqlite3.Connection] | None = None,
        sync_wal: bool = False,
        fsync: Callable[[int], None] = DATA_SYNC,
        fsync_from_loop: Callable[[asyncio.AbstractEventLoop], AioFsync | None] | None = None,
    ) -> None:
        """`connect` opens the thread's connection, in WAL mode. `connect_on_loop`, if given,
        opens the loop's, which must not wait for locks (busy timeout 0) nor sync its commits;
        `sync_wal`: the WAL is fsynced for it before durable writes are answered, through
        what `fsync_from_loop` opens (`AioFsync.open`) if it opens one, else by the thread
        with `fsync`."""
        self._connect = connect
        self._connect_on_loop = connect_on_loop
        self._sync_wal = sync_wal
        self._wal_path: str | None = None  # the file SQLite itself uses, symbolic links followed
        self._wal: _WalFile | None = None  # the thread's
        self._files: _OpenedFiles | None = None  # the database's files, checked at fsyncs (FILES_CHECK_EVERY)
        self._fsync = fsync
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None  # set: no more writes are taken
        # The failure was the database or its WAL replaced: what is committed is in no file the
        # database's next opening reads as its own, so not answered as done (see `_unsaved`).
        self._lost = False
        self._thread_gone = False  # set by the thread as it stops: what is queued later, the loop answers
        self._closed = False
        self._loop_db: sqlite3.Connection | None = None
        self._waiting: list[_Job[Any]] = []  # for the next commit on the loop
        self._barriers = 0  # lock waits on the thread: writes follow them there
        self._checkpointing = False  # a closing pass runs on the thread: writes wait for it on the loop
        self._checkpoint_running = False  # either pass
        self._checkpoint_over: asyncio.Future[None] | None = None  # stop() waits on it
        self._commits = 0  # on the loop since the last checkpoint
        self._wal_frames = 0  # in the WAL at the running checkpoint's first pass (the thread's)
        self._fsync_from_loop = fsync_from_loop
        self._aio: AioFsync | None = None
        self._loop_wal: _WalFile | None = None  # the loop's descriptor of the WAL, for _aio
        self._unsynced: list[tuple[_Job[Any], Any]] = []  # committed, for the next sync
        self._syncing: list[tuple[_Job[Any], Any]] = []  # committed, for the sync running
        self._all_synced: asyncio.Future[None] | None = None  # stop() waits on it
        self._loop_commits = 0  # every commit on the loop so far
        self._sync_began = 0  # _loop_commits when the last fsync began: it covers them all
        self._answered_unsynced = 0  # the last commit on the loop of a write answered before its fsync
        self._unsynced_timer: asyncio.TimerHandle | None = None  # for them: see START_SYNC_AFTER

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tollgate-sqlite-writer", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._failure is not None:
            raise self._failure
        if self._connect_on_loop is not None:
            db: sqlite3.Connection | None = None
            try:
                db = self._connect_on_loop()
                if self._sync_wal:
                    (main,) = [row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"]
                    self._wal_path = main + "-wal"
                    self._files = _OpenedFiles(main, self._wal_path, main + "-shm")
                    # The descriptors fsyncs go through are opened now, not at the first fsync:
                    # a process out of descriptors then (a burst of connections) could not open
                    # one, and its store took that for a failed fsync and refused every write
                    # until restarted.
                    self._wal = _WalFile(self._wal_path, self._files)
                    if self._fsync_from_loop is not None:
                        self._aio = self._fsync_from_loop(asyncio.get_running_loop())
                        self._loop_wal = _WalFile(self._wal_path, self._files)
            except BaseException:
                self._close_aio()
                if db is not None:
                    db.close()
                await self._stop_thread()
                raise
            self._loop_db = db
        log.debug("the WAL is fsynced by %s", "the kernel (Linux AIO)" if self._aio else "the writer thread")

    async def stop(self) -> None:
        """Finish every write already submitted, then close the connections; a write
        submitted from now on is refused rather than left waiting."""
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._checkpointing:
            if self._checkpoint_over is None:
                self._checkpoint_over = loop.create_future()
            await asyncio.shield(self._checkpoint_over)  # a stop given up on leaves it to others
        self._commit_waiting()
        if self._unsynced_timer is not None:
            self._unsynced_timer.cancel()
            self._unsynced_timer = None
        while True:
            # The kernel's sync may be one for no write (see _sync_unsynced): closing Linux AIO
            # under it would block the loop until it ends.
            if self._syncing or self._unsynced or (self._aio is not None and self._aio.busy):
                if self._all_synced is None:
                    self._all_synced = loop.create_future()
                await asyncio.shield(self._all_synced)
            elif self._failure is None and self._sync_began < self._answered_unsynced:
                # Writes answered at their commit, their timer cancelled: SQLite's close fsyncs
                # nothing while another process has the database open.
                self._sync_soon([])
            else:
                break
        self._close_aio()
        await self._stop_thread()
        if self._loop_db is not None:
            self._loop_db.close()
            self._loop_db = None

    async def _stop_thread(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def check(self) -> None:
        """Raise what a write would hear now if the store takes no more writes; a file of the
        database replaced or removed since the last fsync stops it now (no write may come to
        find out)."""
        if self._failure is None and self._files is not None:
            try:
                self._files.check()
            except FileReplaced as exc:
                self._sync_failed(exc)
        if self._failure is not None:
            raise self._refusal()

    def submit(self, work: Work[T], atomic: bool = True, durable: bool = True) -> WriteFuture:
        if self._failure is not None:
            raise self._refusal()
        if self._closed:
            raise StoreError("The store is closed")
        loop = asyncio.get_running_loop()
        future = WriteFuture(loop=loop)
        job = _Job(work, future, loop, atomic, durable)
        if self._loop_db is None or self._barriers:
            self._to_thread(job)
        else:
            self._waiting.append(job)
            if len(self._waiting) == 1 and not self._checkpointing:
                loop.call_soon(self._commit_waiting)
        return future

    # --- on the loop ---------------------------------------------------------------------

    def _to_thread(self, job: _Job[Any], barrier: bool = False) -> None:
        if barrier:
            job.barrier = True
            self._barriers += 1
        self._put(job)

    def _put(self, item: _Item) -> None:
        """Hand an item to the thread; if the thread has stopped meanwhile (it may have been
        checked alive a moment ago, before a commit), answer it here instead."""
        self._queue.put(item)
        if self._thread_gone:
            self._abandon(self._drain())

    def _commit_waiting(self) -> None:
        if self._checkpointing and not self._barriers:
            return  # _checkpointed() commits them
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        if self._failure is not None:  # first: the thread may be gone
            for job in batch:
                _settle(job.future, False, self._refusal())
            return
        if self._barriers or self._loop_db is None:
            for job in batch:
                self._to_thread(job)  # behind the writes already waiting there
            return
        results = self._commit_batch(self._loop_db, batch)
        self._loop_commits += 1
        committed: list[tuple[_Job[Any], Any]] = []
        unsynced = False  # a write answered at its commit, before any fsync
        for job, (ok, value) in zip(batch, results):
            if not ok and isinstance(value, StoreBusy):
                # Nothing of it was written: the thread waits for the lock, and until it has it,
                # later writes go there too rather than find the lock taken again.
                self._to_thread(job, barrier=True)
            elif ok and job.durable and self._wal_path is not None:
                committed.append((job, value))
            else:
                unsynced = unsynced or (ok and self._wal_path is not None)
                _settle(job.future, ok, value)
        if committed:
            self._sync_soon(committed)
        elif unsynced:
            self._answered_unsynced = self._loop_commits
            if self._unsynced_timer is None:
                self._unsynced_timer = asyncio.get_running_loop().call_later(START_SYNC_AFTER, self._sync_unsynced)
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY and not self._checkpoint_running:
            self._commits = 0
            self._checkpoint_running = True
            self._put(_Checkpoint(asyncio.get_running_loop(), closing=False))

    def _sync_soon(self, committed: list[tuple[_Job[Any], Any]]) -> None:
        if self._failure is not None:
            # An fsync of SQLite's failed as they committed (the WAL starting over): never
            # another, since it would succeed without the pages lost.
            self._answer_unsaved(committed)
            return
        if self._aio is None or self._aio.loop is not asyncio.get_running_loop():
            self._sync_began = self._loop_commits
            self._put(_Sync(committed))  # the thread answers each write on its own loop
            return
        self._unsynced += committed
        if not self._aio.busy:
            self._start_sync()  # else the sync running began before these commits: the next one

    def _start_sync(self) -> None:
        assert self._aio is not None and self._loop_wal is not None
        batch, self._unsynced = self._unsynced, []
        try:
            self._aio.start(self._loop_wal.descriptor(), self._synced)
            self._sync_began = self._loop_commits
        except FileReplaced as exc:  # no fsync by the thread can help
            self._syncing = batch
            self._synced(exc)
            return
        except OSError as exc:
            log.warning("Could not start the WAL's fsync through Linux AIO (%s): the writer thread fsyncs it "
                        "from now on", exc)
            self._close_aio()
            self._put(_Sync(batch))
            return
        self._syncing = batch

    def _sync_unsynced(self) -> None:
        """An fsync for the writes answered at their commit, unless one has begun since."""
        self._unsynced_timer = None
        if self._sync_began >= self._answered_unsynced or self._closed or self._failure is not None:
            return
        if self._aio is not None and self._aio.busy:  # begun before them: look again after it
            self._unsynced_timer = asyncio.get_running_loop().call_later(START_SYNC_AFTER, self._sync_unsynced)
            return
        self._sync_soon([])

    def _synced(self, error: OSError | None) -> None:
        batch, self._syncing = self._syncing, []
        if error is not None:
            self._sync_failed(error)
        if self._failure is not None:
            batch, self._unsynced = batch + self._unsynced, []
            self._answer_unsaved(batch)
        else:
            for job, value in batch:
                _settle(job.future, True, value)
            if self._unsynced:
                self._start_sync()
        if not self._syncing and not self._unsynced and self._all_synced is not None:
            if not self._all_synced.done():
                self._all_synced.set_result(None)
            self._all_synced = None

    def _close_aio(self) -> None:
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        if self._loop_wal is not None:
            self._loop_wal.close()
            self._loop_wal = None

    def _checkpointed(self, closing: bool) -> None:
        if not closing and not self._closed:
            self._checkpointing = True  # until the closing pass has copied the rest
            self._put(_Checkpoint(asyncio.get_running_loop(), closing=True))
            return
        self._checkpoint_running = False
        self._checkpointing = False
        if self._checkpoint_over is not None:
            if not self._checkpoint_over.done():
                self._checkpoint_over.set_result(None)
            self._checkpoint_over = None
        self._commit_waiting()

    def _answered(self, outcomes: list[tuple[asyncio.Future[Any], bool, Any]], barriers: int) -> None:
        self._barriers -= barriers
        for future, ok, value in outcomes:
            _settle(future, ok, value)

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            db = self._connect()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        items: list[_Item] = []
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                items = [item]
                stop = False
                while len(items) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    items.append(more)
                self._handle(db, items)
                items = []
                if stop:
                    return
        except Exception:
            log.exception("The store's writer thread failed: the store takes no more writes")
        finally:
            if not self._closed:
                self._failure = StoreError("The store's writer thread stopped")
            self._closed = True
            db.close()
            if self._wal is not None:
                self._wal.close()
            # What was in hand when something blew up, and anything still queued (submitted
            # as the writer stopped), hears so rather than waits: a checkpoint's end included,
            # which writes on the loop may be waiting for. What is queued after this drain
            # (the loop found the thread alive just before) is answered by `_put`.
            self._thread_gone = True
            self._abandon(items + self._drain())

    def _drain(self) -> list[_Item]:
        items: list[_Item] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)

    def _abandon(self, items: list[_Item]) -> None:
        """Answer items the stopped thread will never handle (one already answered stays so)."""
        closed = (False, StoreError("The store is closed"))
        for item in items:
            if isinstance(item, _Job):
                self._deliver([item], [closed])
            elif isinstance(item, _Sync):
                # Committed on the loop, never fsynced: Unsaved, with each write's result, as
                # after a failed fsync, since every reader sees them (SQLiteStore answers them).
                unsaved: list[Outcome] = [
                    (False, Unsaved("The write was committed, but the store closed before it was on disk", value))
                    for _, value in item.committed
                ]
                self._deliver([job for job, _ in item.committed], unsaved)
            elif isinstance(item, _Checkpoint):
                _call_soon(item.loop, self._checkpointed, True)

    def _handle(self, db: sqlite3.Connection, items: list[_Item]) -> None:
        """First one fsync for every commit the loop asked to have synced (they were made
        before anything else here, which may wait for a lock); then the thread's own writes
        in one transaction; then a checkpoint if one is due."""
        syncs = [item for item in items if isinstance(item, _Sync)]
        if syncs:  # one of no writes: for those answered at their commit
            committed = [pair for item in syncs for pair in item.committed]
            self._deliver([job for job, _ in committed], self._sync(committed))
        jobs = [item for item in items if isinstance(item, _Job)]
        if jobs and self._failure is not None:
            self._deliver(jobs, [(False, self._refusal())] * len(jobs))
        elif jobs:
            results = self._commit_batch(db, jobs)
            if self._failure is not None:  # an fsync failed as they committed: none is known durable
                results = [(False, self._unsaved(value)) if ok else (ok, value) for ok, value in results]
            self._deliver(jobs, results)
        for item in items:
            if isinstance(item, _Checkpoint):
                self._checkpoint(db, item.closing)
                _call_soon(item.loop, self._checkpointed, item.closing)

    def _checkpoint(self, db: sqlite3.Connection, closing: bool) -> None:
        """One pass of a checkpoint (on the thread). A passive one never waits, and so cannot
        copy what a reader's snapshot still needs; nor can the WAL start over while a reader
        reads from it. Readers whose transactions always overlap (a report polled from another
        process) would keep it growing for ever: once it is past RESTART_AT_FRAMES, the closing
        pass, which writes already wait for, waits a little (RESTART_WAIT) for the readers of
        old snapshots to finish, so that the next commit starts the WAL over."""
        try:
            if closing and self._wal_frames >= RESTART_AT_FRAMES:
                (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
                db.execute(f"PRAGMA busy_timeout = {int(RESTART_WAIT * 1000)}")
                try:
                    db.execute("PRAGMA wal_checkpoint(RESTART)")
                finally:
                    db.execute(f"PRAGMA busy_timeout = {timeout}")
            else:
                _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if not closing:
                    self._wal_frames = frames
        except sqlite3.Error as exc:
            self._failed(exc)  # else the next one tries again

    def _sync(self, committed: list[tuple[_Job[Any], Any]]) -> list[Outcome]:
        """fsync the WAL for writes the loop committed (on the thread)."""
        if self._failure is None:
            try:
                assert self._wal is not None  # opened at start, with the WAL's path
                self._fsync(self._wal.descriptor())
                return [(True, value) for _, value in committed]
            except OSError as exc:
                self._sync_failed(exc)
        return [(False, self._unsaved(value)) for _, value in committed]

    def _failed(self, exc: Exception) -> Exception:
        """What a write that raised `exc` hears (`busy_or`). An fsync of SQLite's own that failed
        (a commit's on the thread, a checkpoint's, the WAL header's as the WAL starts over)
        stops the store as one of ours does: the descriptor it was made through has had the
        error, and SQLite's next fsync there would succeed without the pages lost."""
        if getattr(exc, "sqlite_errorcode", None) in _FSYNC_FAILED:
            self._sync_failed(exc)
        return busy_or(exc)

    def _sync_failed(self, error: Exception) -> None:
        """After a failed fsync, never another, on the loop or the thread: the pages it lost
        are marked clean, so the next fsync would succeed without them."""
        if self._failure is None:
            log.error("Saving the database to disk failed (%s): the store takes no more writes", error)
            self._lost = isinstance(error, FileReplaced) and error.lost
            self._failure = StoreError(f"saving to disk failed ({error})")

    def _answer_unsaved(self, committed: list[tuple[_Job[Any], Any]]) -> None:
        """Answer writes committed on the loop once an fsync has failed: perhaps not on disk."""
        for job, value in committed:
            _settle(job.future, False, self._unsaved(value))

    def _unsaved(self, value: Any) -> StoreUnavailable:
        if self._lost:  # committed into a file that is no longer the database's: refused
            return self._refusal()
        return Unsaved(f"The write was committed but may not be on disk: {self._failure}", value)

    def _refusal(self) -> StoreUnavailable:
        return StoreUnavailable(f"The store takes no more writes until Tollgate is restarted: {self._failure}")

    def _commit_batch(self, db: sqlite3.Connection, batch: list[_Job[Any]]) -> list[Outcome]:
        """`_commit`, on the loop or the thread; a write function gone badly wrong fails its
        batch, and whoever ran it carries on."""
        try:
            return self._commit(db, batch)
        except BaseException as exc:
            _end_transaction(db)
            return [(False, StoreError(f"The write failed: {exc!r}"))] * len(batch)

    def _commit(self, db: sqlite3.Connection, batch: list[_Job[Any]]) -> list[Outcome]:
        if not batch:
            return []
        if len(batch) == 1:
            return [self._alone(db, batch[0])]
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            return [(False, busy_or(exc))] * len(batch)
        results: list[Outcome] = []
        try:
            for index, job in enumerate(batch):
                if job.atomic:
                    db.execute("SAVEPOINT write")
                try:
                    result = job.work(db)
                except Exception as exc:
                    error = self._failed(exc)
                    if not db.in_transaction:
                        # The failure ended the whole transaction and undid the writes before it
                        # as well: they go again without the one that failed.
                        results = self._commit(db, batch[:index] + batch[index + 1 :])
                        results.insert(index, (False, error))
                        return results
                    if job.atomic:
                        db.execute("ROLLBACK TO write")
                        db.execute("RELEASE write")
                    # A single statement that failed was undone by SQLite itself.
                    results.append((False, error))
                else:
                    if job.atomic:
                        db.execute("RELEASE write")
                    results.append((True, result))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            # The transaction as a whole failed: nothing of it stands, so nobody succeeded.
            _end_transaction(db)
            failure = self._failed(exc)
            return [(False, failure)] * len(batch)
        return results

    def _alone(self, db: sqlite3.Connection, job: _Job[Any]) -> Outcome:
        """A write with nobody to share a commit with: no savepoint, and a single statement
        runs as its own transaction."""
        try:
            if not job.atomic:
                return True, job.work(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = job.work(db)
                db.execute("COMMIT")
            except BaseException:
                _end_transaction(db)
                raise
            return True, result
        except Exception as exc:
            return False, self._failed(exc)

    def _deliver(self, jobs: list[_Job[Any]], results: list[Outcome]) -> None:
        """Back to each job's loop in one hop."""
        by_loop: dict[asyncio.AbstractEventLoop, tuple[list[tuple[asyncio.Future[Any], bool, Any]], list[int]]] = {}
        for job, (ok, value) in zip(jobs, results):
            outcomes, barriers = by_loop.setdefault(job.loop, ([], [0]))
            outcomes.append((job.future, ok, value))
            barriers[0] += job.barrier
        for loop, (outcomes, barriers) in by_loop.items():
            _call_soon(loop, self._answered, outcomes, barriers[0])


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # that loop is closed: nobody is waiting any more


class FileReplaced(OSError):
    """The database, its WAL or its index is no longer, at its path, the file SQLite has open.
    `lost`: the database or its WAL, so that what is committed from then on is lost (the index
    alone: the commits are in the database, at risk only from another process's)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} was replaced or removed while the store had it open")
        self.lost = not path.endswith("-shm")


class _OpenedFiles:
    """The database, its WAL and its shared-memory index as SQLite opened them. SQLite keeps
    them open, and never replaces them, while the loop's connection is open: a path that names
    another file, or none, means the file was replaced or removed underneath (a restore made
    while Tollgate ran, a WAL deleted), and commits go where no process opening the database
    will look (or, the index replaced, where another process's commits overwrite them)."""

    def __init__(self, *paths: str) -> None:
        self._paths = paths
        self._files: list[tuple[int, int]] | None = None  # as first seen (SQLiteStore.open looks at once)
        self._next_glance = 0.0  # time.monotonic() from which a glance checks again

    def glance(self) -> None:
        """`check`, at most once every FILES_CHECK_EVERY seconds: three stat results a call
        were 5% of its instructions. An fsync between two checks is of the right file still
        (see `_WalFile`); a replacement is found out within that second."""
        if time.monotonic() >= self._next_glance:
            self.check()

    def check(self) -> None:
        self._next_glance = time.monotonic() + FILES_CHECK_EVERY
        files = []
        for path in self._paths:
            try:
                status = os.stat(path)
            except FileNotFoundError:
                raise FileReplaced(path) from None
            files.append((status.st_dev, status.st_ino))
        if self._files is None:
            self._files = files
        for path, now, opened in zip(self._paths, files, self._files):
            if now != opened:
                raise FileReplaced(path)


class _WalFile:
    """A descriptor of the WAL that the loop's connection commits to, for its fsyncs. An
    fsync through any descriptor of a file flushes all of it. Opened once, as it is made (the
    files checked first), and never again: it stays the file SQLite writes, whatever is put at
    its path later (`_OpenedFiles` finds that out)."""

    def __init__(self, path: str, files: _OpenedFiles) -> None:
        self._files = files
        files.check()
        self._fd = os.open(path, os.O_RDONLY)  # -1 once closed
        self._fsynced = False  # descriptor() has been asked for

    def descriptor(self) -> int:
        if self._fsynced:
            self._files.glance()
        else:
            # The first fsync looks at the files whatever the time: one replaced since they
            # were opened is found out before any write is answered as durable in it.
            self._files.check()
            self._fsynced = True
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    elif isinstance(value, StopIteration):  # a future cannot hold one
        future.set_exception(RuntimeError(f"the write raised {value!r}"))
    else:
        future.set_exception(value)


def _end_transaction(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


# SQLite's errors that mean the database cannot be written now, whatever is tried: the disk
# is full, failing or read-only, or the file cannot be opened (extended codes included).
# A damaged file (SQLITE_CORRUPT, SQLITE_NOTADB) is an outage too, not a fault of the request.
_UNWRITABLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_CORRUPT", "SQLITE_NOTADB")
_FSYNC_FAILED = (1034, 1290)  # SQLITE_IOERR_FSYNC, SQLITE_IOERR_DIR_FSYNC


def busy_or(exc: Exception) -> Exception:
    """SQLite's "database is locked" as the store's StoreBusy, a database that cannot be
    written now (disk full, I/O error, read-only) as StoreUnavailable; anything else as it is."""
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
        return StoreBusy("The database is busy; try again shortly")
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None) or ""
        if name.startswith(_UNWRITABLE):
            return StoreUnavailable(f"The database cannot be written now: {exc} ({name})")
    return exc
