"""A minimal Redis client: RESP2 over one pipelined connection.

The limiter sends two scripts per call and nothing else, and redis-py's
per-command machinery (pool checkout, command packing, response callbacks)
cost more than the round trip itself (bench/RESULTS.md). One connection is
enough because Redis answers in order: concurrent commands are written as they
come and their replies matched first in, first out. A command that times out
leaves the connection's state unknown, so the connection is dropped, every
command waiting on it fails, and the next command connects afresh. Since replies come in
order, the oldest command waiting is the one to watch: one timer per connection does it,
not one per command (a timer is a libuv handle under uvloop, ~2 µs made and cancelled).

A command's time starts when it is written, at the end of its turn of the loop, and it is
called late only once the loop has looked for its reply after it fell due: a turn made long
by a load spike is the loop's delay, not Redis's, and blaming Redis for it would open the
limiter's breaker on a healthy server (uvloop even runs due timers before it reads sockets).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import ssl
from collections import deque
from itertools import repeat
from typing import Any, Callable, Coroutine, Sequence, cast
from urllib.parse import parse_qs, unquote, urlsplit

from .coalesce import CoalescedWrites


class RedisError(Exception):
    """Redis could not be reached or did not answer in time."""


class ReplyError(RedisError):
    """Redis answered with an error."""


class _Incomplete(Exception):
    pass


class ConnectionLost(RedisError):
    """The connection closed, with nothing said why."""


def encode(args: tuple[Any, ...] | list[Any]) -> bytes:
    return b"*%d\r\n%s" % (len(args), _bulk_strings(args))


def _bulk_strings(args: tuple[Any, ...] | list[Any]) -> bytes:
    parts = []
    for arg in args:
        if type(arg) is int:  # not a bool, whose text is "True"
            parts.append(_bulk_int(arg))
            continue
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _bulk_int(value: int) -> bytes:
    """An integer argument as a bulk string. The limiter's are mostly the same few (the window,
    each team's limits, a call's estimate, 0 and 1), so their encodings are kept."""
    data = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(data), data)


def parse(buffer: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One reply from `buffer` at `pos`: (value, position after it); _Incomplete if cut."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buffer[pos]
    if kind == _INTEGER:
        return int(buffer[pos + 1 : end]), end + 2
    if kind == _BULK:
        length = int(buffer[pos + 1 : end])
        pos = end + 2
        if length < 0:
            return None, pos
        if len(buffer) < pos + length + 2:
            raise _Incomplete
        return bytes(buffer[pos : pos + length]), pos + length + 2
    if kind == _ARRAY:
        count = int(buffer[pos + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        # A short array of integers only, as the limiter's scripts answer: one regular expression
        # reads it whole. Any other, or one not all in the buffer yet, is read item by item.
        whole = _integers(count).match(buffer, pos) if count <= _INTEGERS_MATCHED else None
        if whole is not None:
            return [int(item) for item in whole.groups()], whole.end()
        items = []
        size = len(buffer)
        for _ in range(count):
            # Integers read here without a call each.
            if pos < size and buffer[pos] == _INTEGER:
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    raise _Incomplete
                items.append(int(buffer[pos + 1 : end]))
                pos = end + 2
            else:
                item, pos = parse(buffer, pos)
                items.append(item)
        return items, pos
    line = bytes(buffer[pos + 1 : end]).decode("utf-8", "replace")
    if kind == _STATUS:
        return line, end + 2
    if kind == _ERROR:
        return ReplyError(line), end + 2
    raise RedisError(f"unexpected reply type {bytes(buffer[pos : pos + 1])!r}")


_INTEGER, _BULK, _ARRAY, _STATUS, _ERROR = b":$*+-"


_INTEGERS_MATCHED = 64  # the longest array of integers read by a pattern: the limiter's have 8 or 12


@functools.lru_cache(maxsize=_INTEGERS_MATCHED + 1)
def _integers(count: int) -> re.Pattern[bytes]:
    """`count` integer replies in a row, each a group: a script's reply has the same length
    every time (one per number of scopes), so the few patterns are compiled once."""
    return re.compile(rb":(-?\d+)\r\n" * count)


# The most bytes held unparsed: a reply not yet whole, or bytes no command asked for. The limiter's
# replies are a few hundred bytes at most; a Redis (or another service at its address) sending one
# without end, or sending unasked (no command waits, so no timeout runs), would fill the memory.
MAX_REPLY_BYTES = 1024 * 1024


class _Connection(asyncio.Protocol):
    refused: "ReplyError | None" = None  # what Redis answered a SCRIPT LOAD of the set-up with, if it refused one
    error: RedisError | None = None  # why the connection was lost

    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.lost = False
        self._buffer = bytearray()
        self._writes: _TimedWrites | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout
        self._held = 0  # replies owed to commands written this turn, not yet sent
        self._sent_at: deque[float] = deque()  # loop time each sent command's reply is owed from
        self._watch: asyncio.TimerHandle | None = None  # due when the oldest of them is
        self._looked = float("-inf")  # loop time the timer last found a reply overdue, then waited for a poll

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        # The commands of every call in this turn of the loop (admits, settles) leave in one write.
        self._writes = _TimedWrites(cast(asyncio.WriteTransport, transport), self._loop, self._sent)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return  # given up: what still comes answers nothing
        buffer = self._buffer
        buffer += data
        pos = 0
        try:
            while pos < len(buffer) and self.pending:
                value, pos = parse(buffer, pos)
                future = self.pending.popleft()
                if self._sent_at:
                    self._sent_at.popleft()
                else:  # Redis spoke first (max clients reached) while our commands were held
                    self._held -= 1
                if isinstance(value, ReplyError):
                    if not future.done():
                        future.set_exception(value)
                    if str(value).startswith("READONLY"):
                        # A primary demoted to replica keeps its clients and refuses their writes
                        # for good; a new connection may find the new primary at the same address.
                        self.fail(RedisError("Redis became a read-only replica"))
                        return
                elif not future.done():
                    future.set_result(value)
        except _Incomplete:
            pass
        except (RedisError, ValueError) as exc:
            self.fail(RedisError(f"unreadable reply: {exc}"))
            return
        del buffer[:pos]
        if len(buffer) > MAX_REPLY_BYTES:
            what = "a reply" if self.pending else "bytes no command asked for"
            self.fail(RedisError(f"Redis sent {what} larger than {MAX_REPLY_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(self._farewell() or ConnectionLost("connection to Redis lost"))

    def _farewell(self) -> RedisError | None:
        """An error Redis wrote before closing with no command waiting for it (too many clients,
        protected mode): it names why, where the closing alone says nothing."""
        if self._buffer[:1] != b"-":
            return None  # an answer cut short, or nothing left unread
        try:
            reply, _ = parse(self._buffer, 0)
        except (_Incomplete, RedisError, ValueError):
            return None
        return RedisError(f"Redis closed the connection, answering: {reply}")

    def fail(self, error: RedisError) -> None:
        self.lost = True
        self.error = self.error or error  # the first cause; closing the transport tells another
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._sent_at.clear()
        self._held = 0
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        if self._writes is not None:
            self._writes.discard()  # their futures have just failed: never sent, never answered
        if self.transport is not None:
            self.transport.close()

    def send(self, payload: bytes, replies: int) -> list[asyncio.Future[Any]]:
        assert self._writes is not None and self._loop is not None
        loop = self._loop
        if replies == 1:  # every command but a connection's setup: no lists to make
            futures = [loop.create_future()]
            self.pending.append(futures[0])
        else:
            futures = [loop.create_future() for _ in range(replies)]
            self.pending.extend(futures)
        self._held += replies  # before the write: past FLUSH_AT it is sent within it
        self._writes.write(payload)
        return futures

    def _sent(self) -> None:
        """The turn's commands have been written: their replies are owed from now."""
        assert self._loop is not None
        now = self._loop.time()
        if self._held == 1:
            self._sent_at.append(now)
        else:
            self._sent_at.extend(repeat(now, self._held))
        self._held = 0
        if self._watch is None:
            self._watch = self._loop.call_at(now + self._timeout, self._check_overdue)

    def _check_overdue(self) -> None:
        """A reply overdue leaves the connection's state unknown (it may still come, and be
        taken for the next command's): give up on the connection and all it waits for."""
        self._watch = None
        if self.lost or not self._sent_at:
            return
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        due = self._sent_at[0] + self._timeout
        now = loop.time()
        if now < due:
            self._watch = loop.call_at(due, self._check_overdue)
            return
        if due <= self._looked:
            # Due already when the timer last looked, and the loop has read its socket since:
            # late. Whichever reply is the oldest now (a Redis falling behind answers one between
            # any two looks, each later than the last), not only the one found overdue then.
            self.fail(RedisError("Redis did not answer in time"))
            return
        # Overdue by the clock, but the loop may not have read its socket since the reply fell
        # due (a long callback ran meanwhile): look again once it has polled.
        self._looked = now
        self._watch = loop.call_later(_LOOK_AGAIN, self._check_overdue)


class _TimedWrites(CoalescedWrites):
    """The turn's commands, written at its end, telling the connection when they have gone."""

    __slots__ = ("_sent",)

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop, sent: Callable[[], None]) -> None:
        super().__init__(transport, loop)
        self._sent = sent

    def flush(self) -> None:
        if self._pending:
            super().flush()
            self._sent()


# A timer this far off fires only after the loop has polled its sockets at least once more
# (libuv counts in milliseconds, and a timer made while timers run waits for the next turn).
_LOOK_AGAIN = 0.001


class Redis:
    def __init__(self, url: str, connect_timeout: float, timeout: float, scripts: Sequence["Script"] = ()) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        # Where it is, for the log: the URL without its credentials (a Redis reached inside a
        # container as `localhost`, which is the container itself, is the first thing to see),
        # an IPv6 host in brackets, or its last group reads as the port.
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.address = self._unix or f"{parts.scheme}://{host}:{self._port}"
        db = query.get("db", [""])[0] or (parts.path.strip("/") if parts.scheme != "unix" else "")
        self._setup: list[tuple[Any, ...]] = []
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
            self._setup.append(("AUTH", user, password) if user else ("AUTH", password))
        if db and db != "0":
            self._setup.append(("SELECT", int(db)))
        # Loaded on every connection before anything else is sent on it: a Redis that restarted
        # knows no scripts, and a script sent soon that it answered NOSCRIPT would be sent whole
        # only after commands written behind it had run (a settle landing after the next admit).
        for script in scripts:
            self._setup.append(("SCRIPT", "LOAD", script.source))
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False
        # A connection at this address has been set up: a plain URL that served is no TLS mismatch.
        self._served = False
        self._background: set[asyncio.Future[Any]] = set()

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.fail(RedisError("client closed"))
            self._connection = None

    @property
    def owes_replies(self) -> bool:
        """Whether commands sent on the live connection (or held for this turn's write) still
        wait for their replies."""
        connection = self._connection
        return connection is not None and not connection.lost and bool(connection.pending)

    def drop(self, reason: str) -> None:
        """Give up on the connection, as after a timeout: a reply that cannot be its command's
        leaves its state unknown. Every command waiting on it fails; the next connects afresh."""
        if self._connection is not None:
            self._connection.fail(RedisError(reason))

    async def connect(self) -> None:
        """Connected: what is sent from here to the next await leaves in one write, in order."""
        await self._connected()

    async def call(self, *args: Any) -> Any:
        connection = await self._connected()
        (future,) = connection.send(encode(args), 1)
        return await future

    async def evalsha(self, script: "Script", keys: "Keys", args: list[Any]) -> Any:
        # The connection up, as nearly always: taken without a coroutine more to await, and the
        # reply awaited here rather than in another (each await is resumed through every frame).
        connection = self._connection
        if self._closed or connection is None or connection.lost:
            connection = await self._connected()
        reply = self._send_evalsha(connection, script, keys, args)
        try:
            return await reply
        except ReplyError as exc:
            if not _forgotten(exc):
                raise
        return await self._whole_script(script, keys, args)

    def call_soon(self, *args: Any) -> asyncio.Future[Any]:
        """The command's reply, to come; on a live connection the command leaves with this
        turn of the loop's writes, ahead of any sent after it (see `evalsha_soon`)."""
        connection = self._connection
        if self._closed or connection is None or connection.lost:
            return self._in_background(self.call(*args))
        (reply,) = connection.send(encode(args), 1)
        return reply

    def evalsha_soon(self, script: "Script", keys: "Keys", args: list[Any]) -> asyncio.Future[Any]:
        """The script's reply, to come. On a live connection the command leaves with this
        turn of the loop's writes (coalesce.py), before anything written in a later turn on any
        connection, such as the answer of the call it settles: the caller need not wait for
        the reply to rely on that."""
        connection = self._connection
        if self._closed or connection is None or connection.lost:
            return self._in_background(self.evalsha(script, keys, args))
        reply = self._send_evalsha(connection, script, keys, args)
        # Callbacks on the reply rather than a task awaiting it: a task is made, stepped and
        # woken for every call's settle, for nothing but this.
        result: asyncio.Future[Any] = reply.get_loop().create_future()

        def replied(reply: asyncio.Future[Any]) -> None:
            if result.done():
                return
            if reply.cancelled():
                result.cancel()
                return
            error = reply.exception()
            if error is None:
                result.set_result(reply.result())
            elif _forgotten(error):
                again = self._in_background(self._whole_script(script, keys, args))
                again.add_done_callback(lambda again: _copy_outcome(again, result))
            else:
                result.set_exception(error)

        reply.add_done_callback(replied)
        return result

    @staticmethod
    def _send_evalsha(connection: _Connection, script: "Script", keys: "Keys", args: list[Any]) -> asyncio.Future:
        count = 3 + len(keys.names) + len(args)
        (reply,) = connection.send(b"*%d\r\n%s%s%s" % (count, script.wire, keys.wire, _bulk_strings(args)), 1)
        return reply

    async def _whole_script(self, script: "Script", keys: "Keys", args: list[Any]) -> Any:
        # Redis lost its scripts (a restart): send it whole. Rare enough that, sent soon,
        # this one command may land after others sent in the meantime.
        return await self.call("EVAL", script.source, len(keys.names), *keys.names, *args)

    def _in_background(self, command: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(command)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _connected(self) -> _Connection:
        for _ in range(2):
            if self._closed:
                raise RedisError("client closed")
            current = self._connection
            if current is not None and not current.lost:
                return current
            if self._connecting is None:
                # Concurrent callers share one attempt rather than racing to open several;
                # the attempt outlives any of them being cancelled.
                self._connecting = asyncio.ensure_future(self._connect())
                self._connecting.add_done_callback(self._connect_done)
            connection = await asyncio.shield(self._connecting)
            if not connection.lost:
                return connection
        # Closed at once, twice: what Redis said last, if anything, is why.
        if connection.error is not None and not isinstance(connection.error, ConnectionLost):
            raise connection.error
        if connection.refused is not None:
            raise RedisError(f"Redis closed the connection, answering: {connection.refused}")
        raise RedisError("the connection to Redis keeps closing")

    def _connect_done(self, attempt: asyncio.Future[_Connection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # whoever waited has it; nobody else should hear of it

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        protocol = functools.partial(_Connection, self._timeout)
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._unix is not None:
                    _, connection = await loop.create_unix_connection(protocol, self._unix)
                else:
                    transport, connection = await loop.create_connection(protocol, self._host, self._port)
                    if self._ssl is not None:
                        # Apart from the TCP connection, so that a failure of the handshake is
                        # told as one: to a Redis without TLS it times out.
                        tls = await loop.start_tls(
                            cast(asyncio.WriteTransport, transport), connection, self._ssl, server_hostname=self._host
                        )
                        if tls is None:
                            raise ConnectionResetError("the connection closed during the TLS handshake")
                        transport = None
                        connection.connection_made(tls)
        except TimeoutError:
            if transport is not None:
                transport.close()
                raise RedisError(f"no TLS handshake with Redis within redis.connect_timeout{_NO_TLS}") from None
            raise RedisError("connecting to Redis timed out") from None
        except OSError as exc:
            if transport is not None:
                transport.close()
                if isinstance(exc, ConnectionResetError):  # closed by a Redis that does serve TLS
                    raise RedisError(f"Redis closed the connection during the TLS handshake{_CLOSED_IN_TLS}") from None
                hint = "" if isinstance(exc, ssl.SSLCertVerificationError) else _NO_TLS
                raise RedisError(f"TLS handshake with Redis failed: {exc.strerror or exc}{hint}") from None
            raise RedisError(f"cannot connect to Redis: {exc.strerror or exc}") from None
        if connection.lost:
            # Closed before anything was sent on it: uvloop hands over a TLS connection that Redis
            # closed as the handshake ended. The set-up sent on it would be neither answered nor
            # failed, and every command would wait for this connect for good.
            said = connection.error  # what Redis wrote before closing, if anything
            raise said if said is not None and not isinstance(said, ConnectionLost) else self._closed_in_setup(None, True)
        if self._setup:
            payload = b"".join(encode(command) for command in self._setup)
            replies = connection.send(payload, len(self._setup))
            refused: ReplyError | None = None
            try:
                for command, future in zip(self._setup, replies):
                    try:
                        await future
                    except ReplyError as exc:
                        # A proxy in front of Redis (Envoy's, twemproxy) may take EVAL and EVALSHA
                        # but no SCRIPT: the scripts are then sent whole when found unknown. Not
                        # so a Redis that wants a password the URL does not give: it refuses all.
                        if command[0] != "SCRIPT" or str(exc).startswith("NOAUTH"):
                            raise
                        refused = connection.refused = refused or exc
            except BaseException as exc:
                connection.fail(RedisError("Redis refused the connection's setup"))
                # The first refusal is raised; the replies behind it (a wrong password's NOAUTH to
                # each SCRIPT LOAD) are heard here, or asyncio logs each as an error never retrieved.
                for reply in replies:
                    if reply.done() and not reply.cancelled():
                        reply.exception()
                if isinstance(exc, ConnectionLost):
                    raise self._closed_in_setup(refused, replies[0] is future) from None
                raise
        if self._closed:
            connection.fail(RedisError("client closed"))
            raise RedisError("client closed")
        self._connection = connection
        self._served = True
        return connection

    def _closed_in_setup(self, refused: ReplyError | None, unanswered: bool) -> RedisError:
        """Why Redis closed a connection as it opened, as far as can be told."""
        if refused is not None:
            # A refusal of the whole connection (too many clients) came as the answer to a
            # SCRIPT LOAD, and is no proxy's refusal of SCRIPT, since the connection closed.
            return RedisError(f"Redis closed the connection, answering: {refused}")
        if unanswered and self._ssl is not None:
            return RedisError(f"Redis closed the connection before answering anything{_CLOSED_IN_TLS}")
        if unanswered and self._served:
            # As a proxy in front of a Redis that is down does (Envoy, HAProxy), or Redis stopping.
            return RedisError("Redis closed the connection before answering anything")
        if unanswered and self._ssl is None and self._unix is None:
            return RedisError(
                "Redis closed the connection before answering anything (a Redis that serves TLS "
                "closes a plain connection: its URL is then rediss://)"
            )
        return RedisError("connection to Redis lost")


# Told with a failed TLS handshake: what a Redis without TLS makes of one.
_NO_TLS = (
    " (rediss:// asks for TLS: a Redis that does not serve it at this address never completes the "
    "handshake; its URL is then redis://)"
)


# Told with a TLS connection that Redis closed as it opened: its refusal (`max number of clients
# reached`) cannot be read over TLS.
_CLOSED_IN_TLS = " (a Redis serving TLS does so to a client past its maxclients: see its log)"


def _forgotten(error: BaseException) -> bool:
    """Redis's answer to a script it does not know (it restarted, or its scripts were flushed)."""
    return isinstance(error, ReplyError) and str(error).startswith("NOSCRIPT")


def _copy_outcome(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.wire = _bulk_strings(("EVALSHA", self.sha))  # how every run of it starts


class Keys:
    """The keys a script runs on, encoded once: the limiter sends the same ones for every
    call of a team, and encoding them was most of what a command cost to write."""

    __slots__ = ("names", "wire")

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.wire = _bulk_strings((len(names), *names))
