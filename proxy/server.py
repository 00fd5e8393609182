"""The HTTP server `tollgate serve` (and the demo) runs: uvicorn, with its httptools protocol
writing through a `CoalescingTransport` (coalesce.py)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import re
import signal
import socket
import struct
import sys
import termios
import time
import types
from http import HTTPStatus
from typing import Any, Callable, Iterator

import httptools
import uvicorn
from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.main import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess, multiprocess

from .coalesce import CoalescingTransport
from .errors import ApiError, error_body, error_response, shutting_down
from .json_codec import dumps
from .metrics import METHODS
from .observe import REFUSALS, REFUSED, RefusalObserver
from .streaming import ABORT, UNSENT

log = logging.getLogger("tollgate")
_uvicorn_log = logging.getLogger("uvicorn.error")

# A request's head must fit in this many bytes, and the whole request arrive within
# `server.read_timeout`: uvicorn bounds neither, so a client trickling its head or body, or
# sending nothing, held a connection (and a file descriptor) for good, and one endless header
# grew the process's memory.
MAX_HEAD_BYTES = 64 * 1024
# Seconds a refused connection is kept open for the client to read the refusal.
LINGER = 2.0
# A connection whose client takes none of what is sent to it is dropped by the kernel after twice
# `server.read_timeout` and this many seconds (TCP_USER_TIMEOUT, which counts a zero window from
# Linux 5.11 on): an answer it never reads. A stream is cut before that, its connection dropped
# at once (streaming.py's ABORT), and its record says why.
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)  # None but on Linux
UNREAD_MARGIN = 5.0
# Linux's ioctl for the bytes in a TCP socket's send queue, not sent or not yet acknowledged
# (SIOCOUTQ, TIOCOUTQ's number): what of an answer the kernel holds that its client has not taken.
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
# RFC 9110's names of statuses Python names otherwise before 3.13 ("Request-URI Too Long",
# "Request Entity Too Large"): a refusal's reason phrase and its code (`uri_too_long`,
# `content_too_large`) are the same under any Python.
_PHRASES = {413: "Content Too Large", 414: "URI Too Long"}
_TOO_LARGE = f"The request's head is larger than {MAX_HEAD_BYTES // 1024} KiB"
# A head whose request line alone does not fit: its target is what is too long (RFC 9112, 3: 414).
_TARGET_TOO_LONG = (
    f"The request target is too long: a request's head, its request line included, must fit in "
    f"{MAX_HEAD_BYTES // 1024} KiB"
)
_TRAILERS_TOO_LARGE = f"The request's trailer fields are larger than {MAX_HEAD_BYTES // 1024} KiB"
# What a request line is made of before its target: a method, and the spaces after it.
_METHOD_CHARACTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ- "
# The empty lines a request line may come after (RFC 9112, 2.2), which end no request line.
_EMPTY_LINES = re.compile(rb"[\r\n]*")
# An absolute-form target's authority, after its `scheme://`.
_AUTHORITY = re.compile(rb"[^/?#]*")
# Host must come once in an HTTP/1.1 request, and at most once in any (RFC 9112, 3.2); neither it
# nor Authorization is a list, whose repeats could be read as one (RFC 9110, 5.3).
_NO_HOST = "An HTTP/1.1 request must carry a Host header"
_TWO_HOSTS = "The request has more than one Host header; send exactly one"
_TWO_AUTHORIZATIONS = "The request has more than one Authorization header; send exactly one"
_TWO_LENGTHS = "The request has more than one Content-Length header; send exactly one"
_LENGTH_AND_CHUNKS = "The request has both Content-Length and Transfer-Encoding headers; send one of them"
_NOT_A_PATH = "The request target is not a path; send one such as /api/jobs/create"
# llhttp reads `HTTP/2.0` in a request line (the only version past 1.1 it takes), but HTTP/2 is
# never spoken in HTTP/1's syntax: nothing such a request says can be taken as HTTP/1.1's.
_HTTP_2_LINE = "HTTP/2 is not served here, and never in a request line; send HTTP/1.1"
# What the HTTP parser's reasons for refusing a request are said as, where its own words would
# not do; any other is given as it is (llhttp's fixed English, never the client's bytes).
_PARSER_REASONS = {
    # llhttp refuses a second Content-Length even when it repeats the first: RFC 9110, 8.6 lets
    # a recipient refuse or merge identical ones, and refusing every repeat leaves no length
    # for an intermediary in front to have read differently.
    "Duplicate Content-Length": _TWO_LENGTHS,
    "Invalid character in Content-Length": "Content-Length must be a single number",
    "Transfer-Encoding can't be present with Content-Length": _LENGTH_AND_CHUNKS,
    "Content-Length can't be present with Transfer-Encoding": _LENGTH_AND_CHUNKS,  # the other order
    "Invalid method encountered": "The request's method is not an HTTP method",
    # HTTP/2's connection preface (`PRI * HTTP/2.0`), sent without asking: curl --http2-prior-knowledge.
    "Pause on PRI/Upgrade": "HTTP/2 is not served here; send HTTP/1.1",
    # One of the protocol's callbacks failed (a refusal stops the parser with its own answer).
    "User callback error": "Invalid HTTP request",
}
# A body's bytes as sent (chunk sizes, their extensions and trailer fields included) may be at most
# this many times `server.max_body_bytes`, and MAX_HEAD_BYTES more: room for the framing of any
# chunks but the tiniest. A chunk's extensions are no part of the body, so its limit never counted
# them, and the rest of a body answered before it was read whole (a wrong key: a 401 from its head)
# is read only to be dropped: either was read without end, a core busy, until the read timeout.
BODY_WIRE_FACTOR = 2
# What a request queued behind another's answer gets when the shutdown begins before its turn.
QUEUED_AT_SHUTDOWN = shutting_down("the request was queued behind another on its connection, and not started")
# What the client sends after a request queued behind another's answer is held, unparsed, up to this
# many bytes before the connection is no longer read (see `CoalescingHttpProtocol._hold`).
MAX_HELD_BYTES = 64 * 1024


class _Refused(Exception):
    """Raised by a parser callback that refused the request: it stops the parser, so nothing
    after the refused head is read."""


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what `tollgate serve` ran before), writing through a
    `CoalescingTransport`: a plain answer's head and body leave in one write, and a stream's
    head with its first events. Requests are read within bounds of time and size; every
    refusal at this level is JSON, and a pipelined request's comes after the answers to the
    requests sent before it."""

    def __init__(
        self, *args: Any, read_timeout: float = 30.0, max_body_bytes: int = 10 * 1024 * 1024, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout
        self._max_body_bytes = max_body_bytes
        self._max_body_wire = BODY_WIRE_FACTOR * max_body_bytes + MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self._drop_when_unread(transport)
        # What a stream's relay is handed (streaming.py's ABORT, UNSENT), made once per connection.
        self._drop = functools.partial(_drop, self.transport)
        self._untaken = functools.partial(_untaken, self.transport)
        self._reading = True  # a request is due: a connection opened to send nothing is closed too
        # The head's bytes so far; -1 for one begun in the read that ended the request before it,
        # until that read is parsed (on_message_begin).
        self._head_bytes = 0
        self._head_done = False
        self._head_tail = b""  # the last bytes of the head's reads so far (`_head_ends_within`)
        # Whether the request line of the head being read ended in one of its reads so far: set by
        # each read that leaves a head unfinished (never by one that reads a head whole), and read
        # only at a refusal, for 414 rather than 431.
        self._line_ended = False
        self._message_begun = False  # a request has begun and is not yet read whole
        # The Host and Authorization fields of the head being read (on_header).
        self._hosts = self._authorizations = 0
        self._message_started = time.perf_counter()
        # A chunked body's trailer section, after its last chunk: its fields are not the request's
        # headers (uvicorn added them to the scope's, where the app took them for the head's), and
        # its bytes are bounded as a head's are (uvicorn kept every field, without bound).
        self._after_chunk_header = False  # a chunk's size line read, and nothing after it yet
        self._trailer_bytes = 0  # of the trailer section so far, in reads before this one
        self._trailer_read_bytes = 0  # of the trailer fields read whole in this read
        self._trailer_fields_bytes = 0  # of the trailer fields read whole so far, in all reads
        self._read_in_trailers = False  # this read began in a trailer section, not yet ended
        self._body_wire_bytes = 0  # of the body being read, as sent, in reads after its head's
        self._read_timer: asyncio.TimerHandle | None = None
        self._discarding = False  # refused: what the client still sends is dropped
        self._linger_timer: asyncio.TimerHandle | None = None
        # The requests pipelined requests were queued behind: uvicorn keeps track of the latest
        # request alone, and one of these may be the one running.
        self._ahead: list[RequestResponseCycle] = []
        self._held = bytearray()  # read while a request was queued, parsed once none is (`_hold`)
        # The bytes still due of the body of a request that asked for a protocol switch: the
        # parser reads none of it (see on_headers_complete), so it is read here, past the parser.
        self._upgrade_body_left = 0
        self._half_closed = False  # the client ended its sending after a whole request (eof_received)
        self._arm_read_timer()

    def _drop_when_unread(self, transport: asyncio.Transport) -> None:
        """Have the kernel drop the connection once its client has taken none of what was sent for
        twice the read timeout and UNREAD_MARGIN. uvicorn bounds no write: an answer to a client
        that reads nothing (a large one) stayed in the process, closing until its client read
        it, that is for good, and so did the connection."""
        sock = transport.get_extra_info("socket")
        if _TCP_USER_TIMEOUT is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            milliseconds = int((2 * self._read_timeout + UNREAD_MARGIN) * 1000)
            with contextlib.suppress(OSError):  # a connection already reset: nothing is left to hold
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, milliseconds)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self.pipeline:  # a request waits for its turn
            self._hold(data)
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
                line_ended = (first is None and self._line_ended) or _line_ends(
                    data, 0, MAX_HEAD_BYTES - self._head_bytes, first is not None
                )
                self._refuse_head(line_ended, first)
                return
            self._head_bytes += len(data)
            # (No copy of a whole read on every request's first: only its last three bytes.)
            self._head_tail = data[-3:] if len(data) >= 3 else (self._head_tail + data)[-3:]
        if self._reading and self._head_done:  # the body (a request's whole but its first read's)
            self._body_wire_bytes += len(data)
            if self._body_wire_bytes > self._max_body_wire:
                self._refuse(413, (
                    f"Request body is larger than {self._max_body_bytes} bytes: more than {self._max_body_wire} "
                    "bytes were sent for it, its chunk framing included"
                ))
                return
        # A read begun after a chunk's size line, which brings no chunk data, is all trailer.
        self._read_in_trailers = self._reading and self._head_done and self._after_chunk_header
        self._trailer_read_bytes = 0
        # uvicorn's own data_received, but for a refusal made in a parser callback; and without its
        # cancel of the keep-alive timeout on every read, which on_message_begin does once a request
        # begins: a read of empty lines alone (RFC 9112, 2.2) cancelled it, and the connection,
        # between requests and so without a read timeout, stayed open for good.
        if self._upgrade_body_left:
            data = self._read_upgrade_body(data)
            if not data:
                return
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as error:
                if self._discarding:  # a callback refused the request, and stopped the parser
                    return
                msg = _parser_refusal(error)
                # The client's fault, said in its 400 and its access log line: at debug, or any
                # client sending such requests fills the log with a line each.
                self.logger.debug(msg)
                # A target the parser refused was never given to on_url: the refusal's shape (OpenAI's
                # under /v1) is read from this read's bytes, if the request began with them.
                first = data if self._message_begun and not self.url and self._head_bytes == len(data) else None
                self._refuse(400, msg, first)
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    # Served as a plain request (a server may ignore Upgrade, RFC 9110, 7.8), without
                    # uvicorn's two warnings (one to install a WebSocket library Tollgate does not
                    # use): the parser stopped where the switch would have begun, and what the
                    # client sent after it, its body and then its next request, is read on.
                    data = data[upgrade.args[0]:]
                    if self._upgrade_body_left and not self._discarding:
                        data = self._read_upgrade_body(data)
                    if data and not self._discarding:
                        self._read_in_trailers = False
                        continue
            break
        if self._reading and self._head_done:
            whole = self._read_in_trailers and self._after_chunk_header
            self._trailer_bytes += len(data) if whole else self._trailer_read_bytes
            if self._trailer_bytes > MAX_HEAD_BYTES:
                self._refuse(431, _TRAILERS_TOO_LARGE)
                return
        # A request read whole in one go, as nearly all are, needs no timer.
        if self._reading:
            if not self._head_done:  # the head goes on in the next read
                if self._head_bytes < 0:
                    self._head_bytes = self._pipelined_head_bytes(data)
                    self._head_tail = data[-3:]
                    # Where the count is too large (see _pipelined_head_bytes), a line end found in
                    # it may be the body's before it: a target too long is then refused as a head too
                    # large, 431 rather than 414, as it was before any 414.
                    self._line_ended = _line_ends(data, len(data) - self._head_bytes, MAX_HEAD_BYTES, True)
                    if self._head_bytes > MAX_HEAD_BYTES:
                        self._refuse_head(self._line_ended)
                        return
                else:
                    earlier = self._head_bytes > len(data)  # this head's reads before this one
                    self._line_ended = (earlier and self._line_ended) or _line_ends(data, 0, len(data), not earlier)
            if self._read_timer is None:
                self._arm_read_timer()
        elif self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _head_ends_within(self, data: bytes) -> bool:
        left = MAX_HEAD_BYTES - self._head_bytes
        if data.find(b"\r\n\r\n", 0, left + 4) >= 0:
            return True
        # The blank line may have begun at the end of the previous read: only if that read's last
        # bytes and this one's first make it up. A read beginning with the LF of a field's CRLF
        # was taken for one, and read whole, however much of the head it still held.
        return self._head_bytes > 0 and (self._head_tail + data[:3]).find(b"\r\n\r\n") >= 0

    def _pipelined_head_bytes(self, data: bytes) -> int:
        """The bytes of `data` that are the head, unfinished, of a request begun in it after
        the request before ended there. The parser does not say where that was: it is where
        the request line is first found after the last blank line in `data` (an unfinished
        head has none). A body before it that quotes that very line makes the count too large,
        never too small."""
        if not self.url:  # the read ended in the method, or the spaces after it
            return len(data) - len(data.rstrip(_METHOD_CHARACTERS))
        blank = data.rfind(b"\r\n\r\n")
        start = 0 if blank < 0 else blank + 4
        line = re.compile(re.escape(self.parser.get_method()) + rb" +" + re.escape(self.url))
        found = line.search(data, start)
        return len(data) - (start if found is None else found.start())

    def _kept_request_line_bytes(self) -> int:
        """The size of the request line of a head read whole, as the parser kept it."""
        return len(self.parser.get_method()) + len(" ") + len(self.url) + len(" HTTP/1.1\r\n")

    def _kept_head_bytes(self) -> int:
        """The size of a head read whole, as the parser kept it: its request line and header
        lines, less the spaces it skipped."""
        header_lines = sum(len(name) + len(":") + len(value) + len("\r\n") for name, value in self.headers)
        return self._kept_request_line_bytes() + header_lines + len("\r\n")

    def _refuse_head(self, line_ended: bool, unparsed: bytes | None = None) -> None:
        """Refuse a head over MAX_HEAD_BYTES: a 431 if its request line ended within the bound
        (its header fields took it past), else a 414, its target being what is too long."""
        if line_ended:
            self._refuse(431, _TOO_LARGE, unparsed)
        else:
            self._refuse(414, _TARGET_TOO_LONG, unparsed)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:  # a trailer field: counted, and dropped
            # As few bytes as it can be sent in (the space after the colon is optional, RFC 9110,
            # 5.6.3): with ": ", 60 kB of `a:b` fields were counted as 72 kB, and refused.
            size = len(name) + len(value) + len(":\r\n")
            self._trailer_read_bytes += size
            # Here too, not only once the read is over: a request that ends within this read
            # is done by then, its trailer never counted. Fields alone: a field begun in an
            # earlier read is in `_trailer_bytes` in part already.
            self._trailer_fields_bytes += size
            if self._trailer_fields_bytes > MAX_HEAD_BYTES:
                self._refuse(431, _TRAILERS_TOO_LARGE)
                raise _Refused
            return
        # uvicorn's own on_header (0.55's), inlined: a call per header, on every request. Host
        # and Authorization are counted on the way, for `_repeated_field`, rather than looked
        # for again in another walk of the head.
        name = name.lower()
        value = value.rstrip(b" \t")  # trailing whitespace is no part of a value (RFC 9110, 5.5)
        if name == b"host":
            self._hosts += 1
        elif name == b"authorization":
            self._authorizations += 1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_chunk_header(self) -> None:
        self._after_chunk_header = True

    def on_chunk_complete(self) -> None:
        self._after_chunk_header = False

    def on_body(self, body: bytes) -> None:
        # Chunk data: neither the size line before it nor this read was trailer, even should the
        # read end after the next chunk's size line.
        self._after_chunk_header = self._read_in_trailers = False
        HttpToolsProtocol.on_body(self, body)

    def on_message_begin(self) -> None:
        # Not idle: a keep-alive timeout armed as the request before it ended in this very read
        # (see on_message_complete) would close the connection under this one.
        self._unset_keepalive_if_required()
        super().on_message_begin()
        # Not the head's count: this read's bytes, counted before the parser took them, are its,
        # unless the request before ended in this read and zeroed the count (a pipelined request):
        # then which of them are this one's is known once the read is parsed.
        if self._head_bytes == 0:
            self._head_bytes = -1
        self._reading, self._head_done = True, False
        self._body_wire_bytes = 0
        self._message_begun = True
        self._message_started = time.perf_counter()
        self._hosts = self._authorizations = 0

    def on_headers_complete(self) -> None:
        if self._head_bytes < 0 and self._kept_head_bytes() > MAX_HEAD_BYTES:
            # A pipelined head begun and ended in one read: the bound is checked here, before
            # the request is queued.
            self._refuse_head(self._kept_request_line_bytes() <= MAX_HEAD_BYTES)
            raise _Refused
        if self.parser.get_http_version() == "2.0":
            self._refuse(505, _HTTP_2_LINE)
            raise _Refused
        if self._hosts != 1 or self._authorizations > 1:
            problem = self._repeated_field()
            if problem is not None:
                self._refuse(400, problem)
                raise _Refused
        if self.parser.should_upgrade() and not self._should_upgrade():
            # The parser reads no body after a head asking to switch protocols (httptools tells
            # it there is none), and would read it as the client's next request: the body is read
            # past the parser instead (`_read_upgrade_body`). curl --http2 asks for h2c so on
            # http://, with its -d body. A chunked one is refused: its end is the parser's to find.
            length = self._body_length()
            if length is None:
                self._refuse(400, "A chunked request body may not come with a protocol upgrade (Upgrade)")
                raise _Refused
            self._upgrade_body_left = length
        self._head_done = True
        previous = self.cycle
        try:
            super().on_headers_complete()
        except Exception:
            # A target uvicorn cannot read (`http://host`, with no path, or CONNECT's `host:port`):
            # refused as this request's own, not as the one before it, already answered.
            self._head_done = False
            if self.cycle is not previous:  # failed past the target, which it had read
                raise
            self._refuse(400, _NOT_A_PATH)
            raise _Refused from None
        if self.cycle is not previous:
            self.cycle.scope[ABORT] = self._drop  # type: ignore[literal-required]
            self.cycle.scope[UNSENT] = self._untaken  # type: ignore[literal-required]
            _hang_up_on_half_close(self.cycle, self)
            if self.cycle.waiting_for_100_continue:
                _close_if_answered_unasked(self.cycle)
            if self.cycle.scope["http_version"] == "1.0":
                _close_delimited(self.cycle)
            if self._waiting():
                self._queued_behind(previous)
                # uvicorn stops reading here; what comes next is held instead (`_hold`).
                self.flow.resume_reading()

    def _body_length(self) -> int | None:
        """The body's length as the head gives it (the parser checked it): 0 for none, None for
        a chunked one."""
        length = 0
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return None
            if name == b"content-length":
                length = int(value)
        return length

    def _repeated_field(self) -> str | None:
        """What is wrong with a head that has other than one Host or more than one Authorization
        field, if anything: an HTTP/1.0 request may come without Host."""
        if self._authorizations > 1:
            # Two credentials are ambiguous (an intermediary may have added one): neither is
            # taken, rather than whichever came first.
            return _TWO_AUTHORIZATIONS
        if self._hosts > 1:
            return _TWO_HOSTS
        if self.parser.get_http_version() in ("1.0", "0.9"):
            return None
        return _NO_HOST

    def _read_upgrade_body(self, data: bytes) -> bytes:
        """Take the body due of a request that asked for a protocol switch from `data`, as the
        parser would have (`on_body`, then `on_message_complete` at its end); return the rest,
        the client's next request."""
        body = data[: self._upgrade_body_left]
        self._upgrade_body_left -= len(body)
        if body:
            self.on_body(body)
        if not self._upgrade_body_left:
            self.on_message_complete()
        return data[len(body):]

    def on_message_complete(self) -> None:
        if self._upgrade_body_left:
            return  # the parser's end of a request whose body it did not read: read past it
        self._reading, self._head_bytes, self._head_tail, self._message_begun = False, 0, b"", False
        self._after_chunk_header, self._trailer_bytes, self._trailer_read_bytes = False, 0, 0
        self._trailer_fields_bytes = 0
        self._read_in_trailers = False  # what follows in this read is the next request's
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            # Answered before its body was read whole (a wrong key, a body too large): the answer's
            # end armed uvicorn's keep-alive timeout, which does nothing while a request is read
            # (timeout_keep_alive_handler) and may have passed meanwhile. The connection is idle
            # from now on, and would stay open for good.
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _queued_behind(self, previous: RequestResponseCycle) -> None:
        """The request whose head was just read waits for `previous`'s answer: uvicorn queues
        it, and what the client sends meanwhile is held unparsed (`_hold`). Its read time starts
        again with its turn, for until then its body cannot be read; and `previous` must still
        hear of a hang-up, though uvicorn now tells only the latest request of it."""
        self._ahead = [cycle for cycle in self._ahead if not cycle.response_complete]
        self._ahead.append(previous)
        waiting = self.cycle

        def its_turn() -> None:
            if self.cycle is waiting and self._reading and not self._discarding and not self.transport.is_closing():
                if self._read_timer is not None:
                    self._read_timer.cancel()
                self._arm_read_timer()

        _after_answer(previous, its_turn)

    def _hold(self, data: bytes) -> None:
        """Keep what the client sent while a request waits for its turn, to be parsed at that turn
        (`on_response_complete`). uvicorn stopped reading the connection instead, and so never saw
        the client hang up meanwhile: the request running was left to run on (a call to its end,
        and charged) for nobody. Past MAX_HELD_BYTES, reading stops all the same."""
        self._held += data
        if len(self._held) > MAX_HELD_BYTES:
            self.flow.pause_reading()

    def on_response_complete(self) -> None:
        HttpToolsProtocol.on_response_complete(self)  # starts the request queued next, if any
        if self._held and not self.pipeline and not self.transport.is_closing():
            held = bytes(self._held)
            self._held.clear()
            self.data_received(held)  # read whole: nothing is queued as it begins, so none is held again
            if self._half_closed:  # after these bytes, held as it came: they hold the last request
                self._end_after_held()

    def _end_after_held(self) -> None:
        """The client half-closed with bytes held (`eof_received`), all read now: the answer of
        the last whole request ends the connection. A request they leave unfinished can never
        be whole: it is dropped unanswered, as on a hang-up, and if it is the one running (its
        body cut short) the connection ends now."""
        if self._discarding or self.transport.is_closing() or self.cycle is None:
            return  # a refusal of what they held closes it
        if not self._message_begun or not self._head_done:
            self.cycle.keep_alive = False  # the last whole request's (an unfinished head has no cycle yet)
        elif self._waiting():
            self.pipeline.popleft()  # never run
            self._ahead[-1].keep_alive = False
        else:
            self.transport.close()
            return
        if self._message_begun:
            self._discarding = True  # its read timeout, should it come first, must not answer it

    def _waiting(self) -> bool:
        """Whether the request being read, its head read, is queued behind another."""
        return bool(self.pipeline) and self.pipeline[0][0] is self.cycle

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio's, which uvicorn narrowed to None
        """The client ended its sending half of the connection. After a whole request whose answer
        has not begun, that may be a client that still reads (shutdown(SHUT_WR), as `nc -N` does
        once its input ends): the connection stays open for the answer, then closes. uvicorn
        closed it at once, and the answer (a job made and holding a credit, say) was lost. It
        cannot be told from a hang-up, though, which must free a call's upstream at once: the
        app hears of a disconnect as it would of a hang-up (`_hang_up_on_half_close`), and a call
        that listens for one ends as cancelled, its 499 answered. So are requests pipelined
        whole behind one running (`printf ... | nc -N`): each is answered in its turn, and the
        last answer closes; and those sent while others waited their turn, held unread until
        theirs (`_hold`), which are read then: the last of them closes, and one of them left
        unfinished is a hang-up once read (`_end_after_held`). Otherwise (between requests, one
        half read, an answer begun) it is a hang-up, as before."""
        if self._half_closed:
            # Told again: each answer's end resumes reading, and the transport reads the end again.
            return True
        cycle = self.cycle
        if (
            cycle is None or cycle.response_started or (self._message_begun and not self._held)
            or self._discarding or self.transport.is_closing()
            # The request running ahead of those queued is streaming its answer.
            or any(ahead.response_started and not ahead.response_complete for ahead in self._ahead)
        ):
            # Closed here, not by uvloop on its own: that closed the socket past what this turn
            # of the loop wrote (coalesce.py), and an answer just sent went with it.
            self.transport.close()
            return None
        self._half_closed = True
        if not self._held:  # else the last request is known once they are read (`_end_after_held`)
            # The latest request's answer ends the connection; those queued before it keep theirs
            # open, for the next to be started after each.
            cycle.keep_alive = False
        for ahead in self._ahead:  # the request running, if others are queued behind it
            ahead.message_event.set()
        cycle.message_event.set()  # wakes a receive() waiting for a disconnect
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        for cycle in self._ahead:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # uvicorn marks only its latest request to close the connection after its answer: with
        # requests pipelined behind the one running, the last of those queued, and the running
        # one's answer started the next. That ran after the grace period had cancelled every
        # request running, while the gateway stopped: a call outliving the drain was left
        # running, its own job holding its credit, after exit 0. A queued request is answered
        # in its turn as the shutdown answers any other not answered yet, and not run.
        for index, (cycle, _) in enumerate(self.pipeline):
            self.pipeline[index] = (cycle, self._refused_by_shutdown)
        super().shutdown()

    async def _refused_by_shutdown(self, scope: Any, receive: Any, send: Any) -> None:
        """What a request queued when the shutdown began runs instead of the app: its 503."""
        await error_response(Request(scope), QUEUED_AT_SHUTDOWN)(scope, receive, send)
        method = scope["method"]
        self._observe_refusal(503, method if method in METHODS else "unknown", None)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def timeout_keep_alive_handler(self) -> None:
        # uvicorn starts it as an answer ends, though the next, pipelined, request may be half
        # read by then: that one has the read timeout instead.
        if not self._message_begun:
            super().timeout_keep_alive_handler()

    def _arm_read_timer(self) -> None:
        self._read_timer = self.loop.call_later(self._read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self._reading or self._discarding or self.transport.is_closing():
            return
        if self._head_done and self._waiting():
            return  # it cannot be read before its turn, which starts its time again
        if not self._message_begun and self.cycle is None:
            self.transport.close()  # opened and never used: nothing to answer
            return
        self._refuse(408, f"The request did not arrive whole within {self._read_timeout:g} s")

    def _refuse(self, status: int, message: str, unparsed: bytes | None = None) -> None:
        # The refused request's own cycle, if its head was read: uvicorn's `cycle` is otherwise
        # the request's before it, on a kept-alive or pipelining connection.
        own = self.cycle if self._reading and self._head_done else None
        if own is not None and own.response_started:
            # Answered, or being answered, before its body was read whole (a wrong key, say): a
            # second answer would be read as the answer to the client's next request.
            self._discarding = True
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
            if own.response_complete:
                self._close_once_read()
            else:
                self.transport.close()  # an answer is under way: it cannot be replaced
            return
        # The target as far as it was read, for the error's shape: OpenAI's under /v1.
        method, target = self._request_line(unparsed)
        path = _path_of(target).decode("latin-1")
        phrase = _PHRASES.get(status) or HTTPStatus(status).phrase
        code = phrase.lower().replace(" ", "_")
        body = dumps(error_body(path, ApiError(status, message, code=code)))
        head = (
            f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
        )
        # uvicorn's own (Date, which RFC 9110, 6.6.1 wants on every answer from a server with a clock).
        defaults = b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        answer = head.encode() + defaults + b"\r\n" + body
        self._discarding = True
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        # Requests sent before it still being answered: the refusal comes after their answers.
        if own is not None and self._waiting():
            self.pipeline.popleft()  # never run
            before: RequestResponseCycle | None = self._ahead[-1]
        elif own is None and self.cycle is not None and not self.cycle.response_complete:
            before = self.cycle
        else:
            before = None
        if before is not None:
            _after_answer(before, lambda: self._answer_refusal(answer))
            self._observe_refusal(status, method, None)
            return
        self.transport.write(answer)
        if own is not None and not own.response_complete:
            # The app's receive() hears of it at once. The client may still be sending (trailer
            # fields without end): closed now, its unread bytes would reset the refusal away.
            own.disconnected = True
            own.message_event.set()
        self._close_once_read()
        self._observe_refusal(status, method, own)

    def _answer_refusal(self, answer: bytes) -> None:
        """Send a refusal held until the answers before it were sent, and close."""
        if self.transport.is_closing():  # the last of them closed the connection
            return
        self._unset_keepalive_if_required()
        self.transport.write(answer)
        self._close_once_read()

    def _close_once_read(self) -> None:
        """Close once the client has read the refusal, whatever else it still sends: a socket
        closed with the client's bytes unread in it sends a reset, which may reach the client
        before the refusal does and destroy it unread (a head over 64 KiB always leaves bytes
        unread). The rest is read and dropped (`_refuse` set it to be), for at most LINGER
        seconds."""
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
            # Before the target begins the method may be cut short or no method at all, and the
            # parser's is then its default (DELETE), not what the client sent.
            try:
                method = self.parser.get_method() if target else b""
            except Exception:  # httptools has not read the method yet
                method = b""
        else:
            return "unknown", b""
        name = method.decode("latin-1")
        return (name if name in METHODS else "unknown"), target

    def _observe_refusal(self, status: int, method: str, own: RequestResponseCycle | None) -> None:
        """Count and log the refused request like any other: through the app's own observation
        when the app runs it (`own`, its head read), else here."""
        if own is not None and not own.response_complete:
            own.scope[REFUSED] = status  # type: ignore[literal-required]
            return
        observe: RefusalObserver | None = self.app_state.get(REFUSALS)
        if observe is not None:
            observe(method, status, time.perf_counter() - self._message_started)


def _line_ends(data: bytes, start: int, within: int, begins_head: bool) -> bool:
    """Whether a request line ends (its LF) in the `within` bytes of `data` from `start`, a
    head's; if they begin the head, after the empty lines a request line may follow."""
    end = start + max(within, 0)
    if begins_head:
        start = _EMPTY_LINES.match(data, start).end()  # type: ignore[union-attr]
    return data.find(b"\n", start, end) >= 0


def _parser_refusal(error: httptools.HttpParserError) -> str:
    """The message of the 400 for a request the HTTP parser refused, saying why."""
    reason = str(error.args[0]) if error.args else ""
    said = _PARSER_REASONS.get(reason)
    if said is not None:
        return said
    return f"Invalid HTTP request: {reason}" if reason else "Invalid HTTP request"


def _path_of(target: bytes) -> bytes:
    """A request target's path, as uvicorn reads it: an absolute-form target's
    (`http://host/v1/...`, which some proxies send) after its scheme and authority."""
    scheme, colon_slashes, rest = target.partition(b"://")
    if colon_slashes and b"/" not in scheme:
        target = rest[_AUTHORITY.match(rest).end():]  # type: ignore[union-attr]
    return target.partition(b"?")[0] or b"/"


def _close_if_answered_unasked(cycle: RequestResponseCycle) -> None:
    """A request sent with `Expect: 100-continue` and answered before it was asked for its body
    (a wrong key, a body too large): the client may send that body or not, and the connection
    cannot tell a body from its next request. The answer says the connection closes, and it does
    (RFC 9110, 10.1.1), rather than read the client's next request as the body."""
    send = cycle.send

    async def send_or_close(message: Any) -> None:
        if not cycle.response_started and cycle.waiting_for_100_continue and cycle.more_body:
            cycle.keep_alive = False
        await send(message)

    cycle.send = send_or_close  # type: ignore[method-assign]


def _drop(transport: asyncio.Transport) -> None:
    """Drop a connection at once, with a reset: closed alone, its socket went on sending what
    the kernel held of the answer (megabytes on loopback) to a client reading it slowly, a
    stream that then ended as if whole but for its last chunk, and held that memory meanwhile."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone: nothing is left to hold
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _untaken(transport: asyncio.Transport) -> int:
    """The bytes written to a connection that its client has not taken yet: those the transport
    holds, and on Linux those in the kernel's send queue, which goes down as the client reads
    however seldom the transport may write again (a socket is writable only once half of what
    its queue holds is gone, megabytes on loopback)."""
    untaken = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    # A connection closed meanwhile holds nothing more: its socket's descriptor is -1 (the ioctl's
    # ValueError), or gone under it (OSError).
    if _SIOCOUTQ is not None and sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            untaken += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    return untaken


def _hang_up_on_half_close(cycle: RequestResponseCycle, protocol: CoalescingHttpProtocol) -> None:
    """Once `protocol` kept the connection open past the client's half-close (`eof_received`),
    `cycle`'s receive() says http.disconnect as after a hang-up, but only after it handed the app
    the whole body: the request was whole, and is served. An answer the app then sends still goes
    out, unless it had begun by then: a stream's end written for a half-closed client would look
    like a whole one, so the connection is cut as a hang-up's was."""
    receive = cycle.receive
    body_taken = False

    async def receive_or_half_close() -> Any:
        nonlocal body_taken
        while not (body_taken and protocol._half_closed):
            message = await receive()
            if message["type"] != "http.request" or not body_taken:
                body_taken = message["type"] == "http.request" and not message["more_body"]
                return message
            # Past the body, only eof_received wakes uvicorn's receive() with a request message.
        if cycle.response_started and not cycle.disconnected:
            cycle.disconnected = True
            protocol.transport.close()
        return {"type": "http.disconnect"}

    cycle.receive = receive_or_half_close  # type: ignore[method-assign]


def _close_delimited(cycle: RequestResponseCycle) -> None:
    """An answer of no stated length (a stream) to an HTTP/1.0 request ends where its connection
    closes, as uvicorn closes every HTTP/1.0 one after its answer. uvicorn sent it chunked all
    the same, which an HTTP/1.0 client does not know (RFC 9112, 6.1: a server must not send it
    one): the chunk sizes were read as the stream's own bytes, between and inside its events."""
    send = cycle.send
    unstated = False

    async def send_close_delimited(message: Any) -> None:
        nonlocal unstated
        if message["type"] == "http.response.start":
            unstated = all(name.lower() != b"content-length" for name, _ in message.get("headers", ()))
            if unstated:
                cycle.chunked_encoding = False  # uvicorn then adds no Transfer-Encoding
        elif unstated and message["type"] == "http.response.body":
            # What uvicorn checks a body it does not chunk against: each write is its own length.
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    cycle.send = send_close_delimited  # type: ignore[method-assign]


def _after_answer(cycle: RequestResponseCycle, then: Callable[[], None]) -> None:
    """Run `then` once `cycle`'s answer is sent, after uvicorn's own bookkeeping of it (which
    starts the request queued behind it). Not if the connection is lost first."""
    done = cycle.on_response

    def on_response() -> None:
        done()
        then()

    cycle.on_response = on_response


def uvicorn_options(
    host: str,
    port: int,
    log_level: str,
    shutdown_grace: float,
    read_timeout: float,
    max_body_bytes: int,
    keep_alive_timeout: float = 5.0,
) -> dict[str, Any]:
    """How Tollgate runs uvicorn: its own access log and protocol, no `server` header."""
    return dict(
        host=host,
        port=port,
        log_level=log_level,
        # Not uvicorn's own handlers (its format has no time): its lines go through the root
        # logger's, Tollgate's, as every other line does.
        log_config=None,
        access_log=False,
        server_header=False,
        # No WebSocket routes: a handshake is a plain request (answered in JSON, counted and
        # logged), not a switch to uvicorn's WebSocket protocol, outside the bounds kept here.
        ws="none",
        # A partial rather than a class made here: uvicorn hands it to its worker processes.
        http=functools.partial(CoalescingHttpProtocol, read_timeout=read_timeout, max_body_bytes=max_body_bytes),
        timeout_graceful_shutdown=shutdown_grace,
        timeout_keep_alive=keep_alive_timeout,
    )


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, which also stops listening once told to stop.
    The listening socket is the supervisor's as well as each worker's: kept open, the kernel
    would go on taking new connections on it after every worker had stopped accepting them,
    and leave them unanswered until the workers had drained (up to `server.shutdown_grace`),
    then reset them, where one process refuses them at once."""

    _starting = 0  # workers being started now (see _starting_workers)
    _stopping = False  # told to stop (SIGINT, SIGTERM): no worker is started any more

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        # uvicorn queues every signal for its loop, which reads them every half second. A stop
        # sent to every process at once (systemd's SIGTERM to the whole unit, Ctrl-C's SIGINT to
        # the terminal's process group) stopped the workers' accepting at once and this socket
        # up to half a second later: the connections the kernel took meanwhile were reset after
        # their requests were sent. So a stop closes the sockets as it comes, unless a worker
        # is being started, whose start hands them on (then the loop closes them, as before).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._told_to_stop)

    def _told_to_stop(self, sig: int, frame: Any) -> None:
        # Nothing that takes a lock (an Event's set, logging): the loop may hold it.
        self.signal_queue.append(sig)  # uvicorn's loop says it, and stops
        self._stopping = True
        if not self._starting:
            self._stop_listening()

    @contextlib.contextmanager
    def _starting_workers(self) -> Iterator[None]:
        """Keep the sockets open in the block: a worker being started is handed them."""
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def init_processes(self) -> None:
        with self._starting_workers():
            if self._stopping:  # came as the supervisor was made: its sockets may be closed
                return
            super().init_processes()

    def restart_all(self) -> None:
        """uvicorn's rolling restart (SIGHUP), which also ends at a stop that came during it:
        uvicorn's looks at its loop's stop alone, which a signal no longer sets (`_told_to_stop`),
        and went on to start and wait for a replacement of every worker before stopping."""
        # What uvicorn's wait for a worker's start looks at to give up: the stop as well.
        told_to_end: Any = types.SimpleNamespace(is_set=self._told_to_end)
        for index, old_process in enumerate(self.processes):
            if self._told_to_end():
                return
            new_process = multiprocess.Process(self.config, self.sockets)
            new_process.start()
            if not new_process.wait_until_ready(self.config.timeout_worker_healthcheck, told_to_end):
                if self._told_to_end():
                    # It may serve already, not yet asked: stopped gracefully with the others, not killed.
                    self.processes.append(new_process)
                    return
                new_process.kill()
                new_process.join()
                _uvicorn_log.error(  # uvicorn's own line
                    "New child process [%s] was not ready in time; keeping worker [%s] and aborting the restart.",
                    new_process.pid, old_process.pid,
                )
                return
            old_process.terminate()
            old_process.join()
            self.processes[index] = new_process

    def _told_to_end(self) -> bool:
        return self._stopping or self.should_exit.is_set()

    def handle_signals(self) -> None:
        with self._starting_workers():  # uvicorn starts workers on SIGHUP and SIGTTIN
            if self._stopping:
                self.should_exit.set()  # before a SIGHUP or SIGTTIN queued ahead of the stop starts any
            super().handle_signals()

    def handle_ttin(self) -> None:
        if not self.should_exit.is_set():  # uvicorn's starts a worker even then
            super().handle_ttin()

    def keep_subprocess_alive(self) -> None:
        """uvicorn's replacement of a worker that ended, or stopped answering its health check,
        said as the fault it is: uvicorn's own line, at info, names neither how it ended nor that
        anything went wrong. Its loop rather than uvicorn's wrapped: how a worker ended is read
        once its health check failed, so that one killed while the check waited on it (the OOM
        killer strikes at any moment) is not said to have hung."""
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.process.is_alive() and process.ping(self.config.timeout_worker_healthcheck):
                continue
            ended = process.process.exitcode  # None: alive, and not answering
            process.kill()
            process.join()
            # uvicorn's own lines, as its loop says them.
            if process.exitcode == STARTUP_FAILURE:
                # The app, or its socket, is broken, and a replacement would fail alike.
                _uvicorn_log.error("Child process [%d] failed to start, stopping the parent process.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            _uvicorn_log.info("Child process [%d] died", process.pid)
            with self._starting_workers():
                if self._stopping:  # its sockets may be closed: the loop's next turn stops
                    return
                replacement = multiprocess.Process(self.config, self.sockets)
                replacement.start()
            self.processes[index] = replacement
            log.warning("worker %d %s; replaced by worker %d", process.pid, _how_it_ended(ended, self.config), replacement.pid)

    @property
    def failed_to_start(self) -> bool:
        """Whether it stopped because a worker failed before serving (uvicorn stops every worker
        then, as the replacement would fail alike, and returns as from a stop asked for)."""
        return any(process.exitcode == STARTUP_FAILURE for process in self.processes)


def _how_it_ended(exitcode: int | None, config: uvicorn.Config) -> str:
    """How a worker ended, and what that suggests to look into. `exitcode` as its supervisor
    saw it before replacing it: None for one alive then, killed for not answering."""
    if exitcode is None:
        return (f"did not answer its health check within {config.timeout_worker_healthcheck:g} s (its event loop "
                "blocked?) and was killed")
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        if -exitcode == signal.SIGKILL:
            return f"was killed by {name} (the kernel's OOM killer, if no one sent it: see dmesg)"
        return f"was killed by {name}"
    return f"exited with code {exitcode} (its traceback, if any, is above)"


def listen(host: str, port: int) -> list[socket.socket]:
    """The sockets `serve` listens on, bound as `uvicorn.run` binds them (asyncio's
    create_server: one per address the host resolves to, an IPv6 one for IPv6 alone), but
    before the gateway starts: uvicorn binds only once the app has started, and a `serve` on a
    port taken (a second one started by mistake) applied its file's declarations to the
    database first."""
    sockets: list[socket.socket] = []
    try:
        seen = set()
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.set_inheritable(True)  # as uvicorn leaves the sockets it binds (spawned workers get theirs pickled)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit (or the kernel's maximum
    below it), for it and the workers it starts. Each connection of a client, and each to
    LiteLLM, takes a descriptor (a stream two), and the soft limit systemd and Docker give is
    1,024, their hard limit far above: past it new clients were dropped unanswered (the event
    loop closes what it cannot accept, and says nothing) and calls failed as if LiteLLM were
    down."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20  # unbounded (macOS): Linux's default fs.nr_open
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    # A hard limit above the kernel's own maximum is refused as the soft one: macOS's, unbounded,
    # above its 10,240 (it stayed at 256); Linux's, above fs.nr_open, lowered since it was set.
    # The highest the kernel takes, then: found by halving the gap, some 20 tries, once at start.
    taken, refused = soft, wanted + 1
    while refused - taken > 1:
        trying = wanted if refused > wanted else (taken + refused) // 2
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (trying, hard))
            taken = trying
        except (ValueError, OSError):
            refused = trying


def _say_listening(host: str, sockets: list[socket.socket]) -> None:
    """uvicorn's line saying where it listens, which it leaves out for sockets it is given (it
    expects `Config.bind_socket` to have said it)."""
    where = f"[{host}]" if ":" in host else host
    _uvicorn_log.info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", where, sockets[0].getsockname()[1]
    )


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once started, as with `uvicorn.run`."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets and not self.should_exit:
            _say_listening(self.config.host, sockets)


def serve(app: Any, options: dict[str, Any], sockets: list[socket.socket]) -> None:
    """`uvicorn.run(app, **options)` on `sockets`."""
    server = _Server(uvicorn.Config(app, **options))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run exits


def serve_workers(app: str, workers: int, options: dict[str, Any], sockets: list[socket.socket]) -> None:
    """`uvicorn.run(app, factory=True, workers=workers, **options)` on `sockets`, with `_Supervisor`."""
    config = uvicorn.Config(app, factory=True, workers=workers, **options)
    _say_listening(config.host, sockets)  # before the workers start, as `Config.bind_socket` says it
    supervisor = _Supervisor(config, sockets=sockets)
    try:
        supervisor.run()
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
    if supervisor.failed_to_start:
        # As a single process that cannot start exits: a process manager restarts or reports it.
        sys.exit(STARTUP_FAILURE)
