"""Background housekeeping: call outcomes the store refused earlier are written, jobs left
open too long are failed (releasing their credit holds), and calls left 'running' by a
process that died are closed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Awaitable, Callable, Sequence

from .metrics import Metrics
from .store import FailedThenRefused, Job, Store

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
    steps: Sequence[tuple[float, float]] = (),
    stop: asyncio.Event | None = None,
) -> tuple[int, int]:
    """Returns (jobs expired, calls closed). Outcomes this process could not write before go
    first: their calls are still 'running', and must not be closed as interrupted. `steps`:
    the wall clock's steps forward (see `Store.cancel_stale_calls`). `stop`, once set, ends the
    run after the batch of jobs under way (see `_fail_in_batches`)."""
    closed = 0
    if record_kept is not None and await record_kept():
        log.warning("sweeper: calls still wait for their records to be written; none is closed as interrupted")
    else:
        interrupted = await store.cancel_stale_calls(now - stale_call_after, now, steps)
        closed = len(interrupted)
        if metrics is not None:
            for call in interrupted:
                metrics.observe_interrupted_call(call.team_id, call.model_group, call.streamed)
    # Every pass, not only one that closed calls: another process's sweeper may have closed them.
    # All of them, as all expired jobs: a process that died serving thousands of /v1 calls left
    # as many jobs holding credits, which one batch a pass released only over as many intervals.
    await _fail_in_batches(store.fail_interrupted_implicit_jobs, metrics, stop)
    expired = await _fail_in_batches(lambda limit: store.expire_jobs(now - expire_after, limit), metrics, stop)
    if expired or closed:
        log.info("sweeper: %d expired jobs failed, %d interrupted calls closed", expired, closed)
    return expired, closed


async def _fail_in_batches(
    fail: Callable[[int], Awaitable[list[Job]]], metrics: Metrics | None, stop: asyncio.Event | None = None
) -> int:
    """Fail jobs BATCH at a time until a batch fails none, or a stop is asked; how many failed.
    Each batch closes its jobs, so the next finds others. A batch short of BATCH is no end:
    another process sweeping at the same moment (the workers of `serve --workers N` start
    together) takes jobs of each batch, and both runs stopped after their first, the jobs left
    holding their credits for more intervals. A stop ends the run between two batches: a start
    after a long outage may find thousands of expired jobs (seconds of batches), and a run still
    going when the drain's time was up was cancelled half-way, the jobs of its batch failed and
    never counted. The jobs left are the next sweep's, in any process."""
    failed = 0
    while True:
        try:
            batch = await fail(BATCH)
        except FailedThenRefused as cut:
            _observe_failed(cut.jobs, metrics)  # failed for good, though the store refused the rest
            raise cut.error from None
        failed += len(batch)
        _observe_failed(batch, metrics)
        if not batch or (stop is not None and stop.is_set()):
            return failed


def _observe_failed(jobs: list[Job], metrics: Metrics | None) -> None:
    if metrics is not None:
        # A batch holds jobs of many teams, often many of one (a dead process's /v1 calls):
        # each team's series is counted up once.
        for team_id, count in Counter(job.team_id for job in jobs).items():
            metrics.observe_jobs(team_id, "failed", count)


async def sweep_forever(
    store: Store,
    expire_after: float,
    stale_call_after: float,
    interval: float,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    record_kept: RecordKept | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Sweep every `interval` until `stop` is set: between two runs, so that a stop never cuts
    one short (a run cancelled half-way had failed jobs and closed calls it never counted)."""
    # A call's bound (`stale_at`) is wall time, set as it started, though it stands for the
    # loop's: a call runs no longer than its deadline on the loop's clock. A step of the wall
    # clock forward (an NTP correction, a VM resumed) made live calls look that much older, and
    # every process's sweeper closed them as interrupted. So the wall clock's lead over the
    # loop's is followed, and each step forward is kept for as long as a call started before it
    # may run: `expire_after`, or this process's own bound if it is longer (jobs may expire
    # sooner than calls end, and a step forgotten then closed live calls): a call started
    # before it, by this process or another with bounds of its own, is judged that much
    # earlier. A step back is not: calls left by a dead process are closed that much later.
    loop = asyncio.get_running_loop()
    failure: str | None = None  # the last run's, whose traceback is logged once however often it repeats
    lead: float | None = None
    steps: list[tuple[float, float, float]] = []  # (loop time seen, calls started before, seconds)
    remembered = max(expire_after, stale_call_after)
    while True:
        try:
            now, at = clock(), loop.time()
            if lead is not None and now - at - lead > CLOCK_STEP:
                size = now - at - lead
                steps.append((at, now - size, size))  # a call started before now - size began before it
            lead = now - at
            steps = [step for step in steps if step[0] > at - remembered]
            await sweep_once(store, expire_after, stale_call_after, now, metrics, record_kept,
                             [(before, size) for _, before, size in steps], stop)
        except Exception as exc:
            seen = f"{type(exc).__name__}: {exc}"
            if seen == failure:
                log.warning("sweeper run failed again (%s); trying again in %.0f s", seen, interval)
            else:
                log.exception("sweeper run failed; trying again in %.0f s", interval)
            failure = seen
        else:
            failure = None
        if stop is None:
            await asyncio.sleep(interval)
        elif await _told_to_stop(stop, interval):
            return


async def _told_to_stop(stop: asyncio.Event, interval: float) -> bool:
    """Wait up to `interval` for `stop`; whether it came."""
    try:
        await asyncio.wait_for(stop.wait(), interval)
    except TimeoutError:
        return False
    return True
