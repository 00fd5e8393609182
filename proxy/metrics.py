"""Prometheus metrics: what Tollgate measures, and how /metrics renders it.

In one process the values are kept by `instruments.py` (a dict update per observation).
With several worker processes (`tollgate serve --workers N`) prometheus-client's
multiprocess mode is used: `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start, each worker writes its values there, and a
scrape (answered by any worker) adds them up. The live-streams gauge sums live
processes only: a scrape first drops the gauge files of workers that died without
saying so (a kill -9 mid-stream). A family no process has a sample of yet is named
all the same, as one process names it. Team balances are read from the store at
scrape time, so they are right whichever worker answers.

A scrape is rendered in a thread of its own: a fleet of 10,000 teams comes to megabytes of
text and seconds of work, which on the event loop held every request in flight that long
once per scrape interval. Only the copy of the values is made on the loop.

Labels never hold ids, keys or free text: `route` is the route template, and
`metrics.team_label: false` drops the team label for large fleets.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import math
import os
import time
from typing import Any, Awaitable, Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from . import instruments
from .instruments import Counting, Observing, LocalInstrument
from .occasional import Occasional
from .store import StoreError

log = logging.getLogger("tollgate.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From under a millisecond (most answers but the calls') up to the default upstream.timeouts.total:
# a call may last that long, and its first token come that late (after the models tried before);
# a longer total configured is added as the last bound. Close together (at most half again apart)
# from about a second to two minutes, where LLM calls and first tokens lie: with 2.5, 5 and 10 s
# as neighbours, a steady 2 s time to first token read as 4.8 s at the 95th percentile.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30,
    45, 60, 90, 120, 300, 600,
)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600)
# The methods a request is counted under by name; any other (the parser knows dozens) is 'unknown'.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# Teams and groups come and go: the label values kept for them are let go past this many pairs.
MAX_CACHED_LABELS = 10_000


class _CallLabels(NamedTuple):
    """A team and group's label values, as `observe_call` counts under them."""

    team_group: tuple[str, ...]  # the team (unless metrics.team_label is off) and the group
    prompt: tuple[str, ...]  # the tokens counter's, for prompt tokens
    completion: tuple[str, ...]
    group: tuple[str, ...]  # the group alone


class MetricsUnavailable(Exception):
    """What the workers count cannot be read: their shared directory is gone."""


def _gone(directory: str) -> str:
    return (
        f"the workers' metrics directory {directory} is gone (removed while serve runs): what they count "
        "is lost until serve is restarted"
    )


def check_directory(directory: str) -> None:
    """Raise MetricsUnavailable if the workers' metrics directory is gone: a worker starting then
    can make none of its files there."""
    if not os.path.isdir(directory):
        raise MetricsUnavailable(_gone(directory))


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


_Instrument = TypeVar("_Instrument", Counting, Observing)


class Metrics:
    def __init__(self, team_label: bool = True, credits_ttl: float = 5.0, longest_call: float = 600.0) -> None:
        """`longest_call`: upstream.timeouts.total, the longest a call may last: the duration
        buckets reach it, so that no call's time is read as a smaller bound's."""
        self.team_label = team_label
        self._credits_ttl = credits_ttl
        # When the balances were read (never yet: time.monotonic() counts from boot, so 0 would
        # read as just now on a machine up for less than `credits_ttl`), and what they were.
        self._credits: tuple[float, list[tuple[str, int]]] = (-math.inf, [])
        self._rendering: asyncio.Future[bytes] | None = None  # the scrape being rendered, if any
        self._gone_log = Occasional(log, logging.ERROR)  # the workers' directory's, by a count or a scrape
        self.registry = CollectorRegistry(auto_describe=True)
        team = ("team",) if team_label else ()
        registry, shared = self.registry, multiprocess_enabled()
        self._local: list[LocalInstrument] = []  # in the order they render, unless shared

        def kept(made: _Instrument) -> _Instrument:
            if isinstance(made, LocalInstrument):
                self._local.append(made)
            return made

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counting:
            return kept(instruments.counter(name, doc, labels, registry, shared, self._uncounted))

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Observing:
            return kept(instruments.histogram(name, doc, labels, buckets, registry, shared, self._uncounted))

        reaching = (longest_call,) if longest_call > LATENCY_BUCKETS[-1] else ()
        latency, ttft = LATENCY_BUCKETS + reaching, TTFT_BUCKETS + reaching
        self._requests = counter("tollgate_requests_total", "HTTP requests answered", ("route", "method", "status"))
        self._request_duration = histogram(
            "tollgate_request_duration_seconds", "Time to answer an HTTP request (streams: to their end)",
            ("route",), latency,
        )
        self._llm_calls = counter(
            "tollgate_llm_calls_total", "LLM calls by how they ended", (*team, "model_group", "model", "status", "stream")
        )
        self._tokens = counter("tollgate_tokens_total", "Tokens used by LLM calls", (*team, "model_group", "type"))
        self._cost = counter("tollgate_cost_usd_total", "Cost of LLM calls in USD", (*team, "model_group"))
        self._upstream_latency = histogram(
            "tollgate_upstream_latency_seconds", "LLM call duration, fallbacks included", ("model_group",), latency
        )
        self._ttft = histogram(
            "tollgate_time_to_first_token_seconds", "Time to a stream's first event", ("model_group",), ttft
        )
        self._rate_limited = counter("tollgate_rate_limited_total", "Calls refused by rate limits", (*team, "limit"))
        self._fallbacks = counter(
            "tollgate_fallbacks_total", "Models tried after a group's first failed", ("model_group",)
        )
        self._jobs = counter("tollgate_jobs_total", "Jobs created and finished", (*team, "status"))
        self._call_label_cache: dict[tuple[str, str], _CallLabels] = {}
        self.active_streams = Gauge(
            "tollgate_active_streams", "Streams being relayed now", registry=self.registry,
            multiprocess_mode="livesum",
        )
        # The families one process's scrape names, samples or not, in its order.
        self._families = [(m.name, m.documentation, m.type) for m in self.registry.collect()]

    def _uncounted(self, error: OSError) -> None:
        directory = os.environ.get(MULTIPROC_ENV, "")
        why = f"the workers' metrics directory {directory} refuses a file" if os.path.isdir(directory) else _gone(directory)
        self._gone_log("%s: a value went uncounted (%s)", why, error)

    def _team(self, team_id: str) -> tuple[str, ...]:
        return (team_id,) if self.team_label else ()

    def _call_labels(self, team_id: str, group: str) -> _CallLabels:
        """The label values a call of this team and group is counted under, made once for each
        pair rather than for every call."""
        labels = self._call_label_cache.get((team_id, group))
        if labels is None:
            base = (*self._team(team_id), group)
            labels = _CallLabels(base, (*base, "prompt"), (*base, "completion"), (group,))
            if len(self._call_label_cache) >= MAX_CACHED_LABELS:
                self._call_label_cache.clear()  # a bound, not a cache policy: cheap to make again
            self._call_label_cache[(team_id, group)] = labels
        return labels

    # --- observations ----------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._requests.inc((route, method if method in METHODS else "unknown", str(status)))
        self._request_duration.observe((route,), seconds)

    def observe_call(
        self,
        team_id: str,
        group: str,
        model: str | None,
        status: str,
        stream: bool,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        seconds: float,
        ttft: float | None,
        attempts: int,
    ) -> None:
        team_group, prompt, completion, group_only = self._call_labels(team_id, group)
        self._llm_calls.inc((*team_group, model or "none", status, "true" if stream else "false"))
        if prompt_tokens:
            self._tokens.inc(prompt, prompt_tokens)
        if completion_tokens:
            self._tokens.inc(completion, completion_tokens)
        if cost_usd:
            self._cost.inc(team_group, cost_usd)
        self._upstream_latency.observe(group_only, seconds)
        if ttft is not None:
            self._ttft.observe(group_only, ttft)
        if attempts > 1:
            self._fallbacks.inc(group_only, attempts - 1)

    def observe_interrupted_call(self, team_id: str, group: str, stream: bool) -> None:
        """A call a sweep closed as interrupted: counted here, since the process that served it
        died before it ended (with its count). Its model is not known; nothing else of it is."""
        team_group = self._call_labels(team_id, group).team_group
        self._llm_calls.inc((*team_group, "none", "cancelled", "true" if stream else "false"))

    def observe_rate_limited(self, team_id: str, kind: str) -> None:
        self._rate_limited.inc((*self._team(team_id), kind))

    def observe_job(self, team_id: str, status: str) -> None:
        self._jobs.inc((*self._team(team_id), status))

    def observe_jobs(self, team_id: str, status: str, count: int) -> None:
        """`count` jobs of the team came to `status`; none counts nothing (and makes no series)."""
        if count:
            self._jobs.inc((*self._team(team_id), status), float(count))

    # --- rendering ---------------------------------------------------------------------------

    async def render(self, balances: Callable[[], Awaitable[list[tuple[str, int]]]]) -> bytes:
        """The /metrics text; `balances` reads (team, credits_remaining) from the store. Scrapes
        that come while one is rendered share its text: renders never pile up in the default
        thread pool (a scraper retrying, a render longer than the interval), which the store's
        reads use too."""
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render(balances))
            self._rendering.add_done_callback(self._rendered)
        return await asyncio.shield(self._rendering)

    def _rendered(self, rendering: asyncio.Future[bytes]) -> None:
        if self._rendering is rendering:
            self._rendering = None
        if not rendering.cancelled():
            rendering.exception()  # told to whoever waited; none may have, all gone

    async def _render(self, balances: Callable[[], Awaitable[list[tuple[str, int]]]]) -> bytes:
        collector: Collecting
        if multiprocess_enabled():
            collector = _Merged(os.environ[MULTIPROC_ENV], self._families)
        else:
            collector = _Taken([*(local.snapshot() for local in self._local), self.active_streams])
        values = await self._balances(balances) if self.team_label else None
        try:
            return await asyncio.to_thread(_render, collector, values)
        except MetricsUnavailable as exc:
            self._gone_log("%s", exc)
            raise

    async def _balances(self, read: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[tuple[str, int]] | None:
        """The balances, read at most every `credits_ttl`; None if the store cannot be read. A
        database in trouble is when the other metrics are wanted most: the scrape goes on
        without the balances (absent rather than stale, so an alert on them notices)."""
        fetched_at, values = self._credits
        if time.monotonic() - fetched_at > self._credits_ttl:
            try:
                values = await read()
            except StoreError as exc:
                log.warning("/metrics without tollgate_credits_remaining: the store could not be read (%s)", exc)
                return None
            self._credits = (time.monotonic(), values)
        return values


def forget_namesake(directory: str) -> None:
    """Drop the live gauges' files under this process's pid, before it makes its own: any there
    are a dead worker's that had the same pid (pids are used again), and prometheus-client
    would carry on from its values (a stream open for ever)."""
    mark_process_dead(os.getpid(), directory)


def forget_dead_processes(directory: str) -> None:
    """Drop the live gauges' files of workers that are gone. prometheus-client leaves that to
    the server (gunicorn's child_exit hook); uvicorn's supervisor has no such hook, so without
    this a stream open in a worker that was killed would count for ever. Counters' and
    histograms' files stay: what a dead worker counted still happened."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(path[:-3].rsplit("_", 1)[1])
        if not _a_live_worker(pid):
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape was first
                mark_process_dead(pid, directory)


# Where a process's state and parent can be read (Linux).
_PROC_STAT = os.path.exists("/proc/self/stat")


def _a_live_worker(pid: int) -> bool:
    """Whether `pid` is a live worker of this server: a sibling of this one (a child of the same
    supervisor), not a zombie its supervisor has yet to reap (uvicorn's looks every half
    second), whose pid answers a signal all the same. A pid used again by any other process,
    whoever's it is, is the dead worker's no longer. Without /proc (not Linux): any process of
    this user's holding the pid."""
    if not _PROC_STAT:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or someone else's: used again
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state, parent = stat.read().rsplit(b")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return False  # gone
    return state not in (b"Z", b"X") and int(parent) == os.getppid()


class Collecting(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def _render(collector: Collecting, balances: list[tuple[str, int]] | None) -> bytes:
    """The scrape's text, in a thread of its own (it runs no code of the event loop's)."""
    text = generate_latest(collector)  # type: ignore[arg-type]  # it only calls collect()
    if balances is not None:
        text += generate_latest(_Balances(balances))  # type: ignore[arg-type]
    return text


class _Taken:
    """This process's families as a scrape found them: its instruments' snapshots, and the
    live-streams gauge (prometheus-client's own, which locks)."""

    def __init__(self, collectors: list[Any]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class _Merged:
    """The sum of every process's files, and an empty family for each of `families` that no
    file holds yet: prometheus-client's own collector knows only what it reads, so a counter no
    worker has incremented would be missing, HELP and TYPE too, where one process names it."""

    def __init__(self, directory: str, families: list[tuple[str, str, str]]) -> None:
        self._directory = directory
        self._families = families

    def collect(self) -> Any:
        check_directory(self._directory)  # else an empty scrape, as if nothing was counted
        forget_dead_processes(self._directory)
        files = _counted_files(self._directory)
        merged = {metric.name: metric for metric in MultiProcessCollector.merge(files, accumulate=True)}
        for name, documentation, kind in self._families:
            metric = merged.pop(name, None)
            yield Metric(name, documentation, kind) if metric is None else metric
        yield from merged.values()


def _counted_files(directory: str) -> list[str]:
    """The workers' files a scrape reads: those that hold anything. prometheus-client makes a
    file empty, then sizes it (it never shrinks): one a worker is making at that moment (its first
    count of a kind, as it starts) holds nothing yet, and reading it failed the scrape, a 500."""
    files = []
    for path in glob.glob(os.path.join(directory, "*.db")):
        with contextlib.suppress(FileNotFoundError):  # a dead worker's live gauge, dropped meanwhile
            if os.path.getsize(path):
                files.append(path)
    return files


class _Balances:
    """A one-off collector for the team balances read from the store."""

    def __init__(self, values: list[tuple[str, int]]) -> None:
        self._values = values

    def collect(self) -> Any:
        family = GaugeMetricFamily("tollgate_credits_remaining", "Credits a team has left", labels=["team"])
        for team_id, remaining in self._values:
            family.add_metric([team_id], remaining)
        yield family
