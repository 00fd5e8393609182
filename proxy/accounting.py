"""What a call used and cost: read from the upstream's answer or stream.

Cost comes first from LiteLLM itself (the `x-litellm-response-cost` header on
plain answers, `usage.cost` in a stream's final chunk), then from per-token
prices (see pricing.py). Costs are rounded to 1e-12 USD so that equal usage
costs exactly the same streamed or not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .pricing import Pricing
from .sse import SSEEvent

COST_DECIMALS = 12


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reported_cost: float | None = None
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _cost(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def usage_from(usage: Any, reported_cost: Any = None) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    cost = _cost(reported_cost)
    if cost is None:
        cost = _cost(usage.get("cost"))
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), cost)


def estimated_usage(prompt_chars: int, completion_chars: int) -> Usage:
    """The rule of thumb the limiter uses too: a token per four characters."""
    return Usage(math.ceil(prompt_chars / 4), math.ceil(completion_chars / 4), None, estimated=True)


def cost_of(usage: Usage, model: str | None, pricing: Pricing) -> float:
    cost = usage.reported_cost
    # LiteLLM reports 0.0 for a model it has no price for: a price we know then counts.
    if not cost or usage.estimated:
        priced = pricing.cost(model, usage.prompt_tokens, usage.completion_tokens)
        if priced is not None:
            cost = priced
    return round(cost or 0.0, COST_DECIMALS)


def completion_chars(message: Any) -> int:
    """Characters of generated text in a non-streaming message (for estimates)."""
    if not isinstance(message, dict):
        return 0
    chars = len(message["content"]) if isinstance(message.get("content"), str) else 0
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            arguments = call["function"].get("arguments")
            chars += len(arguments) if isinstance(arguments, str) else 0
    return chars


class StreamTally:
    """Reads each relayed event: usage, errors, and generated text for estimates."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.error: str | None = None
        self.done = False
        self.completion_chars = 0

    def observe(self, event: SSEEvent) -> bool:
        """Take in one event; True when it is a usage-only chunk (no output in it)."""
        data = event.data
        if event.event == "error":
            self.error = (data or b"").decode("utf-8", "replace")[:2000] or "error event"
            return False
        if data is None:
            return False
        if data == b"[DONE]":
            self.done = True
            return False
        try:
            chunk = json.loads(data)
        except ValueError:
            return False
        if not isinstance(chunk, dict):
            return False
        if chunk.get("error"):
            error = chunk["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)[:2000]
            return False
        carries = False
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                carries = True
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for key in ("content", "reasoning_content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self.completion_chars += len(text)
                    carries = True
            for call in delta.get("tool_calls") or ():
                carries = True
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    self.completion_chars += len(arguments)
            if delta.get("role"):
                carries = True
        usage = usage_from(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
            return not carries
        return False
