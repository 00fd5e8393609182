"""The benchmark's OpenAI-compatible upstream: tests/fake_upstream.py's answers, served lean.

On one machine, whatever the upstream spends is taken from the gateway being measured: the
tests' fake upstream (Starlette on uvicorn) cost 0.2 ms of CPU per plain call and 0.9 ms per
stream, as much as Tollgate itself, where a real provider costs this machine nothing. This
one answers the same bytes (the same chunk and usage builders, the same `[chunks=N]`,
`[delay_ms=N]` and `[stamp]` directives, one write per streamed chunk as a provider sends its
tokens) from a bare asyncio protocol on uvloop and httptools. It has none of the failure
modes the tests need: only the successful answers the benchmark asks for.

Run: ``python bench/upstream.py --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_upstream import _chunk, _directives, _message_text, _usage, _words  # noqa: E402

CHAT_PATHS = (b"/v1/chat/completions", b"/chat/completions")
MODELS = json.dumps({"object": "list", "data": []}).encode()


def _head(status: bytes, content_type: bytes, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
    return b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\n" + framing + b"\r\n"


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply(b"400 Bad Request", b"text/plain", b"bad request")
            self._transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._streaming is not None:
            self._streaming.cancel()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, body = self._url.split(b"?", 1)[0], b"".join(self._body)
        self._url, self._body = b"", []
        if url in CHAT_PATHS:
            self._chat(json.loads(body))
        elif url == b"/v1/models":
            self._reply(b"200 OK", b"application/json", MODELS)
        else:
            self._reply(b"404 Not Found", b"application/json", b'{"error": {"message": "not found"}}')

    def _reply(self, status: bytes, content_type: bytes, body: bytes) -> None:
        self._transport.write(_head(status, content_type, len(body)) + body)  # type: ignore[union-attr]

    def _chat(self, body: dict[str, Any]) -> None:
        model = str(body.get("model", ""))
        text = _message_text(body.get("messages") or [])
        options = _directives(text)
        chunks = options.get("chunks", 5)
        if isinstance(body.get("max_tokens"), int):
            chunks = min(chunks, body["max_tokens"])
        rid = "chatcmpl-" + uuid.uuid4().hex[:12]
        words = _words(chunks)
        usage = _usage(len(text.split()), len(words))
        if not body.get("stream"):
            answer = {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "finish_reason": "stop"}],
                "usage": usage,
            }
            self._reply(b"200 OK", b"application/json", json.dumps(answer).encode())
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = self._events(rid, model, words, usage, include_usage, options.get("delay_ms", 0) / 1000,
                              "[stamp]" in text)
        self._transport.write(_head(b"200 OK", b"text/event-stream; charset=utf-8", None))  # type: ignore[union-attr]
        self._streaming = asyncio.get_running_loop().create_task(events)

    async def _events(self, rid: str, model: str, words: list[str], usage: dict[str, int], include_usage: bool,
                      delay: float, stamp: bool) -> None:
        write = self._transport.write  # type: ignore[union-attr]

        def send(event: bytes) -> None:
            write(b"%x\r\n%s\r\n" % (len(event), event))

        for i, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            send(_chunk(rid, model, delta, stamp=stamp))
            if delay:
                await asyncio.sleep(delay)
        send(_chunk(rid, model, {}, "stop"))
        if include_usage:
            usage_chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [], "usage": usage}
            send(b"data: " + json.dumps(usage_chunk).encode() + b"\n\n")
        send(b"data: [DONE]\n\n")
        write(b"0\r\n\r\n")
        self._streaming = None


async def serve(host: str, port: int) -> None:
    # uvicorn's backlog: the memory measurement opens 1,000 streams at once.
    server = await asyncio.get_running_loop().create_server(_Connection, host, port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
