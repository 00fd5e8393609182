"""Changes to keys, teams and model groups, signalled at once to every process that shares
the database.

Lookups of these are cached (cache.py). A process that changes one, the CLI included, writes a
new random stamp into a small file beside the database (`<database>-changes`), mapped into
the memory of every process that uses it; each cached lookup first compares the stamp, a read
of eight bytes, and drops what it had read when the stamp moved. SQLite's database is shared by
the processes of one host only, so one shared page reaches all of them. A random stamp rather
than a counter: two processes changing things at once can never write the same value twice.

The cache's TTL stays as the backstop: should a process die between its commit and its stamp,
or the file be unusable (then every process keeps its own stamp, and says so at start-up).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from types import TracebackType

from .config import DatabaseConfig

log = logging.getLogger("tollgate")

SIZE = 8


class ChangeSignal:
    def __init__(self, path: str | None = None) -> None:
        self._path = path
        self._map: mmap.mmap | None = None
        # Until opened, and without a file: this process's own stamp.
        self._stamp: bytearray | mmap.mmap = bytearray(SIZE)

    @classmethod
    def beside(cls, database: DatabaseConfig) -> ChangeSignal:
        path = database.sqlite_path
        # An in-memory database belongs to one connection: nothing to share. SQLite follows
        # symbolic links to the database, so processes naming it differently share it: so here.
        return cls(None if path in ("", ":memory:") else os.path.realpath(path) + "-changes")

    def open(self) -> None:
        if self._path is None or self._map is not None:
            return
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if os.fstat(fd).st_size < SIZE:
                    os.ftruncate(fd, SIZE)  # two processes doing this at once do the same thing
                if hasattr(os, "posix_fallocate"):
                    # The file's page is given its room on disk now: a page of a sparse file
                    # written through the map on a full disk kills the process (SIGBUS), where
                    # this is an OSError. It changes no byte already there.
                    try:
                        os.posix_fallocate(fd, 0, SIZE)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        # A filesystem that allocates nothing ahead: the map as before.
                self._map = mmap.mmap(fd, SIZE)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "%s: %s; other processes will see a revoked key, a suspended team or a changed "
                "model group only within auth.cache_ttl",
                self._path, exc.strerror or exc,
            )
            return
        self._stamp = self._map

    def close(self) -> None:
        if self._map is not None:
            self._stamp = bytearray(self._map[:SIZE])
            self._map.close()
            self._map = None

    def stamp(self) -> bytes | bytearray:
        """The current stamp: different from any earlier one once anything changed."""
        return self._stamp[:SIZE]

    def bump(self) -> None:
        """Call after a change is committed."""
        self._stamp[:SIZE] = os.urandom(SIZE)

    def __enter__(self) -> ChangeSignal:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
