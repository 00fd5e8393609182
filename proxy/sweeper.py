"""Background housekeeping: call outcomes the store refused earlier are written, jobs left
open too long are failed (releasing their credit holds), and calls left 'running' by a
process that died are closed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .metrics import Metrics
from .store import Store

log = logging.getLogger("tollgate.sweeper")
BATCH = 500


RecordKept = Callable[[], Awaitable[int]]  # writes the outcomes kept; returns how many are left


async def sweep_once(
    store: Store,
    expire_after: float,
    stale_call_after: float,
    now: float,
    metrics: Metrics | None = None,
    record_kept: RecordKept | None = None,
) -> tuple[int, int]:
    """Returns (jobs expired, calls closed). Outcomes this process could not write before go
    first: their calls are still 'running', and must not be closed as interrupted."""
    closed = 0
    if record_kept is not None and await record_kept():
        log.warning("sweeper: calls still wait for their records to be written; none is closed as interrupted")
    else:
        closed = await store.cancel_stale_calls(now - stale_call_after, now)
    # Every pass, not only one that closed calls: another process's sweeper may have closed them.
    for job in await store.fail_interrupted_implicit_jobs(BATCH):
        if metrics is not None:
            metrics.observe_job(job.team_id, "failed")
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
    record_kept: RecordKept | None = None,
) -> None:
    while True:
        try:
            await sweep_once(store, expire_after, stale_call_after, clock(), metrics, record_kept)
        except Exception:
            log.exception("sweeper run failed; trying again in %.0f s", interval)
        await asyncio.sleep(interval)
