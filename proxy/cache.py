"""Store lookups reused for a short time: fast on the hot path. A change made in any process
sharing the database is seen at once through its change signal (changes.py), and within `ttl`
seconds should the signal fail."""

from __future__ import annotations

import time
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

from .changes import ChangeSignal

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        ttl: float,
        changes: ChangeSignal,
        clock: Callable[[], float] = time.monotonic,
        limit: int = 10_000,
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._changes = changes
        self._clock = clock
        self._limit = limit  # full means cleared whole: random keys cannot grow it without end
        self._entries: dict[K, tuple[float, V]] = {}
        self._stamp = changes.stamp()  # the change stamp the entries were read under

    def fresh(self, key: K) -> tuple[float, V] | None:
        """The entry kept for `key`, (expires at, value), when `get` would answer with its value
        without loading; else None, and `get` is to be awaited. For the hot path, where the
        value is nearly always kept: a coroutine made and awaited for it costs more than this."""
        if self._changes.stamp() != self._stamp:
            return None
        entry = self._entries.get(key)
        return entry if entry is not None and entry[0] > self._clock() else None

    async def get(self, key: K) -> V:
        now = self._clock()
        stamp = self._changes.stamp()
        if stamp != self._stamp:
            self._entries.clear()
            self._stamp = stamp
        else:
            cached = self._entries.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
        value = await self._load(key)
        if self._changes.stamp() != stamp:
            return value  # read before a change that came while it was read: not kept
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = (now + self._ttl, value)
        return value
