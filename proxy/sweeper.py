"""Background housekeeping: jobs left open too long are failed (releasing their
credit holds), and calls left 'running' by a process that died are closed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .metrics import Metrics
from .store import Store

log = logging.getLogger("tollgate.sweeper")
BATCH = 500


async def sweep_once(
    store: Store, expire_after: float, stale_call_after: float, now: float, metrics: Metrics | None = None
) -> tuple[int, int]:
    """Returns (jobs expired, calls closed)."""
    closed = await store.cancel_stale_calls(now - stale_call_after)
    expired = 0
    while True:
        batch = await store.expire_jobs(now - expire_after, BATCH)
        expired += len(batch)
        for job in batch:
            if metrics is not None:
                metrics.observe_job(job.team_id, "failed")
        if len(batch) < BATCH:
            break
    if expired or closed:
        log.info("sweeper: %d expired jobs failed, %d interrupted calls closed", expired, closed)
    return expired, closed


async def sweep_forever(
    store: Store,
    expire_after: float,
    stale_call_after: float,
    interval: float,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    while True:
        try:
            await sweep_once(store, expire_after, stale_call_after, clock(), metrics)
        except Exception:
            log.exception("sweeper run failed; trying again in %.0f s", interval)
        await asyncio.sleep(interval)
