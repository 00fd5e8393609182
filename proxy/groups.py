"""Model groups by name, cached briefly (see cache.py)."""

from __future__ import annotations

import time
from typing import Callable

from .cache import ExpiringCache
from .store import ModelGroup, Store


class GroupCatalog(ExpiringCache[str, ModelGroup | None]):
    def __init__(self, store: Store, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(store.get_model_group, ttl, clock)
