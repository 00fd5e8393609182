"""Model groups by name, cached (see cache.py)."""

from __future__ import annotations

import time
from typing import Callable

from .cache import ExpiringCache
from .changes import ChangeSignal
from .config import GROUP_NAME
from .store import ModelGroup, Store


class GroupCatalog(ExpiringCache[str, ModelGroup | None]):
    def __init__(
        self, store: Store, changes: ChangeSignal, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(store.get_model_group, ttl, changes, clock)

    async def get(self, key: str) -> ModelGroup | None:
        # A name no group can have (GET /v1/models/{model} takes any, up to a 64 KiB head) is
        # neither read nor kept: kept, 10,000 of them could hold hundreds of megabytes.
        if GROUP_NAME.match(key) is None:
            return None
        return await super().get(key)
