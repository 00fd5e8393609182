"""Model groups by name, cached (see cache.py)."""

from __future__ import annotations

import time
from typing import Callable

from .cache import ExpiringCache
from .changes import ChangeSignal
from .store import ModelGroup, Store


class GroupCatalog(ExpiringCache[str, ModelGroup | None]):
    def __init__(
        self, store: Store, changes: ChangeSignal, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(store.get_model_group, ttl, changes, clock)
