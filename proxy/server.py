"""The HTTP server `tollgate serve` (and the demo) runs: uvicorn, with its httptools protocol
writing through a `CoalescingTransport` (coalesce.py)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from .coalesce import CoalescingTransport
from .errors import ApiError, error_body
from .observe import REFUSALS, REFUSED, RefusalObserver


# A request's head must fit in this many bytes, and the whole request arrive within
# `server.read_timeout`: uvicorn bounds neither, so a client trickling its head or body, or
# sending nothing, held a connection (and a file descriptor) for good, and one endless header
# grew the process's memory.
MAX_HEAD_BYTES = 64 * 1024
# The methods a refused request is counted under by name; any other is 'unknown'.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds a refused connection is kept open for the client to read the refusal.
LINGER = 2.0


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what `tollgate serve` ran before), writing through a
    `CoalescingTransport`: a plain answer's head and body leave in one write, and a stream's
    head with its first events. Requests are read within bounds of time and size; every
    refusal at this level is JSON."""

    def __init__(self, *args: Any, read_timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self._reading = True  # a request is due: a connection opened to send nothing is closed too
        self._head_bytes = 0
        self._head_done = False
        self._message_begun = False  # a request has begun and is not yet read whole
        self._message_started = time.perf_counter()
        self._read_timer: asyncio.TimerHandle | None = None
        self._discarding = False  # refused: what the client still sends is dropped
        self._linger_timer: asyncio.TimerHandle | None = None
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if not (self._reading and self._head_done):  # a head is being read, or is due
            # Over earlier reads the count is of head bytes alone; a read that takes it past the
            # bound must end the head within it (it may carry a body, or the next request, too).
            if self._head_bytes > MAX_HEAD_BYTES or (
                self._head_bytes + len(data) > MAX_HEAD_BYTES and not self._head_ends_within(data)
            ):
                # Refused before the parser saw this read: if it is the head's first, its request
                # line is read here for the answer's shape and the request's count.
                first = data if self._head_bytes == 0 else None
                self._refuse(431, f"The request's head is larger than {MAX_HEAD_BYTES // 1024} KiB", first)
                return
            self._head_bytes += len(data)
        super().data_received(data)
        # A request read whole in one go, as nearly all are, needs no timer.
        if self._reading:
            if self._read_timer is None:
                self._arm_read_timer()
        elif self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _head_ends_within(self, data: bytes) -> bool:
        left = MAX_HEAD_BYTES - self._head_bytes
        if data.find(b"\r\n\r\n", 0, left + 4) >= 0:
            return True
        # The blank line may have begun at the end of the previous read.
        return self._head_bytes > 0 and data.startswith((b"\n", b"\r\n"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # Not the head's count: this read's bytes, counted before the parser took them, are its.
        self._reading, self._head_done = True, False
        self._message_begun = True
        self._message_started = time.perf_counter()

    def on_headers_complete(self) -> None:
        self._head_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading, self._head_bytes, self._message_begun = False, 0, False
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def _arm_read_timer(self) -> None:
        self._read_timer = self.loop.call_later(self._read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self._reading or self.transport.is_closing():
            return
        if not self._message_begun and self.cycle is None:
            self.transport.close()  # opened and never used: nothing to answer
            return
        self._refuse(408, f"The request did not arrive whole within {self._read_timeout:g} s")

    def _refuse(self, status: int, message: str, unparsed: bytes | None = None) -> None:
        cycle = self.cycle  # on a kept-alive connection, the previous request's until a head is read
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # an answer is under way: it cannot be replaced
            return
        # The target as far as it was read, for the error's shape: OpenAI's under /v1.
        method, target = self._request_line(unparsed)
        path = target.partition(b"?")[0].decode("latin-1")
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        body = json.dumps(error_body(path, ApiError(status, message, code=code))).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        if cycle is None or cycle.response_complete:
            self._close_once_read()
        else:
            self.transport.close()  # the app's receive() hears of it, and the client sent all it would
        self._observe_refusal(status, method)

    def _close_once_read(self) -> None:
        """Close once the client has read the refusal, whatever else it still sends: a socket
        closed with the client's bytes unread in it sends a reset, which may reach the client
        before the refusal does and destroy it unread (a head over 64 KiB always leaves bytes
        unread). The rest is read and dropped, for at most LINGER seconds."""
        self._discarding = True
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the client reads the refusal, then its end, and hangs up
        self._linger_timer = self.loop.call_later(LINGER, self.transport.close)

    def _request_line(self, unparsed: bytes | None) -> tuple[str, bytes]:
        """The refused request's method (one of a fixed few, for the metrics' labels, else
        'unknown') and target (b"" if not known), from the parser or, for a request it never
        saw, from its first bytes."""
        if unparsed is not None:
            method, space, rest = unparsed[:MAX_HEAD_BYTES].partition(b" ")
            target = rest.partition(b" ")[0] if space else b""
        elif self._message_begun:
            target = self.url  # as far as it was read
            try:
                method = self.parser.get_method()
            except Exception:  # httptools has not read the method yet
                method = b""
        else:
            return "unknown", b""
        name = method.decode("latin-1")
        return (name if name in _METHODS else "unknown"), target

    def _observe_refusal(self, status: int, method: str) -> None:
        """Count and log the refused request like any other: through the app's own observation
        when the app runs it (its head was read), else here."""
        cycle = self.cycle
        if self._head_done and cycle is not None and not cycle.response_complete:
            cycle.scope[REFUSED] = status  # type: ignore[literal-required]
            return
        observe: RefusalObserver | None = self.app_state.get(REFUSALS)
        if observe is not None:
            observe(method, status, time.perf_counter() - self._message_started)


def uvicorn_options(
    host: str, port: int, log_level: str, shutdown_grace: float, read_timeout: float
) -> dict[str, Any]:
    """How Tollgate runs uvicorn: its own access log and protocol, no `server` header."""
    return dict(
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        # A partial rather than a class made here: uvicorn hands it to its worker processes.
        http=functools.partial(CoalescingHttpProtocol, read_timeout=read_timeout),
        timeout_graceful_shutdown=shutdown_grace,
    )


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, which also stops listening once told to stop.
    The listening socket is the supervisor's as well as each worker's: kept open, the kernel
    would go on taking new connections on it after every worker had stopped accepting them,
    and leave them unanswered until the workers had drained (up to `server.shutdown_grace`),
    then reset them, where one process refuses them at once."""

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()


def serve_workers(app: str, workers: int, options: dict[str, Any]) -> None:
    """`uvicorn.run(app, factory=True, workers=workers, **options)`, with `_Supervisor`."""
    config = uvicorn.Config(app, factory=True, workers=workers, **options)
    sock = config.bind_socket()
    try:
        _Supervisor(config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
