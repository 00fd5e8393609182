"""Reading requests: their headers, and their bodies with size limits, content type and
strict JSON.

Python's json module accepts NaN, Infinity, numbers too large for a float (1e999)
and lone UTF-16 surrogates; none of them can be stored or forwarded as valid
JSON, so they are refused here with a 400.
"""

from __future__ import annotations

import gc
import json
import math
import re
from typing import Any

from starlette.requests import Request

from .errors import ApiError, ClientClosed
from .json_codec import UNSURE, orjson_loads

# A \uD800-\uDFFF escape: only then can a decoded string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

# Arrays and objects nested deeper than this are refused. What a body carries is written again
# (a job's metadata into the store, a call's parameters to the upstream) and read back later,
# and the writers give up long before the reader: orjson at 255 levels, the json module near a
# thousand (a RecursionError). A value read but not writable would fail its request with a 500
# or, stored, make its job unreadable. No chat request comes near this depth.
MAX_DEPTH = 100
# A body larger than this is read with the garbage collector paused. A body of a few MiB can be
# millions of small arrays (`[[],[],...]`, three bytes each), each a new object the collector
# tracks: collections that ran as they were made held the event loop, every request of every
# team waiting, six times as long as reading them (seconds for a 10 MiB body). Nothing made
# while reading a body can be a cycle; the collector's next run, after, sees each object once.
PAUSE_GC_ABOVE = 64 * 1024


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 would come back as Infinity, which JSON cannot carry
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def header(request: Request, name: bytes) -> str | None:
    """The first value of the header `name` (lower case, as ASGI gives names), as Starlette's
    `request.headers.get()` finds it, without the mapping built and the name encoded on the
    way: every call reads three. Under `tollgate serve` a repeated Authorization, Host or
    Content-Length never gets here: the protocol refuses the request (server.py)."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _list_header(request: Request, name: bytes) -> str | None:
    """Every field line of the list header `name`, combined as RFC 9110 (5.3) has a recipient
    combine them (`identity` then `gzip` is `identity, gzip`); None without any."""
    values = [value for key, value in request.scope["headers"] if key == name]
    return b", ".join(values).decode("latin-1") if values else None


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    content_type = header(request, b"content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(415, f"Content-Type must be application/json, not '{media[:100]}'")
    encoding = _list_header(request, b"content-encoding")
    if encoding is not None and any(coding.strip().lower() != "identity" for coding in encoding.split(",")):
        # Read as it is, a compressed body would be refused as bad JSON, and a plain one
        # labelled compressed accepted: neither says what is wrong.
        raise ApiError(415, f"Content-Encoding '{encoding[:100]}' is not supported; send the body uncompressed")
    length = header(request, b"content-length")
    if length is not None:
        # ASCII digits only, and not too many: str.isdigit() also takes '²', and int() refuses
        # both that and more than 4,300 digits (uvicorn's parsers refuse such a header first;
        # another ASGI server may not).
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, "Content-Length must be a number")
        digits = length.lstrip("0")
        if len(digits) > 18 or int(digits or "0") > max_bytes:
            raise ApiError(413, f"Request body is larger than {max_bytes} bytes")
    else:
        # A chunked body (the parser refuses one with both headers). The parser undoes `chunked`
        # alone: a coding before it (`gzip, chunked`) would be read as it is, as a body with
        # Content-Encoding would.
        transfer = header(request, b"transfer-encoding")
        if transfer is not None and transfer.lower().replace(" ", "").replace("\t", "") != "chunked":
            raise ApiError(415, f"Transfer-Encoding '{transfer[:100]}' is not supported; send the body chunked alone")
    chunks = []
    size = 0
    # The ASGI messages themselves: Request.stream() wraps the same loop in an async generator.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientClosed()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"Request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return parse_json_object(b"".join(chunks))


def parse_json_object(body: bytes) -> dict[str, Any]:
    if len(body) > PAUSE_GC_ABOVE and gc.isenabled():
        gc.disable()
        try:
            return _parse_json_object(body)
        finally:
            gc.enable()
    return _parse_json_object(body)


def _parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "Request body is empty; expected a JSON object")
    value = orjson_loads(body)
    if value is UNSURE:  # what orjson refuses or would read differently
        value = _parse_strictly(body)
    if not isinstance(value, dict):
        raise ApiError(422, "Request body must be a JSON object")
    # A body with fewer brackets than the limit cannot be nested that deep: only one that
    # has more (brackets in strings included) is walked.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _nested_deeper_than(value, MAX_DEPTH):
        raise ApiError(400, f"Malformed JSON: nested too deeply (more than {MAX_DEPTH} levels)")
    return value


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` holds arrays or objects more than `limit` levels deep. Level by level,
    with nothing made per array or object but its place in the next level's list: a wide body
    (millions of small arrays) is walked in about the time it took to read, where a stack of
    (item, depth) pairs took ten times as long."""
    level = [value]
    for _ in range(limit):
        below: list[Any] = []
        keep = below.append
        for item in level:
            for child in item.values() if type(item) is dict else item:
                if type(child) is dict or type(child) is list:
                    keep(child)
        if not below:
            return False
        level = below
    return True


def _parse_strictly(body: bytes) -> Any:
    """The json module's value of `body`, or a 400 for what JSON does not allow but it would take."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, _WIDE if _is_wide(body) else "Request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "Malformed JSON: nested too deeply") from None
    except ValueError as exc:
        # UTF-16 of ASCII text is valid UTF-8 (every other byte a NUL): json.loads's own error
        # ("Expecting property name enclosed in double quotes") did not say what was wrong.
        raise ApiError(400, _WIDE if _is_wide(body) else f"Malformed JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ApiError(400, "Malformed JSON: a string contains a lone UTF-16 surrogate")
    return value


_WIDE = "Request body is UTF-16 or UTF-32; send JSON as UTF-8"


def _is_wide(body: bytes) -> bool:
    """Whether the body reads as UTF-16 or UTF-32: a byte order mark of theirs, or a NUL among
    the first four bytes, which no UTF-8 JSON text has (RFC 4627's own test of its encoding)."""
    return body.startswith((b"\xff\xfe", b"\xfe\xff")) or body.find(b"\x00", 0, 4) >= 0


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
