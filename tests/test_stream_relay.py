"""The relay on its own, fed an upstream's bytes: what the client receives and what the call's
record is told, without any server in between."""

import asyncio
import json

import pytest

from proxy import streaming
from proxy.accounting import StreamTally
from proxy.forwarding import OpenStream
from proxy.sse import MAX_EVENT_BYTES, SSEScanner
from proxy.store import StoreUnavailable
from proxy.streaming import SSERelay
from proxy.upstream import ReadError, UpstreamTimeout
from tests.support import TOO_DEEP_FOR_JSON


class _Response:
    async def aclose(self) -> None:
        pass


async def _chunks(chunks: list[bytes]):
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


class Client:
    """The relay's other side: what it sends the client, and what it tells the call's record.
    The client never hangs up; a test overrides `send` or `on_end` where they are its point."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.ends: list = []
        self.tally = StreamTally()

    @property
    def body(self) -> bytes:
        return b"".join(m["body"] for m in self.messages if m["type"] == "http.response.body")

    async def send(self, message) -> None:
        self.messages.append(message)

    async def receive(self):
        await asyncio.sleep(3600)

    async def on_end(self, end) -> None:
        self.ends.append(end)

    def relay(self, stream: OpenStream, seconds: float = 30, **options) -> SSERelay:
        deadline = asyncio.get_running_loop().time() + seconds
        return SSERelay(stream, self.tally, [], deadline, self.on_end, **options)

    async def run(self, relay: SSERelay) -> None:
        await relay({"type": "http"}, self.receive, self.send)


async def opened(upstream, response: _Response | None = None) -> OpenStream:
    """The stream as forwarding hands it over: its first read taken."""
    scanner = SSEScanner()
    return OpenStream("primary", 1, response or _Response(), upstream, scanner, scanner.feed(await anext(upstream)))


async def _relay(chunks: list[bytes], drop_usage_only: bool = False):
    scanner, upstream, first = SSEScanner(), _chunks(chunks), []
    async for chunk in upstream:  # as forwarding._first_event: up to the first data event
        first.extend(scanner.feed(chunk))
        if any(e.data is not None for e in first):
            break
    client = Client()
    stream = OpenStream("primary", 1, _Response(), upstream, scanner, first)
    await client.run(client.relay(stream, drop_usage_only=drop_usage_only))
    return client.body, client.tally, client.ends


def relay(chunks: list[bytes], drop_usage_only: bool = False):
    return asyncio.run(_relay(chunks, drop_usage_only))


def events_of(body: bytes) -> list[str]:
    """The data of each event a spec-following client dispatches."""
    events, data = [], []
    for line in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" ").decode())
    return events


def test_the_upstreams_bytes_reach_the_client_unchanged_and_usage_is_read():
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\n: ping\r\n\r\n'
        b'event: message\ndata: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    sent, tally, (end,) = relay([body[:17], body[17:60], body[60:]])
    assert sent == body
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (3, 1)
    assert end.reason == "finished"


def test_the_error_event_after_an_unterminated_last_event_is_an_event_of_its_own():
    # The upstream's body ends in the middle of an event, with no [DONE]: the gateway's error
    # event must still reach the client as an event, not glued onto the unfinished line.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: {"choices":[{"index":0'
    sent, _, (end,) = relay([body])
    assert end.reason == "upstream_failed"
    assert sent.startswith(body)
    last = json.loads(events_of(sent)[-1])
    assert last["error"]["code"] == "upstream_incomplete"


def test_an_event_that_outgrows_the_bound_ends_the_stream_with_one_error_event_and_is_recorded():
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    filler = b"x" * 65536
    endless = [first, b'data: {"choices":[{"index":0,"delta":{"content":"', *[filler] * (MAX_EVENT_BYTES // len(filler) + 2)]
    sent, _, (end,) = relay(endless)
    assert end.reason == "upstream_failed" and "larger than" in end.error
    assert len(sent) < 64 * 1024  # none of the unfinished event reached the client
    events = events_of(sent)
    assert [json.loads(e)["error"]["code"] for e in events if "error" in e] == ["upstream_event_too_large"]
    assert sent.startswith(first) and len(events) == 2


def test_a_shutdown_while_the_finished_stream_is_recorded_lets_it_end_as_recorded():
    # Cut there, the client would be told the stream was cut short while the call is recorded
    # as answered (and a /v1 call's own job charged), so it might ask again and pay twice.
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )

    recording = asyncio.Event()

    class Recorded(Client):
        async def on_end(self, end) -> None:
            recording.set()
            await asyncio.sleep(0.1)  # the store's write
            self.ends.append(end)

    async def run():
        client = Recorded()
        task = asyncio.create_task(client.run(client.relay(await opened(_chunks([body])))))
        await recording.wait()
        task.cancel()  # uvicorn's, as server.shutdown_grace ends
        await task
        return client.body, client.ends

    sent, ends = asyncio.run(run())
    assert sent == body
    assert [end.reason for end in ends] == ["finished"]


def test_a_chunk_nested_too_deep_to_read_is_relayed_and_the_stream_ends_as_usual():
    # The json module gives up on such a chunk with a RecursionError, no ValueError: read as any
    # other unreadable chunk (passed on, counting nothing), not a relay that dies mid-answer with
    # the client's connection cut and no event saying why.
    deep = b'data: {"usage":' + b"[" * TOO_DEEP_FOR_JSON + b"]" * TOO_DEEP_FOR_JSON + b"}\n\n"
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        + deep
        + b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        + b"data: [DONE]\n\n"
    )
    sent, tally, (end,) = relay([body[:60], body[60:]])
    assert sent == body
    assert end.reason == "finished"
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (3, 1)


def test_an_error_event_the_upstream_left_unterminated_at_its_end_still_reaches_the_client_as_an_event():
    # Its blank line never came: relayed as it is, a client's SSE parser never dispatches it, and
    # the client (the openai SDK included) takes the cut answer for a whole one, while the call is
    # recorded as failed. It must end as an event, as the gateway's own error event would.
    error = b'data: {"error":{"message":"boom","type":"x","code":"500"}}'
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n' + error
    sent, _, (end,) = relay([body])
    assert end.reason == "upstream_failed" and end.error == "boom"
    assert sent.startswith(body)
    assert [json.loads(e).get("error", {}).get("message") for e in events_of(sent)] == [None, "boom"]


def test_a_done_whose_blank_line_never_came_is_ended_with_the_one_line_end_it_lacks():
    head = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    for last, ended in ((b"data: [DONE]\n", b"data: [DONE]\n\n"), (b"data: [DONE]", b"data: [DONE]\n\n"),
                        (b"data: [DONE]\r", b"data: [DONE]\r\n\n")):
        sent, _, (end,) = relay([head + last])
        assert (sent, end.reason) == (head + ended, "finished"), last


def test_a_stream_whose_head_waited_past_the_deadline_still_gets_its_head_before_its_error_event():
    # The head waits on a client that left its previous answer unread; when the call's deadline
    # came first, the error event went out as a body without a head: uvicorn's plain-text 500.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    class ReadingNothingYet(Client):
        blocked = True

        async def send(self, message) -> None:
            if message["type"] == "http.response.start" and self.blocked:
                self.blocked = False  # the client reads again after this
                await asyncio.sleep(3600)
            self.messages.append(message)

    async def run():
        client = ReadingNothingYet()
        await client.run(client.relay(await opened(_chunks([body, b"data: [DONE]\n\n"])), seconds=0.1))
        return client.messages, client.ends

    messages, ends = asyncio.run(run())
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    assert b"upstream_timeout" in messages[1]["body"] and messages[1]["more_body"] is False
    assert [end.reason for end in ends] == ["upstream_failed"]


class TakingTheFirstWriteOnly(Client):
    """A client that takes the stream's first write, then nothing."""

    async def send(self, message) -> None:
        if message["type"] == "http.response.body" and self.messages:
            await asyncio.sleep(3600)
        self.messages.append(message)


def test_a_client_that_takes_none_of_the_stream_is_cut_off_and_its_upstream_let_go():
    # Left waiting on it until the call's deadline (10 minutes by default), the relay held the
    # call's upstream connection: a team reading none of its streams took the whole pool to
    # LiteLLM, and the other teams' calls failed waiting for a connection.
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    closed = []

    class Response(_Response):
        async def aclose(self) -> None:
            closed.append(True)

    async def run():
        client = TakingTheFirstWriteOnly()
        stream = await opened(_chunks([first] * 100), Response())
        await asyncio.wait_for(client.run(client.relay(stream, seconds=600, stall_timeout=0.2)), 5)
        return client.ends, closed

    ends, closed = asyncio.run(run())
    assert [(end.reason, end.error) for end in ends] == [
        ("client_disconnected", "the client took none of the stream for 0.2 s: cut off")
    ]
    assert closed


def test_a_client_that_reads_slowly_is_not_cut_off():
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    class ReadingSlowly(Client):
        async def send(self, message) -> None:
            await asyncio.sleep(0.05)  # each write taken well within the bound, the stream longer than it

    async def run():
        client = ReadingSlowly()
        stream = await opened(_chunks([body] * 10 + [b"data: [DONE]\n\n"]))
        await client.run(client.relay(stream, stall_timeout=0.2))
        return client.ends

    assert [end.reason for end in asyncio.run(run())] == ["finished"]


def test_a_client_that_takes_a_write_more_slowly_than_the_stall_bound_but_steadily_is_not_cut_off():
    # A write waits until the client has taken nearly all written before it, and one write may
    # hold a read of hundreds of KiB (all the upstream had sent meanwhile), or an event of MiBs:
    # a client reading it at 10 KiB/s, as a slow link does, took longer than the bound over one
    # write, and was cut off as one that "took none of the stream", its call recorded cancelled.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    unsent = [1_000_000]

    class TakingEachWriteSlowly(Client):
        async def send(self, message) -> None:
            for _ in range(10):  # each write taken over 0.5 s, a few bytes at a time
                await asyncio.sleep(0.05)
                unsent[0] -= 100
            self.messages.append(message)

    async def run():
        client = TakingEachWriteSlowly()
        relay = client.relay(await opened(_chunks([body] * 3 + [b"data: [DONE]\n\n"])), stall_timeout=0.2)
        await relay({"type": "http", streaming.UNSENT: lambda: unsent[0]}, client.receive, client.send)
        return client.ends

    assert [(end.reason, end.error) for end in asyncio.run(run())] == [("finished", None)]


def test_a_client_that_takes_none_of_a_write_is_cut_off_though_the_connection_says_what_it_holds():
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    async def run():
        client = TakingTheFirstWriteOnly()
        relay = client.relay(await opened(_chunks([first] * 100)), seconds=600, stall_timeout=0.2)
        scope = {"type": "http", streaming.UNSENT: lambda: 1_000_000}
        await asyncio.wait_for(relay(scope, client.receive, client.send), 5)
        return client.ends

    assert [end.reason for end in asyncio.run(run())] == ["client_disconnected"]


def test_a_client_that_hangs_up_while_a_write_waits_on_it_has_the_upstream_read_no_further():
    # uvicorn wakes a write waiting on a client that reads nothing as it wakes the relay's watch,
    # when that client hangs up, and the write returns as if sent: the relay read on, as fast as
    # it could, all the upstream had buffered and sent since, until the watch's cancel came two
    # turns later. 200 stalled streams hung up at once took 4 s of CPU to let LiteLLM go.
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    taken_after_hang_up = []

    class Stalled(Client):
        """Takes the head and the first write, then nothing, until it hangs up (uvicorn's way)."""

        def __init__(self) -> None:
            super().__init__()
            self.waiting = False
            self.gone = False
            self._writable = asyncio.Event()
            self._message = asyncio.Event()

        async def send(self, message) -> None:
            if len(self.messages) >= 2:
                self.waiting = True
                await self._writable.wait()
            if not self.gone:
                self.messages.append(message)

        async def receive(self):
            await self._message.wait()
            return {"type": "http.disconnect"}

        def hang_up(self) -> None:  # uvicorn's connection_lost: the request's event, then the writes'
            self.gone = True
            self._message.set()
            self._writable.set()

    async def upstream(client: Stalled):
        while True:
            for _ in range(100):  # what the upstream client has buffered: taken without a wait
                if client.gone:
                    taken_after_hang_up.append(event)
                yield event
            await asyncio.sleep(0)

    async def run():
        client = Stalled()
        stream = await opened(upstream(client))
        task = asyncio.ensure_future(client.run(client.relay(stream, seconds=600)))
        while not client.waiting:
            await asyncio.sleep(0.01)
        client.hang_up()
        await asyncio.wait_for(task, 5)
        return client.ends

    assert [end.reason for end in asyncio.run(run())] == ["client_disconnected"]
    assert taken_after_hang_up == []


def test_a_crlf_events_lf_that_comes_in_the_next_read_reaches_the_client_at_once():
    # It went out with the next event instead: openai-python 1.x's parser, which takes CRLF CRLF (not
    # CRLF CR) for an event's end, then saw each event as late as the next one.
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\n'
    second = b'data: {"choices":[{"index":0,"delta":{"content":"!"}}]}\r\n\r\n'

    async def run():
        reads: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def upstream():
            while (chunk := await reads.get()) is not None:
                yield chunk

        reads.put_nowait(first)
        client = Client()
        task = asyncio.create_task(client.run(client.relay(await opened(upstream()))))
        for read in (second[:-1], second[-1:] + b'data: {"choices":'):
            reads.put_nowait(read)
            await asyncio.sleep(0.01)
        received = client.body
        reads.put_nowait(b'[]}\r\n\r\ndata: [DONE]\r\n\r\n')
        reads.put_nowait(None)
        await task
        return received

    assert asyncio.run(run()) == first + second


def test_the_last_byte_of_a_crlf_done_that_comes_in_a_read_of_its_own_reaches_the_client():
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    sent, tally, (end,) = relay([body[:-1], body[-1:]])
    assert sent == body
    assert end.reason == "finished" and (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (3, 1)


def test_a_crlf_done_whose_stream_ends_before_its_last_lf_is_relayed_as_sent():
    # Its blank line came (CR, the LF never did): no blank line of the gateway's is added after it.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\ndata: [DONE]\r\n\r'
    sent, _, (end,) = relay([body])
    assert sent == body
    assert end.reason == "finished"


def test_an_error_event_without_data_is_relayed_and_the_stream_goes_on():
    # No SSE client dispatches an event without data: the stream was cut there and recorded as
    # failed, its usage lost, while the client was left with a truncated answer and no error.
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b"event: error\n\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"!"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    sent, tally, (end,) = relay([body[:60], body[60:]])
    assert sent == body
    assert end.reason == "finished" and end.error is None
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (3, 2)


def test_a_done_with_a_trailing_blank_ends_the_stream_as_sent():
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE] \n\n"
    )
    sent, _, (end,) = relay([body])
    assert sent == body
    assert end.reason == "finished"


USAGE_ONLY = b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'


def test_a_client_that_did_not_ask_for_usage_gets_all_but_the_usage_only_chunk_and_the_usage_is_still_read():
    # API.md: a /v1 client that did not ask for stream_options.include_usage is not sent the
    # usage-only chunk; the gateway asked for it all the same, and records the call by it.
    head = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    )
    body = head + USAGE_ONLY + b"data: [DONE]\n\n"
    for cuts in ([body], [body[:60], body[60:]]):
        sent, tally, (end,) = relay(cuts, drop_usage_only=True)
        assert sent == head + b"data: [DONE]\n\n"
        assert end.reason == "finished" and (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (3, 1)
        assert relay(cuts)[0] == body  # one that asked gets it


def test_nothing_after_done_reaches_the_client_however_the_upstream_cut_its_writes():
    # Sent when it came in the read of [DONE], dropped when it came later: a usage chunk the
    # client did not ask for, or a second [DONE], reached it or not by the upstream's chunking.
    head = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    for after in (USAGE_ONLY, b"data: [DONE]\n\n", b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'):
        for cuts in ([head + after], [head, after]):
            sent, _, (end,) = relay(cuts, drop_usage_only=True)
            assert (sent, end.reason) == (head, "finished"), cuts


def test_an_unfinished_event_after_done_in_its_read_never_reaches_the_client():
    # Nor is it counted: the stream ended with its [DONE], whatever the upstream's read held after it.
    head = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    sent, tally, (end,) = relay([head + b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'])
    assert (sent, end.reason, tally.usage) == (head, "finished", None)


def test_a_relay_that_fails_unexpectedly_records_the_call_as_failed_naming_the_failure():
    # Any failure of the relay's own (not the upstream's, not the client's hang-up) still records
    # the call exactly once, and not as a success the client never saw the end of.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    class Failing(Client):
        async def send(self, message) -> None:
            if message["type"] == "http.response.body" and self.messages[1:]:
                raise RuntimeError("boom")
            self.messages.append(message)

    async def run():
        client = Failing()
        with pytest.raises(RuntimeError):
            await client.run(client.relay(await opened(_chunks([body] * 3 + [b"data: [DONE]\n\n"]))))
        return client.ends

    assert [(end.reason, end.error) for end in asyncio.run(run())] == [("upstream_failed", "relay failed: RuntimeError")]


def test_the_time_of_a_streams_first_event_is_when_its_first_event_went_out():
    # The call's time to first token: taken at each write, it was the time of the last event.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    async def upstream():
        for chunk in [body] * 4 + [b"data: [DONE]\n\n"]:
            await asyncio.sleep(0.05)
            yield chunk

    class Timing(Client):
        def __init__(self) -> None:
            super().__init__()
            self.body_times: list[float] = []

        async def send(self, message) -> None:
            if message["type"] == "http.response.body" and message["body"]:
                self.body_times.append(asyncio.get_running_loop().time())
            self.messages.append(message)

    async def run():
        client = Timing()
        await client.run(client.relay(await opened(upstream())))
        return client.body_times, client.ends

    times, (end,) = asyncio.run(run())
    assert end.reason == "finished" and len(times) == 5
    assert times[0] - 0.01 <= end.first_event_at <= times[0]


def test_a_stream_cut_at_its_deadline_whose_record_outlasted_the_grace_still_gets_its_error_event(monkeypatch):
    # The grace for the last write runs from the end of the record, not from the call's deadline:
    # a record that waited past it (on another process's lock, say) left no time for the error
    # event, and a client taking its bytes at an ordinary pace saw its stream end unfinished.
    monkeypatch.setattr(streaming, "LAST_SEND_GRACE", 0.2)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    async def silent_after_first():
        yield first
        await asyncio.sleep(3600)
        yield b"data: [DONE]\n\n"

    class SlowRecordAndPacedClient(Client):
        async def send(self, message) -> None:
            await asyncio.sleep(0.01)  # each write taken, not at once
            self.messages.append(message)

        async def on_end(self, end) -> None:
            await asyncio.sleep(0.5)  # the record waits on a locked database, past deadline and grace
            self.ends.append(end)

    async def run():
        client = SlowRecordAndPacedClient()
        await client.run(client.relay(await opened(silent_after_first()), seconds=0.1))
        return client.messages, client.ends

    messages, ends = asyncio.run(run())
    assert [end.reason for end in ends] == ["upstream_failed"]
    assert messages[-1]["more_body"] is False
    assert [json.loads(e).get("error", {}).get("code") for e in events_of(messages[-1]["body"])] == ["upstream_timeout"]


def test_a_stream_whose_last_write_its_client_did_not_take_within_the_grace_has_its_connection_dropped(monkeypatch):
    # Past the call's deadline and the grace, the relay returned with the response unfinished:
    # uvicorn logged "ASGI callable returned without completing response" at ERROR, an expected
    # event, and kept the connection, with the rest of the stream for a slow client to read,
    # an answer cut short without its error event.
    monkeypatch.setattr(streaming, "LAST_SEND_GRACE", 0.2)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    aborted = []

    async def endless():
        while True:
            await asyncio.sleep(0.01)
            yield first

    class TakingEachWriteSlowly(Client):
        async def send(self, message) -> None:
            await asyncio.sleep(0.3)  # each write taken, slower than the grace
            self.messages.append(message)

    async def run():
        client = TakingEachWriteSlowly()
        relay = client.relay(await opened(endless()), seconds=0.5)
        scope = {"type": "http", streaming.ABORT: lambda: aborted.append(True)}
        await asyncio.wait_for(relay(scope, client.receive, client.send), 5)
        return client.ends

    assert [end.reason for end in asyncio.run(run())] == ["upstream_failed"]
    assert aborted == [True]


def test_a_hang_up_while_the_finished_stream_is_recorded_does_not_cut_its_record():
    # The client's hang-up cancels the relay at once (the upstream let go); a record it cut
    # waited in memory for a later write, the call left running and its job uncompletable.
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    recording, written = asyncio.Event(), asyncio.Event()

    class HangingUpWhileRecorded(Client):
        async def receive(self):
            await recording.wait()
            return {"type": "http.disconnect"}

        async def on_end(self, end) -> None:
            recording.set()
            await asyncio.sleep(0.1)  # the store's write
            self.ends.append(end)
            written.set()

    async def run():
        client = HangingUpWhileRecorded()
        await client.run(client.relay(await opened(_chunks([body]))))
        await asyncio.wait_for(written.wait(), 1)
        return client.ends

    assert [end.reason for end in asyncio.run(run())] == ["finished"]


def test_a_broken_stream_whose_record_is_refused_ends_with_one_error_event_saying_so():
    # The store refusing the record (disk full, say) is the client's news too: the call's
    # failure is kept and recorded later, which its one error event must say.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: {"choices":[{"index":0'

    class Refusing(Client):
        async def on_end(self, end) -> None:
            self.ends.append(end)
            raise StoreUnavailable("the disk is full")

    async def run():
        client = Refusing()
        await client.run(client.relay(await opened(_chunks([body]))))
        return client.body, client.ends

    sent, ends = asyncio.run(run())
    assert [end.reason for end in ends] == ["upstream_failed"]
    (error,) = [json.loads(e)["error"] for e in events_of(sent) if "error" in e]
    assert error["code"] == "upstream_incomplete"
    assert "will be recorded once the database takes writes again" in error["message"]


def test_an_upstream_error_event_reaches_the_client_as_sent_with_the_done_of_its_read():
    # API.md: a later error event sent by LiteLLM is forwarded as it is, and the call recorded as
    # failed; LiteLLM's [DONE] behind it in the same read goes out with it.
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
        b"data: [DONE]\n\n"
    )
    sent, _, (end,) = relay([body])
    assert sent == body
    assert (end.reason, end.error) == ("upstream_failed", "overloaded")


def test_a_stream_that_ends_as_usual_does_not_drop_its_connection():
    # Dropping it (what a stalled client gets) would throw away what the client has not taken
    # yet, the stream's end included, and the connection the client could use again.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    aborted = []

    async def run():
        client = Client()
        relay = client.relay(await opened(_chunks([body])))
        await relay({"type": "http", streaming.ABORT: lambda: aborted.append(True)}, client.receive, client.send)
        return client.body, client.ends

    sent, ends = asyncio.run(run())
    assert (sent, [end.reason for end in ends]) == (body, ["finished"])
    assert aborted == []


def test_a_client_that_takes_none_of_the_stream_has_its_connection_dropped():
    # What it left untaken would otherwise wait in the process for a client that reads nothing,
    # until the kernel gave up on it.
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    aborted = []

    async def run():
        client = TakingTheFirstWriteOnly()
        relay = client.relay(await opened(_chunks([first] * 100)), seconds=600, stall_timeout=0.2)
        scope = {"type": "http", streaming.ABORT: lambda: aborted.append(True)}
        await asyncio.wait_for(relay(scope, client.receive, client.send), 5)

    asyncio.run(run())
    assert aborted == [True]


def test_a_stream_cut_by_the_shutdown_is_recorded_as_the_shutdowns_doing_and_told_so():
    # Not the client's hang-up: the record says the gateway cut it, and the client hears so last.
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    async def upstream():
        yield first
        await asyncio.sleep(3600)  # the answer goes on as the shutdown comes
        yield first

    async def run():
        client = Client()
        task = asyncio.create_task(client.run(client.relay(await opened(upstream()))))
        while not client.body:
            await asyncio.sleep(0.01)
        task.cancel()  # uvicorn's, as server.shutdown_grace ends
        await task
        return client.body, client.ends

    sent, ends = asyncio.run(run())
    assert [end.reason for end in ends] == ["shutdown"]
    assert json.loads(events_of(sent)[-1])["error"]["code"] == "shutting_down"


async def _broken_after(chunks: list[bytes], error: Exception):
    """An upstream that sends `chunks`, then fails with `error` (its connection broken, or silent)."""
    async for chunk in _chunks(chunks):
        yield chunk
    raise error


async def _relay_until_broken(chunks: list[bytes], error: Exception):
    client, upstream = Client(), _broken_after(chunks, error)
    await client.run(client.relay(await opened(upstream)))
    return client.body, client.tally, client.ends


@pytest.mark.parametrize("error", [ReadError("the upstream closed the connection mid-answer"), UpstreamTimeout("silent")])
def test_a_crlf_done_whose_lf_never_comes_before_the_upstream_fails_ends_the_stream_as_finished(error):
    # Its blank line came (CR): the stream was whole, but the scanner held the [DONE] for an LF that
    # might follow, and the connection's end (a missing last chunk) or silence that followed was
    # taken for a broken stream: an error event after the whole answer, the call recorded as failed.
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\ndata: [DONE]\r\n\r'
    sent, _, (end,) = asyncio.run(_relay_until_broken([body[:60], body[60:]], error))
    assert sent == body
    assert end.reason == "finished"


def test_a_crlf_usage_chunk_whose_lf_never_comes_before_the_connection_breaks_still_counts():
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\r\n\r'
    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\n' + usage
    sent, tally, (end,) = asyncio.run(_relay_until_broken([body[:60], body[60:]], ReadError("cut")))
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (3, 1)
    assert sent.startswith(body) and end.reason == "upstream_failed"
