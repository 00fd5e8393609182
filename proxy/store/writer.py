"""One writer thread per process that owns SQLite's write connection and group-commits.

Every write is a plain function of a `sqlite3.Connection`. The thread takes all the
writes waiting in its queue, runs each inside its own savepoint of one
`BEGIN IMMEDIATE` transaction, commits once (one fsync for the lot), and only then
resolves their futures, in one hop back to the event loop. A write that raises is
rolled back to its savepoint alone; the others still commit. Nobody hears "done"
before the commit is durable, so a response never ends ahead of its record.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from . import StoreBusy, StoreError

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]
MAX_BATCH = 256


@dataclass
class _Job(Generic[T]):
    work: Work[T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    atomic: bool  # False: one statement, which needs no transaction of its own


class Writer:
    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._closed = False

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tollgate-sqlite-writer", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._failure is not None:
            raise self._failure

    async def stop(self) -> None:
        """Finish every write already submitted, then close the connection; a write
        submitted from now on is refused rather than left waiting."""
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    def submit(self, work: Work[T], atomic: bool = True) -> asyncio.Future[T]:
        if self._closed or self._failure is not None:
            raise StoreError("The store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(work, future, loop, atomic))
        return future

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            db = self._connect()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                batch = [job]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                try:
                    results = self._commit(db, batch)
                except BaseException as exc:  # a write function gone badly wrong: its batch fails, the thread lives
                    _end_transaction(db)
                    results = [(False, StoreError(f"The write failed: {exc!r}"))] * len(batch)
                self._deliver(batch, results)
                if stop:
                    return
        finally:
            self._closed = True
            db.close()
            # Anything still queued (submitted as the writer stopped) hears so rather than waits.
            left: list[_Job[Any]] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    left.append(item)
            self._deliver(left, [(False, StoreError("The store is closed"))] * len(left))

    def _commit(self, db: sqlite3.Connection, batch: list[_Job[Any]]) -> list[tuple[bool, Any]]:
        if not batch:
            return []
        if len(batch) == 1:
            return [self._alone(db, batch[0])]
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            return [(False, busy_or(exc))] * len(batch)
        results: list[tuple[bool, Any]] = []
        try:
            for index, job in enumerate(batch):
                if job.atomic:
                    db.execute("SAVEPOINT write")
                try:
                    result = job.work(db)
                except Exception as exc:
                    error = busy_or(exc)
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
            failure = busy_or(exc)
            return [(False, failure)] * len(batch)
        return results

    def _alone(self, db: sqlite3.Connection, job: _Job[Any]) -> tuple[bool, Any]:
        """A write with nobody to share a commit with: every statement executed costs the
        thread a turn at the GIL against a busy event loop, so no savepoint, and a single
        statement runs as its own transaction."""
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
            return False, busy_or(exc)

    def _deliver(self, batch: list[_Job[Any]], results: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for job, (ok, value) in zip(batch, results):
            by_loop.setdefault(job.loop, []).append((job.future, ok, value))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, outcomes)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more


def _resolve(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.done():
            continue
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


def busy_or(exc: Exception) -> Exception:
    """SQLite's "database is locked" as the store's StoreBusy; anything else as it is."""
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
        return StoreBusy("The database is busy; try again shortly")
    return exc
