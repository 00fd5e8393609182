"""Who is calling: virtual keys for /api and /v1, the master key for /admin.

Only a key's SHA-256 is stored. Lookups are cached for at most `auth.cache_ttl`
(≤ 1 s) and dropped at once when any process sharing the database changes a key
or a team (changes.py): a revoked key stops working at once everywhere.
Keys never appear in messages or logs: every refusal reads the same.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from .cache import ExpiringCache
from .changes import ChangeSignal
from .config import Secret
from .errors import ApiError
from .records import Team, VirtualKey
from .store import Store

KEY_PREFIX = "sk-"
INVALID_KEY = "Invalid, expired or revoked API key"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise ApiError(
            401, "Missing Authorization header; send 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "Malformed Authorization header; expected 'Bearer <key>'", code="invalid_api_key")
    return token


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Principal:
    """An authenticated caller: the key used and its team, as of the lookup."""

    key: VirtualKey
    team: Team
    stamp: bytes | bytearray = b""  # the change stamp (changes.py) read before the lookup
    # When the lookup stops standing without a change signalled: `auth.cache_ttl` after it
    # began, the bound on how late a change is seen should the signal never come.
    stands_until: float = math.inf


class KeyAuthenticator:
    def __init__(
        self,
        store: Store,
        cache_ttl: float,
        changes: ChangeSignal,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._changes = changes
        self._ttl = cache_ttl
        self._clock = clock
        self._wall_clock = wall_clock
        self._principals: ExpiringCache[bytes, Principal | None] = ExpiringCache(
            self._lookup, cache_ttl, changes, clock
        )

    async def _lookup(self, key_hash: bytes) -> Principal | None:
        stamp = self._changes.stamp()
        until = self._clock() + self._ttl
        found = await self._store.lookup_key(key_hash)
        return Principal(*found, stamp, until) if found else None

    async def authenticate(self, authorization: str | None) -> Principal:
        key_hash = hash_key(bearer_token(authorization))
        kept = self._principals.fresh(key_hash)
        principal = kept[1] if kept is not None else await self._principals.get(key_hash)
        if principal is None:
            raise ApiError(401, INVALID_KEY, code="invalid_api_key")
        key = principal.key
        if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= self._wall_clock()):
            raise ApiError(401, INVALID_KEY, code="invalid_api_key")
        return principal

    def unchanged(self, principal: Principal) -> bool:
        """Whether `principal`, authenticated as a request's head arrived, still stands once its
        body has: a body may take up to server.read_timeout, and a key revoked, a team suspended
        or a group taken away meanwhile must not start a call or a job. False when anything
        changed since it was read (a compare of the stamp), it was read longer than
        `auth.cache_ttl` ago (a change whose signal never came, its file unusable or its process
        dead before its stamp, is seen within that, as by the cache), or its key has expired
        since: the caller authenticates again. Not a coroutine: it is on every call's path."""
        expires = principal.key.expires_at
        return (
            self._changes.stamp() == principal.stamp
            and principal.stands_until > self._clock()
            and (expires is None or expires > self._wall_clock())
        )


class MasterKeyGuard:
    """Admin routes: the master key, compared in constant time; no key configured, no admin."""

    def __init__(self, master_key: Secret | None) -> None:
        self._digest = hashlib.sha256(master_key.value.encode()).digest() if master_key else None

    def check(self, authorization: str | None) -> None:
        if self._digest is None:
            raise ApiError(401, "The admin API is disabled: TOLLGATE_MASTER_KEY is not set", code="admin_disabled")
        given = hashlib.sha256(bearer_token(authorization).encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(given, self._digest):
            raise ApiError(401, "Invalid master key", code="invalid_api_key")
