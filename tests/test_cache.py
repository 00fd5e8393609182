"""Store lookups reused for a short time (proxy/cache.py), and forgotten when told."""

from __future__ import annotations

import asyncio

from proxy.cache import ExpiringCache


class Loads:
    """A store lookup that counts its calls; `gate` holds a lookup in flight."""

    def __init__(self) -> None:
        self.count = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, key: str) -> str:
        self.count += 1
        value = f"{key} as read {self.count}"
        await self.gate.wait()
        return value


def test_a_lookup_is_reused_until_invalidated():
    async def run() -> tuple[str, str, str, int]:
        loads = Loads()
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=60)
        first, again = await cache.get("k"), await cache.get("k")
        cache.invalidate()
        return first, again, await cache.get("k"), loads.count

    assert asyncio.run(run()) == ("k as read 1", "k as read 1", "k as read 2", 2)


def test_a_lookup_in_flight_when_the_cache_is_invalidated_is_not_kept():
    # A key revoked while a request was reading it: that request may use what it read, but no
    # later one may find the old entry in the cache.
    async def run() -> tuple[str, str, int]:
        loads = Loads()
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=60)
        loads.gate.clear()
        in_flight = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        cache.invalidate()
        loads.gate.set()
        old = await in_flight
        return old, await cache.get("k"), loads.count

    assert asyncio.run(run()) == ("k as read 1", "k as read 2", 2)
