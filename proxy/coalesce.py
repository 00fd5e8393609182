"""Writes made in one turn of the event loop reach the socket in one system call.

uvloop hands every `transport.write()` to the kernel at once. On TCP over loopback or a LAN a
write is dear: the writer's CPU runs the receiving side of the stack too and wakes the reader,
and under load the socket writes were the largest single cost left in a call, a sixth of
Tollgate's CPU (bench/RESULTS.md, session 18). A plain answer was two of them under uvicorn
(its head at `http.response.start`, its body after), and every call sent Redis two commands of
its own (its admit, and its settle as it ends) while other calls' went out beside them.

`CoalescedWrites` holds what is written to a transport until the loop has run the callbacks
that were ready with it, then sends it all at once: in the next turn, before the loop waits
for I/O again. Nothing is held longer than that, and what comes after it on any transport this
way is sent after it. From `FLUSH_AT` bytes on, the writes go at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_AT = 64 * 1024  # uvicorn's own high-water mark: this much or more is sent without waiting


class CoalescedWrites:
    """The writes to one transport made in this turn of the loop, to be sent together."""

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Send what is held (a no-op when nothing is: the turn's callback may find it sent)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._size = 0
        if self._transport.is_closing():
            return  # the peer went away within the turn: uvloop would raise, and no one would read it
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def discard(self) -> None:
        self._pending = []
        self._size = 0


class CoalescingTransport(asyncio.Transport):
    """A transport whose writes leave once per turn of the loop; the rest is the wrapped one's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._writes = CoalescedWrites(transport, loop)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Held until the turn's end, so a buffer the caller may reuse at once is copied, as a
        # transport's write would have sent or copied it by then.
        self._writes.write(data if type(data) is bytes else bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        self._writes.flush()  # closing sends what was written first, as the wrapped one does
        self._transport.close()

    def abort(self) -> None:
        self._writes.discard()
        self._transport.abort()

    def write_eof(self) -> None:
        self._writes.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)
