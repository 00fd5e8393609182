"""What a model costs per token, when LiteLLM does not say it with the answer.

Prices written in `config.yaml` win; otherwise the prices LiteLLM reports in
its `/model/info`, fetched at start-up and refreshed periodically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .config import ModelPrice, finite_number, is_price
from .upstream import Upstream, UpstreamStatusError

log = logging.getLogger("tollgate.pricing")

# While prices cannot be read (an upstream without /model/info, say), they are asked for every
# 5 s: the warning is said again only this often, not every 5 s for as long as it lasts.
WARN_AGAIN_AFTER = 300.0
# The longest one read of LiteLLM's prices may take, its answer included (a start waits that long).
MODEL_INFO_TIMEOUT = 10.0


def _price(value: Any) -> float | None:
    """A price per token as config.yaml's `pricing` takes one (a number, not a boolean, that
    `is_price`), else None."""
    try:
        price = finite_number(value)
    except ValueError:
        return None
    return price if is_price(price) else None


class Pricing:
    def __init__(self, configured: dict[str, ModelPrice]) -> None:
        self._configured = dict(configured)
        self._reported: dict[str, ModelPrice] = {}
        self._warned_at: float | None = None  # monotonic; None while the last refresh succeeded

    def price(self, model: str) -> ModelPrice | None:
        return self._configured.get(model) or self._reported.get(model)

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> float | None:
        price = self.price(model) if model else None
        if price is None:
            return None
        return prompt_tokens * price.input_cost_per_token + completion_tokens * price.output_cost_per_token

    def load_model_info(self, payload: Any) -> int:
        """Read LiteLLM's `/model/info` answer; return how many priced models it named."""
        prices: dict[str, ModelPrice] = {}
        for entry in (payload or {}).get("data", []) if isinstance(payload, dict) else []:
            if not isinstance(entry, dict):
                continue
            name = entry.get("model_name")
            info = entry.get("model_info") or {}
            # Only what config.yaml's `pricing` would take: a negative price made a negative cost,
            # which the cost counter refuses after the call is recorded (a 500 for an answered call).
            given_in, given_out = _price(info.get("input_cost_per_token")), _price(info.get("output_cost_per_token"))
            if isinstance(name, str) and given_in is not None and given_out is not None:
                prices[name] = ModelPrice(given_in, given_out)
        self._reported = prices
        return len(prices)

    async def refresh(self, upstream: Upstream) -> bool:
        try:
            self.load_model_info(await upstream.get_json("/model/info", timeout=MODEL_INFO_TIMEOUT))
        except Exception as exc:  # prices are a fallback: never fail a request over them
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= WARN_AGAIN_AFTER:
                self._warned_at = now
                # The class alone (an error's text may quote what LiteLLM said, keys included), but
                # the status of a refusal, which says what to fix (401: the key; 404: not a LiteLLM).
                detail = f" ({exc})" if isinstance(exc, UpstreamStatusError) else ""
                log.warning("could not read model prices from LiteLLM: %s%s", type(exc).__name__, detail)
            return False
        if self._warned_at is not None:
            self._warned_at = None
            log.info("model prices read from LiteLLM again")
        return True

    async def keep_fresh(self, upstream: Upstream, interval: float, fresh: bool | None = None) -> None:
        """Refresh the prices every `interval`; `fresh`: how a refresh made just before went
        (the one at start-up), None if none was."""
        while True:
            if fresh is None:
                fresh = await self.refresh(upstream)
            # LiteLLM may still be starting: ask again soon rather than a whole interval later.
            await asyncio.sleep(interval if fresh else min(interval, 5.0))
            fresh = None
