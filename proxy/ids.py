"""Ids of jobs and calls: time-ordered UUIDs, and the canonical form of one a client sent.

Both are on every call's path; uuid.UUID builds and checks an object where a string
is all that is needed, at several times the cost (bench/inproc.py).
"""

from __future__ import annotations

import os
import re
import time

_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The other ways a UUID is written: any case, with or without its hyphens (all or none), in
# braces or after `urn:uuid:`. Not uuid.UUID(), which also reads what is no UUID at all: hyphens
# anywhere, braces and prefixes repeated, and whatever int() takes for 32 hex digits (a space
# or an underscore among them, other scripts' digits), some of it as another job's id.
_OTHER_FORMS = re.compile(
    r"(?:urn:uuid:)?(\{)?(?P<hex>[0-9a-f]{8}(-?)[0-9a-f]{4}\3[0-9a-f]{4}\3[0-9a-f]{4}\3[0-9a-f]{12})(?(1)\})",
    re.IGNORECASE | re.ASCII,
)


def new_id() -> str:
    """A version 7 UUID (RFC 9562) in its canonical text form: the Unix time in milliseconds,
    then 74 random bits. Ids made one after another sort one after another, so a new job's or
    call's entry in each index keyed by its id goes where the last one went, on a page already
    in the cache and about to be written anyway, not on a random page of an index that grows
    with every call ever made."""
    # As one 128-bit integer: the 48 bits of time, then the random ones, with the version and
    # variant bits set over the random ones (as setting them in its bytes did, in fewer steps).
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    h = "%032x" % (value & _VERSION_VARIANT_CLEARED | _VERSION_VARIANT)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_VERSION_VARIANT = 0x7 << 76 | 0x2 << 62  # version 7; the RFC 4122 variant
_VERSION_VARIANT_CLEARED = ~(0xF << 76 | 0x3 << 62)


def canonical_uuid(text: str) -> str | None:
    """`text` as a canonical (lower-case, hyphenated) UUID; None if it is not a UUID."""
    if _CANONICAL.fullmatch(text):
        return text
    match = _OTHER_FORMS.fullmatch(text)
    if match is None:
        return None
    h = match["hex"].replace("-", "").lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
