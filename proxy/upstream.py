"""The one HTTP client to the LiteLLM Proxy, shared by the whole process.

A small HTTP/1.1 client on asyncio and httptools (the parser uvicorn already
uses), with a keep-alive pool. It replaced httpx on the hot path because
httpx's request and response layers cost more CPU than the whole budget of a
proxied call (bench/RESULTS.md has the numbers); Tollgate only ever needs two
requests of it, a POST whose answer may stream and a GET of JSON, so the
client is no bigger than that. The request head is built once at start-up.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
from collections import deque
from typing import Any, AsyncIterator, TypeVar
from urllib.parse import urlsplit

import httptools

from .config import Secret, UpstreamConfig

T = TypeVar("T")
CHAT_PATH = "/v1/chat/completions"
# Below uvicorn's default keep-alive timeout (5 s), which LiteLLM runs with: a connection is
# dropped here before LiteLLM would close it under a request.
KEEPALIVE_EXPIRY = 4.0
# Buffered, unread response bytes before the socket stops being read. A stream whose client
# reads nothing holds this much besides one such piece written toward it: 256 KiB made that
# ~680 KB of memory per stalled stream, 64 KiB ~440 KB (bench/RESULTS.md, session 37).
_PAUSE_AT = 64 * 1024
# The most bytes an answer's head (status line, headers, interim 1xx answers) may take: the
# parser keeps all of it, so an upstream sending headers without end would fill the memory. A
# chunked answer's trailer section, after its last chunk, is bounded alike.
MAX_HEAD_BYTES = 64 * 1024
_TRAILER_TOO_LARGE = f"the upstream's trailer fields are over {MAX_HEAD_BYTES} bytes"
# The most bytes a non-streaming answer may take: it is read whole before it is relayed, so an
# upstream sending a body without end would fill the memory. Far above any chat completion's
# (audio output included); a stream's events have their own bound (sse.MAX_EVENT_BYTES).
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class TransportError(Exception):
    """The request could not be sent or its answer could not be read."""


class ConnectError(TransportError):
    pass


class ReadError(TransportError):
    """The connection closed before the answer was complete."""


class RemoteProtocolError(TransportError):
    pass


class AnswerTooLarge(RemoteProtocolError):
    """An answer read whole grew past its bound."""


class UpstreamTimeout(TransportError):
    pass


class ConnectTimeout(UpstreamTimeout):
    """No connection to the upstream within `upstream.timeouts.connect`: it cannot be reached."""


class DeadlineExceeded(UpstreamTimeout):
    """The call's own deadline (`upstream.timeouts.total`) came during a wait on the upstream."""


class PoolExhausted(UpstreamTimeout):
    """No connection of the pool's `upstream.max_connections` came free in time: the wait was
    Tollgate's own, not LiteLLM's nor the model's."""


class UpstreamStatusError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class UpstreamResponse:
    """One answer: status and headers are in; the body arrives through `aiter_raw`."""

    def __init__(self, connection: "_Connection", read_timeout: float, deadline: float, head_due: float) -> None:
        self._connection = connection
        self._read_timeout = read_timeout
        self._deadline = deadline
        self.head_due = head_due  # loop time by which the head was due: the read timeout after sending
        # A bound on the waits for the body besides each silence's (`expect_by`), and its message.
        self._by = math.inf
        self._by_message = ""
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    # --- fed by the connection --------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_AT:
            self._connection.pause()
        self._wake()

    def _finished(self) -> None:
        self._complete = True
        self._wake()

    def _failed(self, error: Exception) -> None:
        if not self._complete:
            self._error = error
        self._wake()

    # --- read by the caller -----------------------------------------------------------

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer coding removed): each piece is all that
        had arrived, so a stream read behind its upstream goes on in one send, not one per chunk."""
        chunks = self._chunks
        while True:
            if chunks:
                if len(chunks) == 1:
                    data = chunks.popleft()
                else:
                    data = b"".join(chunks)
                    chunks.clear()
                self._buffered -= len(data)
                if self._buffered <= _PAUSE_AT:
                    self._connection.resume()
                yield data
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    async def aread(self, limit: int = MAX_ANSWER_BYTES) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise AnswerTooLarge(f"the upstream's answer grew past {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def expect_by(self, due: float, message: str) -> None:
        """Have every wait for the body end by `due` (loop time) too, with UpstreamTimeout(message),
        however often data arrives before then: the read timeout bounds only each silence, which
        an upstream sending bytes of no use (a stream's comments) never lets run out. math.inf
        lifts the bound."""
        self._by, self._by_message = due, message

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        due, message = loop.time() + self._read_timeout, "no data from the upstream in time"
        if self._by < due:
            due, message = self._by, self._by_message
        try:
            await self._connection.within(waiter, due, message, self._deadline)
        finally:
            self._waiter = None

    async def aclose(self) -> None:
        """Give the connection back when the answer was read to its end; otherwise close
        it, which is how the upstream learns that nobody is listening any more. Not after a
        5xx either: a server in trouble may close it without saying so (LiteLLM after its
        catch-all 500), and the next call sent on it would fail for nothing."""
        if self._closed:
            return
        self._closed = True
        self._connection.release(reusable=self._complete and not self._chunks and self.status_code < 500)


async def _within(
    waiter: asyncio.Future[T], seconds: float, message: str, error: type[UpstreamTimeout] = UpstreamTimeout
) -> T:
    """Await `waiter`, failing it with `error`(message) if it takes longer than `seconds`: a
    timer handle costs less than asyncio.timeout()."""
    timer = asyncio.get_running_loop().call_later(seconds, _expire, waiter, message, error)
    try:
        return await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[Any], message: str, error: type[UpstreamTimeout]) -> None:
    if not waiter.done():
        waiter.set_exception(error(message))


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "Upstream") -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = False  # it was kept alive after an answer, and taken again
        self.idle_since = 0.0
        self._response: UpstreamResponse | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._headers: dict[str, str] = {}
        self._paused = False
        self._keep_alive = False
        self._head_bytes = 0  # bytes received while the current answer's head was not complete
        self._interim = False  # the parser is in a 1xx interim answer, which is skipped
        # A chunked answer's trailer fields come after its body, through `on_header` too: they
        # are not the answer's headers (the head said those), and the parser keeps each, a
        # field's unfinished line included, until the answer ends. Dropped, and bounded as the
        # head is, by the bytes since the body's last data: of reads after the head that brought
        # none (chunk size lines, a trailer), and of trailer fields read whole in the others.
        self._head_read = False  # the current answer's (final) head is complete
        self._quiet = False  # the read under way came after the head and has brought no body data
        self._bodiless_bytes = 0
        # What a request or its response waits for from this connection, one thing at a time,
        # and by when: one timer for them all, left armed from wait to wait (`within`).
        self._waiter: asyncio.Future[Any] | None = None
        self._due = 0.0
        self._overdue = ""  # the message of the wait's own timeout; "" when the deadline ends it
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None:
            self.close()  # nothing was asked: an idle connection must stay silent
            return
        self._quiet = self._head_read
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # HttpParserCallbackError carries a RemoteProtocolError raised by a callback below.
            cause = exc.__context__ if isinstance(exc.__context__, RemoteProtocolError) else exc
            self._fail(RemoteProtocolError(f"malformed HTTP answer: {cause}"))
            self.close()
            return
        # Counted once the parser has read them, and only while the head is still unfinished:
        # a read that ends the head may carry much of the body too, which is not the head's.
        if self._head is not None and not self._head.done():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(RemoteProtocolError(f"the upstream's answer head is over {MAX_HEAD_BYTES} bytes"))
                self.close()
        elif self._quiet:
            self._bodiless_bytes += len(data)
            response = self._response
            if self._bodiless_bytes > MAX_HEAD_BYTES and response is not None and not response._complete:
                self._fail(RemoteProtocolError(_TRAILER_TOO_LARGE))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._watch is not None:
            self._watch.cancel()  # whatever was waited for hears of the loss below
            self._watch = None
        response = self._response
        if response is None:
            return
        if self._head is not None and not self._head.done():
            # Never sent again: however soon the close came, the upstream may have read the
            # request and started on it (a provider call that is charged). The caller falls back.
            self._fail(ReadError("the upstream closed the connection"))
        elif exc is None and not response._complete and not self._headers.get("content-length") and not self._chunked():
            response._finished()  # an answer delimited by the end of the connection
        else:
            self._fail(ReadError("the upstream closed the connection mid-answer"))

    # --- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        response = self._response
        if response is not None and response._complete:
            # Bytes after the end of the answer: no request asked for them. Read on, they
            # would become (part of) the next call's answer on this connection.
            raise RemoteProtocolError("the upstream sent more than its answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_read:  # a trailer field: dropped, and counted here unless its whole read is
            if not self._quiet:
                self._bodiless_bytes += len(name) + len(value) + len(": \r\n")
                if self._bodiless_bytes > MAX_HEAD_BYTES:
                    raise RemoteProtocolError(_TRAILER_TOO_LARGE)
            return
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise RemoteProtocolError("the upstream switched protocols unasked")
            # 100 Continue, 103 Early Hints...: interim, the answer itself follows.
            self._interim = True
            self._headers = {}
            return
        response.status_code = status
        response.headers = self._headers
        self._head_read = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._head is not None and not self._head.done():
            self._head.set_result(response)

    def on_body(self, body: bytes) -> None:
        self._quiet = False
        self._bodiless_bytes = 0
        if self._response is not None:
            self._response._body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        # The upstream's keep-alive timer starts as it ends its answer, not when the caller lets
        # the answer go (a relay may do so seconds later): idle from here.
        self.idle_since = asyncio.get_running_loop().time()
        if self._response is not None:
            self._response._finished()

    # --- used by the pool and the response --------------------------------------------

    @property
    def unanswered(self) -> bool:
        """No byte of an answer to the current request has arrived."""
        return self._head_bytes == 0

    def _chunked(self) -> bool:
        # Only when chunked is the last coding, as the parser reads it (RFC 9112, 6.3): an answer
        # whose codings end in another runs to the close of its connection, and is whole then.
        return self._headers.get("transfer-encoding", "").rpartition(",")[2].strip().lower() == "chunked"

    def _fail(self, error: Exception) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._response is not None:
            self._response._failed(error)

    async def request(self, head: bytes, body: bytes, read_timeout: float, deadline: float) -> UpstreamResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._headers = {}
        self._head_bytes = 0
        self._head_read = False
        self._bodiless_bytes = 0
        due = loop.time() + read_timeout
        self._response = UpstreamResponse(self, read_timeout, deadline, due)
        self._head = head_future = loop.create_future()
        self.transport.write(head + body)
        return await self.within(head_future, due, "no answer from the upstream in time", deadline)

    async def within(self, waiter: asyncio.Future[T], due: float, message: str, deadline: float) -> T:
        """Await `waiter`, failing it with UpstreamTimeout(message) at `due` (loop time), or
        with DeadlineExceeded at `deadline` if that comes no later. A timer per wait is a libuv
        handle made and cancelled under uvloop (asyncio.timeout() came to 26k instructions a
        call): the connection keeps one, armed for the earliest wait it may have to end, and
        when it fires it ends the wait running then or arms itself for that one's end."""
        loop = asyncio.get_running_loop()
        if deadline <= due:
            due, message = deadline, ""
        self._waiter, self._due, self._overdue = waiter, due, message
        if self._watch is None or self._watch_at > due:
            if self._watch is not None:
                self._watch.cancel()
            self._watch, self._watch_at = loop.call_at(due, self._check_overdue), due
        try:
            return await waiter
        finally:
            self._waiter = None

    def _check_overdue(self) -> None:
        self._watch = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing is waited for: the next wait arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._due:
            # Made only now, not for every wait: nearly every wait ends in time.
            overdue = self._overdue
            waiter.set_exception(UpstreamTimeout(overdue) if overdue else DeadlineExceeded("the call's time ran out"))
        else:
            self._watch, self._watch_at = loop.call_at(self._due, self._check_overdue), self._due

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def release(self, reusable: bool) -> None:
        reusable = reusable and self._keep_alive and not self.lost and not self._paused
        self._response = None
        self._head = None
        if not reusable:
            self.close()
        self._pool._release(self, reusable)

    def close(self) -> None:
        self.lost = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.transport is not None:
            self.transport.close()


class Upstream:
    def __init__(self, config: UpstreamConfig, key: Secret | None) -> None:
        self.timeouts = config.timeouts
        self.url = config.url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream.url: not an http(s) URL: {config.url}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        host = parts.netloc.rsplit("@", 1)[-1]
        # Everything but the length is the same for every call: built once.
        common = f"Host: {host}\r\nAccept-Encoding: identity\r\n"  # bytes are relayed: never compressed
        if key is not None:
            common += f"Authorization: Bearer {key.value}\r\n"
        self._common = common.encode("latin-1")
        self._chat_head = (
            f"POST {self._prefix}{CHAT_PATH} HTTP/1.1\r\n".encode("latin-1")
            + self._common
            + b"Content-Type: application/json\r\nContent-Length: "
        )
        self._max_connections = config.max_connections
        self._max_idle = config.max_keepalive_connections
        self._idle: list[_Connection] = []
        self._open = 0  # connections counted against max_connections
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def max_connections(self) -> int:
        return self._max_connections

    async def aclose(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
            self._open -= 1
        self._idle.clear()

    async def open_chat(self, body: bytes, deadline: float = math.inf, stream: bool = False) -> UpstreamResponse:
        """Send a chat request; return as soon as the response headers are in. Every wait for
        it and its answer, a free connection's included, ends by `deadline` (loop time) at the
        latest, with DeadlineExceeded (or UpstreamTimeout, waiting for a free connection).
        `stream`: a streamed call's, whose headers and each chunk are due within first_byte;
        otherwise the answer is due within `answer`."""
        head = self._chat_head + str(len(body)).encode() + b"\r\n\r\n"
        return await self._send(head, body, self.timeouts.first_byte if stream else self.timeouts.answer, deadline)

    async def get_json(self, path: str, timeout: float) -> Any:
        """GET `path`'s JSON within `timeout` seconds in all: each silence's own bound would not end
        an answer that drips without end."""
        head = f"GET {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._common + b"\r\n"
        response = await self._send(head, b"", timeout, asyncio.get_running_loop().time() + timeout, safe=True)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        if not 200 <= response.status_code < 300:
            raise UpstreamStatusError(response.status_code)
        return json.loads(content)

    async def _send(
        self, head: bytes, body: bytes, read_timeout: float, deadline: float, safe: bool = False
    ) -> UpstreamResponse:
        """`safe`: the request may be sent twice (a GET). One sent on a kept-alive connection that
        the upstream closed before any byte of an answer most likely raced the upstream's idle
        close, and is sent again on another connection; a call never is (README, "Own HTTP and
        Redis clients"): the upstream may have read it and started on it."""
        while True:
            connection = await self._acquire(deadline)
            try:
                return await connection.request(head, body, read_timeout, deadline)
            except ReadError:
                connection.release(reusable=False)
                if not (safe and connection.reused and connection.unanswered):
                    raise
            except BaseException:
                connection.release(reusable=False)
                raise

    # --- the pool -----------------------------------------------------------------------

    async def _acquire(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise TransportError("the upstream client is closed")
            now = loop.time()
            while self._idle:
                connection = self._idle.pop()
                if not connection.lost and now - connection.idle_since < KEEPALIVE_EXPIRY:
                    connection.reused = True
                    return connection
                connection.close()
                self._open -= 1
            if self._open < self._max_connections:
                self._open += 1
                try:
                    return await self._connect(deadline - now)
                except BaseException:
                    self._open -= 1
                    self._wake_waiter()
                    raise
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await _within(
                    waiter, min(self.timeouts.connect, deadline - now), "no free upstream connection in time", PoolExhausted
                )
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_waiter()  # woken, then cancelled: the connection is someone else's
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self, remaining: float) -> _Connection:
        """Connect within `upstream.timeouts.connect`, or the `remaining` seconds of the call if fewer."""
        loop = asyncio.get_running_loop()
        timeout = self.timeouts.connect
        try:
            async with asyncio.timeout(min(timeout, remaining)):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl
                )
        except TimeoutError:
            if remaining < timeout:
                raise DeadlineExceeded("the call's time ran out") from None
            raise ConnectTimeout("connecting to the upstream timed out") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to the upstream: {exc.strerror or exc}") from None
        return connection

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)  # idle since its answer ended (on_message_complete)
        else:
            if reusable:
                connection.close()
            self._open -= 1
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
