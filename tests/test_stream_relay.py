"""The relay on its own, fed an upstream's bytes: what the client receives and what the call's
record is told, without any server in between."""

import asyncio
import json

from proxy.accounting import StreamTally
from proxy.forwarding import OpenStream
from proxy.sse import SSEScanner
from proxy.streaming import SSERelay


class _Response:
    async def aclose(self) -> None:
        pass


async def _chunks(chunks: list[bytes]):
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


async def _relay(chunks: list[bytes], drop_usage_only: bool = False):
    scanner, upstream, first = SSEScanner(), _chunks(chunks), []
    async for chunk in upstream:  # as forwarding._first_event: up to the first data event
        first.extend(scanner.feed(chunk))
        if any(e.data is not None for e in first):
            break
    stream = OpenStream("primary", 1, _Response(), upstream, scanner, first)
    tally, ends, sent = StreamTally(), [], []

    async def on_end(end) -> None:
        ends.append(end)

    async def send(message) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    async def receive():
        await asyncio.sleep(3600)

    loop = asyncio.get_running_loop()
    relay = SSERelay(stream, tally, [], loop.time() + 30, on_end, drop_usage_only)
    await relay({"type": "http"}, receive, send)
    return b"".join(sent), tally, ends


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
