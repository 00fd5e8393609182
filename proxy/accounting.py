"""What a call used and cost: read from the upstream's answer or stream.

Cost comes first from LiteLLM itself (the `x-litellm-response-cost` header on
plain answers, `usage.cost` in a stream's final chunk), then from per-token
prices (see pricing.py). Costs are rounded to 1e-12 USD so that equal usage
costs exactly the same streamed or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .json_codec import dumps, loads
from .pricing import Pricing
from .sse import SSEEvent, ends_stream

COST_DECIMALS = 12


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reported_cost: float | None = None
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# Beyond any real call, and far inside SQLite's 64-bit integers: a count above it is not usage.
MAX_TOKENS = 10**12
# Beyond any real call too: a cost above it is no cost. Taken as one, two such calls (1e308 is a
# finite float) summed to infinity, and a job's total_cost_usd went out as null (JSON has no
# infinity), as did the team's cost counter, for good.
MAX_COST_USD = 1e9


def _count(value: Any) -> int | None:
    """A token count; None for what is none (null, negative, fractional, text, a boolean, a
    count beyond any real call)."""
    if type(value) is int:  # what every upstream sends: the checks below, in one
        return value if 0 <= value <= MAX_TOKENS else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 12.0 is the JSON number 12
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS else None


def _cost(value: Any) -> float | None:
    if value is None:  # most answers: no cost reported
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_COST_USD:
        return float(value)  # NaN fails the comparison, as infinity does
    return None


def usage_from(usage: Any, reported_cost: Any = None) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    cost = _cost(reported_cost)
    if cost is None:
        cost = _cost(usage.get("cost"))
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None  # not usage: the call is then estimated, as when no usage came
    if not prompt and not completion:
        # No call uses no tokens at all, not even of its prompt: LiteLLM's stand-in for a usage its
        # provider never sent (an answer's), which left the call counted, priced and rate-limited as free.
        return None
    return Usage(prompt, completion, cost)


def estimated_usage(prompt_chars: int, completion_chars: int, reported: Any = None) -> Usage:
    """The rule of thumb the limiter uses too: a token per four characters. A count the
    upstream did give, in a `reported` usage that is none for want of the other, is kept; above
    zero only, as zero is LiteLLM's stand-in for a count it never had."""
    prompt, completion = math.ceil(prompt_chars / 4), math.ceil(completion_chars / 4)
    if isinstance(reported, dict):
        prompt = _count(reported.get("prompt_tokens")) or prompt
        completion = _count(reported.get("completion_tokens")) or completion
    return Usage(prompt, completion, None, estimated=True)


def cost_of(usage: Usage, model: str | None, pricing: Pricing) -> float:
    cost = usage.reported_cost
    # LiteLLM reports 0.0 for a model it has no price for: a price we know then counts.
    if not cost or usage.estimated:
        priced = pricing.cost(model, usage.prompt_tokens, usage.completion_tokens)
        if priced is not None:
            cost = priced
    return round(cost, COST_DECIMALS) if cost else 0.0  # no cost known: no rounding to do


def message_content(message: Any) -> str:
    """A message's text: its content, or the text of its content's parts (the jobs API answers
    with it, and estimates count it)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def completion_chars(message: Any) -> int:
    """Characters of generated text in a non-streaming message, or in a stream's delta, which
    has the same fields (for estimates: an answer estimates as its stream would)."""
    if not isinstance(message, dict):
        return 0
    chars = len(message_content(message))
    for key in ("reasoning_content", "refusal"):
        text = message.get(key)
        chars += len(text) if isinstance(text, str) else 0
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():  # an upstream's odd answer is still recorded
        if isinstance(call, dict):
            chars += arguments_chars(call.get("function"))
    return chars + arguments_chars(message.get("function_call"))  # the legacy `functions` API's


def arguments_chars(function: Any) -> int:
    """Characters of a function call's arguments: a tool call's `function`, or `function_call`."""
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return len(arguments) if isinstance(arguments, str) else 0


# A stream's text is read only for an estimate, needed when no usage chunk comes: until then its
# chunks wait unread, and are read in one go whenever this many bytes of them have gathered.
UNREAD_TEXT_BYTES = 8 * 1024


class StreamTally:
    """Reads each relayed event: usage, errors, and generated text for estimates."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.reported: dict[str, Any] | None = None  # the last usage that was none: a count it has is kept
        self.error: str | None = None
        self.done = False
        self._chars = 0
        self._unread: list[bytes] = []
        self._unread_bytes = 0

    @property
    def completion_chars(self) -> int:
        """Characters of generated text so far."""
        if self._unread:
            self._read_unread()
        return self._chars

    def observe(self, event: SSEEvent) -> bool:
        """Take in one event; True when it is a usage-only chunk (no output in it)."""
        data = event.data
        if data is None:  # no data: no event to an SSE client (WHATWG), `event: error` or not
            return False
        if event.event == "error":
            self.error = data.decode("utf-8", "replace")[:2000] or "error event"
            return False
        if ends_stream(data):
            self.done = True
            return False
        # find(), not `in`: on Python 3.11 `bytes in bytes` first tries the needle as an integer
        # and formats a TypeError, per event (bench/RESULTS.md, session 31).
        if data.find(b'"usage"') < 0 and data.find(b'"error"') < 0 and data.find(b"\\u") < 0:
            # Neither key can be in it (not even escaped): only text, read if an estimate is needed.
            self._unread.append(data)
            self._unread_bytes += len(data)
            if self._unread_bytes > UNREAD_TEXT_BYTES:
                self._read_unread()
            return False
        chunk = json_object(data)
        if chunk is None:
            return False
        if chunk.get("error"):
            self.error = error_text(chunk["error"])
            return False
        self._chars += _generated(chunk)
        reported = chunk.get("usage")
        if not isinstance(reported, dict):
            return False
        usage = usage_from(reported)
        if usage is not None:
            self.usage = usage
        else:
            self.reported = reported
        return not _carries_output(chunk)

    def _read_unread(self) -> None:
        for data in self._unread:
            chunk = json_object(data)
            if chunk is not None:
                self._chars += _generated(chunk)
        self._unread.clear()
        self._unread_bytes = 0


def error_text(error: Any) -> str:
    """An upstream's error as a message: its `message` if it has one, else all of it; at most
    2,000 characters."""
    if isinstance(error, dict) and error.get("message") is not None:
        error = error["message"]
    if isinstance(error, str):
        return error[:2000]
    # Anything else as JSON, as it came, not as Python writes it (`None`, quotes of its own).
    return dumps(error).decode("utf-8", "replace")[:2000]


def json_object(data: bytes) -> dict[str, Any] | None:
    """`json.loads(data)` when that is an object, else None; bytes that are not UTF-8 are read
    as an SSE client decodes them (replacement characters), not refused with their usage."""
    try:
        value = loads(data)
    except UnicodeDecodeError:
        try:
            value = loads(data.decode("utf-8", "replace").encode())
        except ValueError:
            return None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _generated(chunk: dict[str, Any]) -> int:
    """A chunk's characters of generated text."""
    chars = 0
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            chars += completion_chars(choice.get("delta"))
    return chars


def _carries_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries any output besides its usage: a finish reason, logprobs, or
    anything at all in a delta (text, tool calls, a role, audio...), where LiteLLM's own usage
    chunk has an empty delta or one of nulls. Asked only of chunks with usage."""
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("logprobs"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.values()):
            return True
    return False
