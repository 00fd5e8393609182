"""Background housekeeping: call outcomes the store refused earlier are written, jobs left
open too long are failed (releasing their credit holds), and calls left 'running' by a
process that died are closed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable

from .metrics import Metrics
from .store import Store

log = logging.getLogger("tollgate.sweeper")
BATCH = 500
# A move of the wall clock against the loop's smaller than this is no step (the two are read one
# after the other); the stale-call margin covers it.
CLOCK_STEP = 1.0


RecordKept = Callable[[], Awaitable[int]]  # writes the outcomes kept; returns how many are left


async def sweep_once(
    store: Store,
    expire_after: float,
    stale_call_after: float,
    now: float,
    metrics: Metrics | None = None,
    record_kept: RecordKept | None = None,
    stepped: float = 0.0,
) -> tuple[int, int]:
    """Returns (jobs expired, calls closed). Outcomes this process could not write before go
    first: their calls are still 'running', and must not be closed as interrupted. `stepped`:
    how far the wall clock stepped forward while calls still running may have started."""
    closed = 0
    if record_kept is not None and await record_kept():
        log.warning("sweeper: calls still wait for their records to be written; none is closed as interrupted")
    else:
        closed = await store.cancel_stale_calls(now - stepped - stale_call_after, now - stepped)
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
    # A call's bound (`stale_at`) is wall time, set as it started, though it stands for the
    # loop's: a call runs no longer than its deadline on the loop's clock. A step of the wall
    # clock forward (an NTP correction, a VM resumed) made live calls look that much older, and
    # every process's sweeper closed them as interrupted. So the wall clock's lead over the
    # loop's is followed, and while a call may still run that started when the lead was
    # smaller (less than `stale_call_after` ago), the difference is taken off. A step back is
    # not: calls left by a dead process are closed that much later.
    loop = asyncio.get_running_loop()
    leads: deque[tuple[float, float]] = deque()  # (loop time, lead) where the lead moved, oldest first
    while True:
        try:
            now, at = clock(), loop.time()
            lead = now - at
            if not leads or abs(lead - leads[-1][1]) > CLOCK_STEP:
                leads.append((at, lead))
            while len(leads) > 1 and leads[1][0] <= at - stale_call_after:
                leads.popleft()  # every call started at the oldest lead is past its bound
            stepped = max(0.0, lead - min(earlier for _, earlier in leads))
            await sweep_once(store, expire_after, stale_call_after, now, metrics, record_kept, stepped)
        except Exception:
            log.exception("sweeper run failed; trying again in %.0f s", interval)
        await asyncio.sleep(interval)
