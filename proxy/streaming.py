"""Relaying an upstream SSE stream to the client, byte for byte, as it arrives.

Events are forwarded the moment their last byte is in (only an unfinished
event's tail waits), unchanged; a usage-only chunk can be left out for clients
that did not ask for usage. A second task watches the client: when it hangs
up, the upstream response is closed at once, so LiteLLM stops generating.

The call is recorded exactly once, shielded from cancellation, and before the
client can see the stream end: the terminal event (`[DONE]`, or an error) is
held back until the record is written, so a client that completes its job the
moment its stream ends never finds the call still running. A record the store
refuses (kept by the call pipeline, written later) ends the stream with one
error event saying so instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Literal

from prometheus_client import Gauge
from starlette.types import Message, Receive, Scope, Send

from .accounting import StreamTally
from .forwarding import OpenStream
from .sse import MAX_EVENT_BYTES, EventTooLarge, SSEEvent
from .store import StoreUnavailable
from .upstream import DeadlineExceeded, TransportError, UpstreamTimeout

# How long past the call's deadline a stream's last bytes may wait for a client that reads nothing.
LAST_SEND_GRACE = 5.0
# The error a stream whose client stopped reading is recorded with (`SSERelay`'s stall_timeout).
CLIENT_STALLED = "the client took none of the stream for {:g} s: cut off"
# The scope's key of what drops the request's connection at once (server.py sets it).
ABORT = "tollgate.abort"
# The scope's key of what tells how many bytes of the answer the connection holds that its client
# has not taken yet (server.py sets it): a write's wait on the client is a stall only while that
# does not go down.
UNSENT = "tollgate.unsent"

EndReason = Literal["finished", "client_disconnected", "upstream_failed", "shutdown"]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class RelayEnd:
    reason: EndReason
    error: str | None
    first_event_at: float | None  # loop time the first event went out


def error_event(message: str, error_type: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": error_type, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class SSERelay:
    def __init__(
        self,
        stream: OpenStream,
        tally: StreamTally,
        headers: list[tuple[bytes, bytes]],  # the call's own, as ASGI carries them
        deadline: float,
        on_end: Callable[[RelayEnd], Awaitable[None]],
        drop_usage_only: bool = False,
        live: Gauge | None = None,
        stall_timeout: float = 30.0,
    ) -> None:
        self._stream = stream
        self._tally = tally
        self._raw_headers = SSE_HEADERS + headers
        self._deadline = deadline
        self._on_end = on_end
        self._drop_usage_only = drop_usage_only
        self._first_event_at: float | None = None
        self._recorded = False
        self._started = False  # the head sent
        self._live = live
        # A client that reads nothing held its call's upstream connection until the call's
        # deadline (10 minutes by default), the relay waiting to write to it: one team could take
        # every connection of the pool to LiteLLM, and every other team's calls, waiting for one,
        # failed. A write the client leaves untaken for `stall_timeout` (server.read_timeout)
        # ends the stream as a hang-up would. One timer a stream looks every `stall_timeout`;
        # the writes only count themselves.
        self._stall_timeout = stall_timeout
        self._stall_timer: asyncio.TimerHandle | None = None
        # What the connection holds that the client has not taken (the scope's UNSENT), if told:
        # a write waits until the client has taken nearly all before it, which may be megabytes
        # (the kernel's send buffer, a large event), so a slow reader's write outlasts the bound
        # while it reads all along. It is cut off only if that did not go down either.
        self._unsent: Callable[[], int] | None = None
        self._writes = 0  # the writes begun
        self._writing = False  # the last of them not yet taken
        self._stalled = False
        self._unfinished = False  # the last write not taken within LAST_SEND_GRACE: the response left unended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._live is not None:
            self._live.inc()
        try:
            self._unsent = scope.get(UNSENT)
            await self._run(receive, send, scope.get(ABORT))
        finally:
            if self._live is not None:
                self._live.dec()

    async def _run(self, receive: Receive, send: Send, abort: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        relay = loop.create_task(self._relay(send))
        watcher = loop.create_task(self._wait_for_disconnect(receive, relay))
        self._stall_timer = loop.call_later(self._stall_timeout, self._watch_stall, relay, -1, None)
        reason: EndReason = "client_disconnected"
        cut = False
        try:
            await asyncio.wait((relay, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Only a shutdown cancels a request (uvicorn's, once server.shutdown_grace is over):
            # the stream then ends with one error event, not a cut connection and a traceback.
            reason = "shutdown"
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if self._recorded:
                # Past the upstream's end, recording the call or sending its last event: cut now,
                # the client would hear "cut short" of a call recorded as it ended (a /v1 call's
                # own job charged), and might ask and pay again. It ends as recorded, or soon.
                await asyncio.wait((relay,), timeout=LAST_SEND_GRACE)
            else:
                cut = True
        finally:
            relay.cancel()  # a no-op when it is done; otherwise the client is gone, or the shutdown cuts it
            watcher.cancel()
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
                if (self._stalled or self._unfinished) and abort is not None:
                    # Cut off: what was written and not taken goes with the connection now,
                    # rather than wait in the process for a client that reads nothing (until
                    # the kernel gives up on it, server.py), and uvicorn hears of a hang-up,
                    # not of an answer its app left unfinished (an ERROR line each time).
                    abort()
                    # It does in the next turn of the loop: returning in this one (the record
                    # written already, a stream cut at its deadline) was still the unfinished answer.
                    try:
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:  # the shutdown's: the connection is dropped already
                        asyncio.current_task().uncancel()  # type: ignore[union-attr]
            except Exception as exc:
                await self._record("upstream_failed", f"relay failed: {type(exc).__name__}")
                raise
            finally:
                try:
                    await self._record(reason, CLIENT_STALLED.format(self._stall_timeout) if self._stalled else None)
                except asyncio.CancelledError:
                    # The shutdown's, while the record waits (say on another process's lock): it
                    # goes on, shielded, and the shutdown's drain waits for it; to uvicorn the
                    # cancel would be an "Exception in ASGI application".
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
        if cut:
            cut_event = error_event("The gateway is shutting down: the stream was cut short", "service_unavailable", "shutting_down")
            with contextlib.suppress(Exception):  # the relay may have ended it in the same turn
                async with asyncio.timeout(LAST_SEND_GRACE):
                    await self._send(send, [cut_event], more_body=False)

    def _watch_stall(self, relay: asyncio.Task[None], writing: int, unsent: int | None) -> None:
        """Cut the relay off when the write in progress is the one that was in progress at the
        last look, `stall_timeout` ago, and the client took nothing since; else look again in
        `stall_timeout`. `writing`: the number of the write then in progress, -1 for none;
        `unsent`: what the connection then held untaken, None if not known."""
        now_unsent = self._unsent() if self._unsent is not None else None
        taken = now_unsent is not None and unsent is not None and now_unsent < unsent
        if self._writing and self._writes == writing and not taken:
            self._stalled = True
            relay.cancel()
            return
        now_writing = self._writes if self._writing else -1
        self._stall_timer = asyncio.get_running_loop().call_later(
            self._stall_timeout, self._watch_stall, relay, now_writing, now_unsent
        )

    async def _wait_for_disconnect(self, receive: Receive, relay: asyncio.Task[None]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # Here, not once `_run` hears of it two turns later: uvicorn wakes a write waiting on the
        # client as it wakes this, and the write returns as if sent, so the relay would read on
        # all the upstream had buffered, and more, for nobody.
        relay.cancel()

    async def _relay(self, send: Send) -> None:
        stream = self._stream
        last: list[bytes] = []  # the terminal event or an error: sent with the body's end, in one write
        # What ends the event sent last, if the upstream never ended its lines: else b"".
        unended = b""
        try:
            # The head and the first events too: a client that left its previous answer on this
            # connection unread has them wait on it, and would hold the call and its upstream.
            async with asyncio.timeout_at(self._deadline):
                await self._start(send)
                terminal = await self._forward(send, stream.first_events)
                if terminal is None:
                    try:
                        async for chunk in stream.chunks:
                            events = stream.scanner.feed(chunk)
                            if events and (terminal := await self._forward(send, events)) is not None:
                                break
                        else:
                            tail = stream.scanner.flush()
                            if tail is not None:
                                terminal = await self._forward(send, [tail])
                                # An event the scanner held for the LF of its blank line's CRLF, which
                                # never came, did end: it goes out as it came.
                                if not tail.raw.endswith(b"\r\n\r"):
                                    unended = _blank_line_after(tail.raw)
                                if terminal is not None and unended:
                                    # Its blank line never came: ended here, or the client's parser
                                    # never dispatches it (an error would go unseen, the answer taken
                                    # for a whole one).
                                    terminal.append(unended)
                    except (UpstreamTimeout, TransportError):
                        # So too when the connection fails or goes silent instead: the held event
                        # was the upstream's last, and goes out before the failure does (a [DONE]
                        # then ends the stream as usual, whole).
                        if (terminal := await self._forward_held(send)) is None:
                            raise
            if terminal is None:
                last = await self._failed("The upstream stream ended before it was complete", "upstream_incomplete")
                if unended:
                    # End the upstream's unfinished event first, or the error event would be read
                    # as more lines of it and never reach the client as an event of its own.
                    last.insert(0, unended)
            else:
                # Recorded before the client can see the end, outside the call's deadline.
                unrecorded = await self._record(
                    "finished" if self._tally.error is None else "upstream_failed", self._tally.error
                )
                last = terminal if unrecorded is None else [unrecorded]
        except (TimeoutError, DeadlineExceeded):  # the relay's own timeout, or the upstream's waits'
            last = await self._failed("The call took longer than the gateway allows", "upstream_timeout")
        except UpstreamTimeout:
            last = await self._failed("The upstream went silent for longer than the gateway allows", "upstream_timeout")
        except TransportError as exc:
            last = await self._failed(f"The upstream connection failed: {type(exc).__name__}", "upstream_connection_lost")
        except EventTooLarge:  # none of it went out: the error event is an event of its own
            last = await self._failed(
                f"The upstream sent an event larger than {MAX_EVENT_BYTES // (1024 * 1024)} MiB",
                "upstream_event_too_large",
            )
        finally:
            with contextlib.suppress(Exception):
                await stream.chunks.aclose()  # type: ignore[attr-defined]
            await stream.response.aclose()
        try:
            # A client that reads nothing more would hold the connection for good: past the
            # call's deadline it gets a few seconds, then its connection is dropped (`_run`).
            async with asyncio.timeout_at(max(self._deadline, asyncio.get_running_loop().time()) + LAST_SEND_GRACE):
                await self._send(send, last, more_body=False)
        except TimeoutError:
            self._unfinished = True  # dropped as a stalled client's is (`_run`)

    async def _forward(self, send: Send, events: Iterable[SSEEvent]) -> list[bytes] | None:
        """Send what the client should get, up to the terminal event ([DONE] or an error):
        that one is returned unsent, with what follows an error in the same read (LiteLLM's
        [DONE]). Nothing follows [DONE]: what came with it goes as what came after it does,
        unread, not to the client (a usage chunk it did not ask for among it)."""
        tally, drop = self._tally, self._drop_usage_only
        kept: list[bytes] = []
        events = list(events)
        for index, event in enumerate(events):
            usage_only = tally.observe(event)
            if tally.done:
                await self._send(send, kept)
                return [event.raw]
            if tally.error is not None:
                await self._send(send, kept)
                return [e.raw for e in events[index:]]
            if not (usage_only and drop):
                kept.append(event.raw)
        await self._send(send, kept)
        return None

    async def _forward_held(self, send: Send) -> list[bytes] | None:
        """Forward the event the scanner holds only for the LF that may follow its last CR, if it
        holds one; what `_forward` returns for it. An unfinished event is no event: dropped."""
        tail = self._stream.scanner.flush()
        if tail is None or not tail.raw.endswith(b"\r\n\r"):
            return None
        return await self._forward(send, [tail])

    async def _start(self, send: Send) -> None:
        await self._put(send, {"type": "http.response.start", "status": 200, "headers": self._raw_headers})
        self._started = True

    async def _send(self, send: Send, chunks: list[bytes], more_body: bool = True) -> None:
        if not self._started:
            # The deadline or a shutdown came while the head waited on a client that left its
            # previous answer unread: a body without a head is uvicorn's plain-text 500.
            await self._start(send)
        if chunks and self._first_event_at is None:
            self._first_event_at = asyncio.get_running_loop().time()
        if chunks or not more_body:
            await self._put(send, {"type": "http.response.body", "body": b"".join(chunks), "more_body": more_body})

    async def _put(self, send: Send, message: Message) -> None:
        """One write, counted for `_watch_stall`."""
        self._writes += 1
        self._writing = True
        await send(message)
        self._writing = False

    async def _failed(self, message: str, code: str) -> list[bytes]:
        """Record the call as failed; the error event the client gets last."""
        if await self._record("upstream_failed", message) is not None:
            message += "; the call will be recorded once the database takes writes again"
        return [error_event(message, "upstream_error", code)]

    async def _record(self, reason: EndReason, error: str | None) -> bytes | None:
        """Record the call (once); if the store refused the record, the error event that
        tells the client so (the pipeline keeps the outcome and writes it later)."""
        if self._recorded:
            return None
        self._recorded = True
        end = RelayEnd(reason, error, self._first_event_at)
        try:
            await asyncio.shield(self._on_end(end))
        except StoreUnavailable as exc:
            return error_event(str(exc), "service_unavailable", "store_unavailable")
        return None


def _blank_line_after(raw: bytes) -> bytes:
    """What ends an event whose bytes `raw` stop short of its blank line: the blank line, after
    the end of its last line if that never came either (a CR alone is ended by the LF too)."""
    return b"\n" if raw.endswith(b"\n") else b"\n\n"
