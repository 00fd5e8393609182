"""JSON on the request path: orjson wherever it gives what the json module would.

A call parses its request and its upstream's answer and writes the upstream's body and its
own response: through the json module's Python wrappers that was about a sixth of the
instructions of a call (bench/instructions.sh); orjson does the same in C in a fraction.

The results are the json module's. orjson refuses what json.loads may still take (NaN and
Infinity, numbers out of a double's range, lone surrogates, another encoding than UTF-8):
those, and any other text it refuses, go to json.loads itself, which gives its own value or
its own error. The one thing orjson takes but reads differently is an integer outside 64 bits,
which it turns into a float: a text with a run of 19 digits goes to json.loads too.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import orjson
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response

from .records import RawJSON

# Every byte to b" ", but ASCII digits to b"0": a run of digits is then found by `in`, a
# byte search in C, where a regular expression would walk the text in several times the time.
_DIGIT_MASK = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONGEST_EXACT = b"0" * 19  # a shorter integer fits in 64 bits, where orjson keeps it exact


UNSURE: Any = object()
# Levels past the recursion limit a value `loads` read may be nested: orjson reads 1,024 (a
# deeper text goes to json.loads, which stops at the limit itself), and a few levels more for
# the answer holding it.
_DEEPEST_READ = 1_100


def loads(data: bytes) -> Any:
    """`json.loads(data)`: the same value, or the same error; but a text nested too deep for the
    json module (its RecursionError, past orjson's own limit of 1,024 levels) is a ValueError, as
    any other text it cannot read: the upstream's answers and events are read here, and their
    readers take a ValueError for an unreadable one."""
    value = orjson_loads(data)
    if value is not UNSURE:
        return value
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply to be read") from None


def orjson_loads(data: bytes) -> Any:
    """orjson's value of `data` where it is json.loads's value too; else `UNSURE`, for a
    reader with rules of its own to take the text the json module's way."""
    if data.translate(_DIGIT_MASK).find(_LONGEST_EXACT) < 0:  # find(): see StreamTally.observe
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return UNSURE


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of `value`, as `json.dumps(value, ensure_ascii=False,
    separators=(",", ":")).encode()` writes it but for how some floats are spelled (0.00001
    and 1e-7, not 1e-05 and 1e-07) and non-finite floats (null, not NaN, which JSON cannot
    carry)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer outside 64 bits, a key that is not a string, RawJSON
        pass
    try:
        # Not on the first try: a `default` costs every call's answer, and only pages of jobs
        # hold RawJSON.
        return orjson.dumps(value, default=_fragment)
    except orjson.JSONEncodeError:  # as above, or nested past orjson's 255 levels
        pass
    try:
        return _json_dumps(value)
    except RecursionError:
        pass
    # Nested past the recursion limit, which bounds the json module's writer on Python 3.11
    # (about 1,000 levels): `loads` gives values up to orjson's 1,024 levels (an upstream's tool
    # call, say, which the jobs API writes back). The limit is raised for this one write only;
    # the writer's own C stack takes that depth with room to spare.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _DEEPEST_READ)
    try:
        return _json_dumps(value)
    finally:
        sys.setrecursionlimit(limit)


def _json_dumps(value: Any) -> bytes:
    try:
        return _json_module_dumps(value)
    except ValueError:
        # A non-finite float (json.loads reads NaN and Infinity), which the json module would
        # write as NaN or Infinity, no JSON at all: null, as orjson writes it.
        return _json_module_dumps(_finite(value))


def _json_module_dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_decoded,
                          allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone UTF-16 surrogate (an upstream's answer may escape one): UTF-8 cannot carry
        # it, JSON's escape can, as the upstream wrote it.
        return json.dumps(value, separators=(",", ":"), default=_decoded, allow_nan=False).encode("ascii")


def _finite(value: Any) -> Any:
    """A copy of `value` with None for its non-finite floats; walked with a stack of its own,
    not recursion, as it may be nested past the recursion limit (see `dumps`). A container met
    twice is copied once: a circular value stays circular, for the json module to refuse."""
    top = [value]
    todo: list[tuple[Any, Any]] = [(top, 0)]
    copies: dict[int, Any] = {}
    while todo:
        container, key = todo.pop()
        item = container[key]
        if isinstance(item, float) and not math.isfinite(item):
            container[key] = None
        elif isinstance(item, (dict, list, tuple)):
            copy = copies.get(id(item))
            if copy is None:
                copy = copies[id(item)] = dict(item) if isinstance(item, dict) else list(item)
                todo.extend((copy, k) for k in (copy if isinstance(copy, dict) else range(len(copy))))
            container[key] = copy
    return top[0]


def _fragment(value: Any) -> orjson.Fragment:
    """JSON text (records.RawJSON) as orjson writes it: as it is."""
    if type(value) is RawJSON:
        return orjson.Fragment(value.text)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _decoded(value: Any) -> Any:
    """JSON text (records.RawJSON) for the json module, which cannot write it as it is."""
    if type(value) is RawJSON:
        return json.loads(value.text)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse, rendered by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


class JSONAnswer(Response):
    """A call's 200 answer: JSON already written (the upstream's own bytes, or `dumps`'s) and the
    call's own headers. Its headers are made here as Starlette's `init_headers` makes them for a
    JSONResponse (content-length, then content-type), without walking a header mapping."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json"), *headers]
