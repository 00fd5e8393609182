"""fdatasync started from the event loop and finished by the kernel: Linux AIO's
IOCB_CMD_FDSYNC, its end signalled on an eventfd that the loop watches.

Waiting for the disk must not stall the loop, and handing each sync to a thread costs a
CPython process more than the sync itself: the thread's wake-up, its turns at the GIL and
the hop back to the loop came to about 125 µs of CPU per sync against 30 µs this way
(bench/RESULTS.md). The kernel runs the sync (`vfs_fsync`, as fdatasync does) on a worker
of its own. Where Linux AIO is not to be had (another system or architecture, a seccomp
profile that forbids it, a file system that refuses the operation), `open` returns None or
`start` raises, and the store's writer thread syncs instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
import sys
from typing import Callable

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1  # signal the eventfd in aio_resfd when done

Done = Callable[[OSError | None], None]


class _Iocb(ctypes.Structure):  # struct iocb, little-endian
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class AioFsync:
    """One sync at a time: `start` it, and `done` is called on the loop when it has ended,
    with None or the error the sync met."""

    def __init__(self, loop: asyncio.AbstractEventLoop, syscall: Callable[..., int], numbers: tuple[int, ...],
                 context: int, eventfd: int) -> None:
        self._loop = loop
        self._syscall = syscall
        self._destroy, self._getevents, self._submit = numbers[1:]
        self._context = ctypes.c_ulong(context)
        self._eventfd = eventfd
        self._iocb = _Iocb(aio_lio_opcode=_IOCB_CMD_FDSYNC, aio_flags=_IOCB_FLAG_RESFD, aio_resfd=eventfd)
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._event = _Event()
        self._no_wait = _Timespec(0, 0)
        # Every sync passes the same arguments (the fd is in the iocb): made once, not per sync.
        self._submit_args = (ctypes.c_long(self._submit), self._context, ctypes.c_long(1), self._iocbs)
        self._getevents_args = (ctypes.c_long(self._getevents), self._context, ctypes.c_long(0), ctypes.c_long(1),
                                ctypes.byref(self._event), ctypes.byref(self._no_wait))
        self._done: Done | None = None
        loop.add_reader(eventfd, self._reap)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop) -> AioFsync | None:
        # The kernel's machine, and a 64-bit Python on it: a 32-bit one has other syscall numbers.
        numbers = _SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None
        if numbers is None or ctypes.sizeof(ctypes.c_void_p) != 8:
            return None
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            return None
        syscall.restype = ctypes.c_long
        context = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(numbers[0]), ctypes.c_long(1), ctypes.byref(context)) != 0:
            return None  # ENOSYS, EPERM under seccomp, EAGAIN past aio-max-nr
        eventfd = None
        try:
            eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            return cls(loop, syscall, numbers, context.value, eventfd)
        except Exception:
            syscall(ctypes.c_long(numbers[1]), context)
            if eventfd is not None:
                os.close(eventfd)
            return None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def busy(self) -> bool:
        return self._done is not None

    def start(self, fd: int, done: Done) -> None:
        """OSError if the kernel would not take it (nothing was started then)."""
        if self._done is not None:
            raise RuntimeError("a sync is already running")
        self._iocb.aio_fildes = fd
        if self._syscall(*self._submit_args) != 1:
            error = ctypes.get_errno()
            raise OSError(error, f"Linux AIO refused the sync: {os.strerror(error)}")
        self._done = done

    def _reap(self) -> None:
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            return
        self._collect()

    def _collect(self) -> None:
        if self._done is None:
            return
        got = self._syscall(*self._getevents_args)
        error = ctypes.get_errno() if got < 0 else 0
        if got == 0 or error == errno.EINTR:
            # The kernel publishes the event before it signals the eventfd, so this should not
            # happen; if it does, the eventfd will not say so again: look once more.
            self._loop.call_soon(self._collect)
            return
        done, self._done = self._done, None
        if got < 0:
            done(OSError(error, f"reading the sync's result failed: {os.strerror(error)}"))
        elif self._event.res < 0:
            done(OSError(-self._event.res, os.strerror(-self._event.res)))
        else:
            done(None)

    def close(self) -> None:
        """After the last sync has ended (io_destroy would wait for one still running)."""
        self._loop.remove_reader(self._eventfd)
        self._syscall(ctypes.c_long(self._destroy), self._context)
        os.close(self._eventfd)
