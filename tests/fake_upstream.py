"""A deterministic OpenAI-compatible upstream for tests and benchmarks.

LiteLLM sits in front of it, so Tollgate's tests exercise a real LiteLLM Proxy
while every answer stays predictable:

* prompt tokens = whitespace-separated words in all message contents;
* completion tokens = number of content chunks (default 5, one word each);
* the model name selects failures: ``fail-500*``, ``fail-503*``, ``fail-429*``
  (with ``Retry-After: 7``), ``fail-403*`` (a provider refusing the request, as OpenAI does a region it
  does not serve), ``fail-404*`` (a model the provider does not serve), ``fail-400*`` (OpenAI's ``invalid_request_error`` naming ``param: messages``), ``hang*`` (no headers for 30 s),
  ``abort*`` (stream breaks after two chunks), ``garbage*`` (malformed SSE/JSON),
  ``absurd-usage*`` (reports 10^20 prompt tokens), ``error-first*`` (a stream whose
  first event is an error), ``error-later*`` (a stream sending an error event after two
  chunks, then ending), ``surrogate-error*`` (a 400 whose message holds a lone UTF-16
  surrogate, escaped), ``surrogate-answer*`` (an answer whose content holds one),
  ``surrogate-later*`` (as ``error-later*``, the error's message holding one),
  ``deep-tool-call*`` (an answer whose tool call holds a value nested DEEP_TOOL_CALL levels),
  ``null-message*`` (an answer whose choice's message is null, which LiteLLM cannot read),
  ``no-usage*`` (an answer, of ``n`` choices, or a stream without usage), ``half-usage*`` (a
  usage whose ``completion_tokens`` is null, its prompt tokens counted), ``reported-cost*``
  (LiteLLM's own cost figure, REPORTED_COST: an answer's ``x-litellm-response-cost`` header, a
  stream's ``usage.cost``);
* the API key ``wrong-provider-key`` is refused with OpenAI's 401, the answer of a
  provider that does not know the key it was given;
* a body carrying ``langfuse_host``, a field LiteLLM bans from request bodies, is refused
  with the 401 LiteLLM itself answers when it runs with a database (prisma importable): for
  a gateway pointed here directly (behind a real LiteLLM, the fake never sees that field);
* ``--model-info-delay S`` serves LiteLLM's ``GET /model/info`` (prices for ``primary`` and
  ``backup``) after S seconds, a LiteLLM slow to answer it; without it, that is a 404;
* each log entry says what was sent: ``usage`` (the usage an answer or a stream's usage
  chunk carried, else None) and ``chars_sent`` (characters of generated text sent so far);
* directives in the messages tune one request: ``[chunks=N]``, ``[delay_ms=N]``
  (between stream chunks), ``[first_byte_ms=N]`` (before any answer), and
  ``[tag=NAME]`` labels it in the log, ``[stamp]`` puts each chunk's send time in it.

Every request is logged; ``GET /_log?tag=NAME`` returns the log so tests can see
what the upstream received and when a client connection was closed.

Run: ``python tests/fake_upstream.py --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DIRECTIVE = re.compile(r"\[(chunks|delay_ms|first_byte_ms)=(\d+)\]")
TAG = re.compile(r"\[tag=([\w.-]+)\]")
LOG: list[dict[str, Any]] = []
LOG_LIMIT = 5000
REFUSED_KEY = "wrong-provider-key"
LITELLM_BANNED = "langfuse_host"
# LiteLLM 1.102.4's answer, word for word, to a body carrying it (auth_utils.is_request_body_safe).
LITELLM_BODY_REFUSAL = {
    "message": f"Authentication Error, Rejected Request: {LITELLM_BANNED} is not allowed in request body. "
    "Clientside passthrough requires explicit admin opt-in via either "
    "`general_settings.allow_client_side_credentials = true` (proxy-wide) or "
    "`configurable_clientside_auth_params` on the deployment in your proxy config.yaml. "
    "Relevant Issue: https://huntr.com/bounties/4001e1a2-7b7a-4776-a3ae-e6692ec3d997",
    "type": "auth_error",
    "param": "None",
    "code": "401",
}
NO_LOG = False  # the benchmark switches the log off
# With --model-info-delay, GET /model/info answers as LiteLLM does, pricing these models, after
# that many seconds (LiteLLM slow to answer it as the gateway starts); without, it is a 404.
# Deeper than the json module writes on Python 3.11 (its recursion limit, about 1,000 levels),
# not deeper than orjson reads (1,024 levels): a value Tollgate can read from an answer.
DEEP_TOOL_CALL = 1000
REPORTED_COST = 0.125  # USD: what no per-token price of these models makes
MODEL_INFO_PRICES = {"primary": (1e-06, 2e-06), "backup": (3e-06, 4e-06)}
MODEL_INFO_DELAY: float | None = None
FAILED_ONCE: set[str] = set()  # the fails-first-* models that failed their first request


def _message_text(messages: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return " ".join(parts)


def _directives(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in DIRECTIVE.findall(text)}


def _words(count: int) -> list[str]:
    return [f"word{i} " for i in range(1, count + 1)]


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None, stamp: bool = False) -> bytes:
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if stamp:
        body["sent_at"] = time.time()  # lets a benchmark measure each chunk's delay
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _error_event(model: str) -> bytes:
    error = {"message": f"fake upstream error event from {model}", "type": "fake_error", "code": "fake_event"}
    if model.startswith("surrogate"):
        error["message"] += " near \ud83d"  # half of a UTF-16 pair, which json.dumps escapes
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


def _usage(prompt: int, completion: int, model: str = "") -> dict[str, int | None]:
    if model.startswith("half-usage"):
        return {"prompt_tokens": prompt, "completion_tokens": None, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _wants_tool_call(body: dict[str, Any]) -> bool:
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def _tool_call(body: dict[str, Any]) -> dict[str, Any]:
    name = body["tools"][0].get("function", {}).get("name", "tool")
    return {"id": "call_fake_1", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}


async def chat_completions(request: Request) -> Response:
    body = await request.json()
    model = str(body.get("model", ""))
    messages = body.get("messages") or []
    text = _message_text(messages)
    options = _directives(text)
    prompt_tokens = 10**20 if model.startswith("absurd-usage") else len(text.split())
    chunks = options.get("chunks", 5)
    if isinstance(body.get("max_tokens"), int):
        chunks = min(chunks, body["max_tokens"])
    stream = bool(body.get("stream"))
    entry: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "model": model,
        "stream": stream,
        "user": body.get("user"),
        "tag": (TAG.findall(text) or [None])[0],
        "body": body,
        "headers": dict(request.headers),
        "started": time.time(),
        "finished": None,
        "disconnected": None,
        "usage": None,  # the usage it sent, in an answer or a stream's usage chunk
        "chars_sent": 0,  # characters of generated text it sent (a stream's, chunk by chunk)
    }
    if not NO_LOG:
        LOG.append(entry)
        del LOG[:-LOG_LIMIT]

    if request.headers.get("authorization") == f"Bearer {REFUSED_KEY}":
        entry["finished"] = time.time()
        error = {
            "message": "Incorrect API key provided: wrong-pr*****-key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        return JSONResponse({"error": error}, status_code=401)
    if LITELLM_BANNED in body:
        entry["finished"] = time.time()
        return JSONResponse({"error": LITELLM_BODY_REFUSAL}, status_code=401)
    if options.get("first_byte_ms"):
        # Waiting for the client's hang-up rather than sleeping: the log then shows when the
        # gateway gave up on this request, before any byte of it.
        try:
            await asyncio.wait_for(_hang_up(request), options["first_byte_ms"] / 1000)
        except TimeoutError:
            pass
        else:
            entry["disconnected"] = time.time()
            return Response(status_code=499)
    if model.startswith("hang"):
        await asyncio.sleep(30)
    if model.startswith("surrogate-error"):
        # A 400 whose message quotes text cut in the middle of a UTF-16 pair, as a provider that
        # truncates strings by UTF-16 units writes it: a lone surrogate, escaped.
        entry["finished"] = time.time()
        error = b'{"error": {"message": "prompt rejected near \\ud83d", "type": "invalid_request_error", "code": "400"}}'
        return Response(error, status_code=400, media_type="application/json")
    if model.startswith("surrogate-answer") and not stream:
        entry["finished"] = time.time()
        answer = (
            b'{"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "surrogate-answer", '
            b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "smile \\ud83d"}, '
            b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}'
        )
        return Response(answer, media_type="application/json")
    if model.startswith("fails-first-") and model not in FAILED_ONCE:
        FAILED_ONCE.add(model)  # a model that fails, then answers again
        entry["finished"] = time.time()
        return JSONResponse({"error": {"message": "fake upstream failure 500 (once)", "code": "500"}}, status_code=500)
    if model.startswith("small-context") and prompt_tokens > 8:
        # OpenAI's refusal of a prompt longer than the model's context window, word for word.
        entry["finished"] = time.time()
        error = {
            "message": f"This model's maximum context length is 8 tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
        return JSONResponse({"error": error}, status_code=400)
    for status in (500, 503, 429, 404, 403, 400):
        if model.startswith(f"fail-{status}"):
            entry["finished"] = time.time()
            headers = {"Retry-After": "7"} if status == 429 else {}
            error = {"message": f"fake upstream failure {status}", "type": "fake_error", "code": str(status)}
            if status == 400:  # as OpenAI refuses a request: its type, and the parameter at fault
                error.update(type="invalid_request_error", param="messages")
            if status in (403, 404):  # typed as OpenAI types its refusals, which LiteLLM reads as a BadRequestError
                error.update(type="invalid_request_error")
            return JSONResponse({"error": error}, status_code=status, headers=headers)

    rid = "chatcmpl-" + uuid.uuid4().hex[:12]
    words = _words(chunks)
    tool = _wants_tool_call(body)
    completion_tokens = 1 if tool else len(words)
    if not stream:
        entry["finished"] = time.time()
        if model.startswith("garbage"):
            return Response(b'{"id": "x", "choices": [', media_type="application/json")
        message: dict[str, Any] = {"role": "assistant", "content": None if tool else "".join(words)}
        if tool:
            message["tool_calls"] = [_tool_call(body)]
        if model.startswith("deep-tool-call"):
            message["tool_calls"] = [{**_tool_call(body), "deep": "DEEP"}]
        if model.startswith("null-message"):
            message = None  # type: ignore[assignment]
        entry["usage"] = _usage(prompt_tokens, completion_tokens, model)
        entry["chars_sent"] = len((message or {}).get("content") or "")
        answer = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": _usage(prompt_tokens, completion_tokens, model),
        }
        if model.startswith("no-usage"):
            del answer["usage"]
            entry["usage"] = None
            choices = body.get("n") if isinstance(body.get("n"), int) else 1
            answer["choices"] = [{**answer["choices"][0], "index": i} for i in range(choices)]
        if model.startswith("reported-cost"):
            return JSONResponse(answer, headers={"x-litellm-response-cost": str(REPORTED_COST)})
        if model.startswith("deep-tool-call"):
            # Written by hand: the json module (behind JSONResponse) cannot write it on 3.11.
            deep = b"[" * DEEP_TOOL_CALL + b"]" * DEEP_TOOL_CALL
            return Response(json.dumps(answer).encode().replace(b'"DEEP"', deep), media_type="application/json")
        return JSONResponse(answer)

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    delay = options.get("delay_ms", 0) / 1000
    stamp = "[stamp]" in text

    async def events() -> AsyncIterator[bytes]:
        try:
            if model.startswith("error-first"):
                yield _error_event(model)
                entry["finished"] = time.time()
                return
            if tool:
                call = _tool_call(body)
                yield _chunk(rid, model, {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]})
                yield _chunk(rid, model, {}, "tool_calls")
            else:
                for i, word in enumerate(words):
                    if model.startswith("abort") and i == 2:
                        # Let the first chunks reach LiteLLM before the connection drops:
                        # an aiohttp reader that sees data and the drop in one read raises
                        # at once, and the stream would fail before its first byte instead.
                        await asyncio.sleep(0.2)
                        raise ConnectionAbortedError("fake upstream aborts mid-stream")
                    if model.startswith(("error-later", "surrogate-later")) and i == 2:
                        yield _error_event(model)
                        entry["finished"] = time.time()
                        return
                    if model.startswith("garbage") and i == 2:
                        yield b'data: {"id": "broken", "choices": [\n\n'
                    delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
                    yield _chunk(rid, model, delta, stamp=stamp)
                    entry["chars_sent"] += len(word)
                    if delay:
                        await asyncio.sleep(delay)
                yield _chunk(rid, model, {}, "stop")
            if include_usage and not model.startswith("no-usage"):
                usage_chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens, model),
                }
                if model.startswith("reported-cost"):
                    usage_chunk["usage"]["cost"] = REPORTED_COST
                yield b"data: " + json.dumps(usage_chunk).encode() + b"\n\n"
                entry["usage"] = usage_chunk["usage"]
            yield b"data: [DONE]\n\n"
            entry["finished"] = time.time()
        finally:
            if entry["finished"] is None:
                entry["disconnected"] = time.time()

    return StreamingResponse(events(), media_type="text/event-stream")


async def _hang_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def get_log(request: Request) -> Response:
    tag = request.query_params.get("tag")
    entries = [e for e in LOG if tag is None or e["tag"] == tag]
    return JSONResponse(entries)


async def clear_log(request: Request) -> Response:
    LOG.clear()
    return JSONResponse({"ok": True})


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": []})


async def model_info(request: Request) -> Response:
    if MODEL_INFO_DELAY is None:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    print("GET /model/info: answering after", MODEL_INFO_DELAY, "s", flush=True)  # what a test waits for
    await asyncio.sleep(MODEL_INFO_DELAY)
    data = [
        {"model_name": name, "model_info": {"input_cost_per_token": price[0], "output_cost_per_token": price[1]}}
        for name, price in MODEL_INFO_PRICES.items()
    ]
    return JSONResponse({"data": data})


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/model/info", model_info),
            Route("/_log", get_log),
            Route("/_log", clear_log, methods=["DELETE"]),
        ]
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--no-log", action="store_true", help="keep no request log (benchmarks)")
    parser.add_argument("--model-info-delay", type=float, help="serve GET /model/info after this many seconds")
    args = parser.parse_args()
    global NO_LOG, MODEL_INFO_DELAY
    NO_LOG = args.no_log
    MODEL_INFO_DELAY = args.model_info_delay
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
