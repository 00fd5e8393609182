"""Store lookups reused for a short time: fast on the hot path, yet a change made in
any process is seen everywhere within `ttl` seconds (at once after `invalidate`)."""

from __future__ import annotations

import time
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        limit: int = 10_000,
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._clock = clock
        self._limit = limit  # full means cleared whole: random keys cannot grow it without end
        self._entries: dict[K, tuple[float, V]] = {}
        self._generation = 0  # how many times it was invalidated

    async def get(self, key: K) -> V:
        now = self._clock()
        cached = self._entries.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        generation = self._generation
        value = await self._load(key)
        if generation != self._generation:
            return value  # read before an invalidation that came while it was read: not kept
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = (now + self._ttl, value)
        return value

    def invalidate(self) -> None:
        self._entries.clear()
        self._generation += 1
