"""Labelled counters and histograms that an observation updates with a dict operation.

prometheus-client's own take a lock, check the metric is observable and, for a histogram,
walk its buckets in Python for every observation: a call observes six of them, which came
to a tenth of Tollgate's own code per call (bench/RESULTS.md). These keep their values in
plain dicts and lists, updated only from the event loop's thread, and render through
prometheus-client at scrape time, sample for sample as its own Counter and Histogram do.

With several worker processes (prometheus-client's multiprocess mode) the values must live
in its shared files, so `Shared` puts its Counter or Histogram behind the same two calls.

A scrape renders a `snapshot()` of them in another thread (metrics.py): copied on the loop, as
they stand between two observations, so that rendering never meets a dict or a histogram
changing under it.
"""

from __future__ import annotations

import copy
import math
import time
from bisect import bisect_left
from typing import Callable, Iterator, Protocol, Self

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class Counting(Protocol):
    def inc(self, labels: Labels, amount: float = 1.0) -> None: ...


class Observing(Protocol):
    def observe(self, labels: Labels, amount: float) -> None: ...


def _created_series() -> bool:
    """Whether `_created` samples are exported: prometheus-client's own switch
    (PROMETHEUS_DISABLE_CREATED_SERIES, `disable_created_metrics()`)."""
    return getattr(prometheus_client.metrics, "_use_created", True)


class LocalInstrument(Collector):
    """What a counter and a histogram of this process share: their name, help, label names,
    each series' creation time, and their place in the registry."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Labels, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._created: dict[Labels, float] = {}
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._documentation, self.kind)]

    def snapshot(self) -> Self:
        """A copy of this one's values as they are now, registered nowhere, to be collected."""
        taken = copy.copy(self)
        taken._created = self._created.copy()
        return taken


class LocalCounter(LocalInstrument):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Labels, registry: CollectorRegistry) -> None:
        self._values: dict[Labels, float] = {}
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        values = self._values
        value = values.get(labels)  # then one store: `in` and `+=` looked it up three times
        if value is None:
            self._created[labels] = time.time()
            values[labels] = amount
        else:
            values[labels] = value + amount

    def snapshot(self) -> Self:
        taken = super().snapshot()
        taken._values = self._values.copy()  # each value a float, replaced rather than changed
        return taken

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._documentation, self.kind)
        created = _created_series()
        for labels, value in list(self._values.items()):
            series = dict(zip(self._labelnames, labels))
            metric.add_sample(self._name + "_total", series, value)
            if created:
                metric.add_sample(self._name + "_created", series, self._created[labels])
        yield metric


class LocalHistogram(LocalInstrument):
    kind = "histogram"

    def __init__(
        self, name: str, documentation: str, labelnames: Labels, buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._les = tuple(floatToGoString(bound) for bound in bounds)
        # Per series: each bucket's own count (not yet cumulative), then the sum.
        self._series: dict[Labels, list[float]] = {}
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, labels: Labels, amount: float) -> None:
        series = self._series.get(labels)
        if series is None:
            self._created[labels] = time.time()
            series = self._series[labels] = [0.0] * (len(self._bounds) + 1)
        # The first bucket whose bound is >= the amount, as `le` means.
        series[bisect_left(self._bounds, amount)] += 1
        series[-1] += amount

    def snapshot(self) -> Self:
        taken = super().snapshot()
        taken._series = {labels: values.copy() for labels, values in self._series.items()}
        return taken

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._documentation, self.kind)
        created = _created_series()
        for labels, values in list(self._series.items()):
            series = dict(zip(self._labelnames, labels))
            count = 0.0
            for le, value in zip(self._les, values):
                count += value
                metric.add_sample(self._name + "_bucket", {**series, "le": le}, count)
            metric.add_sample(self._name + "_count", series, count)
            if self._bounds[0] >= 0:
                metric.add_sample(self._name + "_sum", series, values[-1])
            if created:
                metric.add_sample(self._name + "_created", series, self._created[labels])
        yield metric


class Shared:
    """prometheus-client's Counter or Histogram, its children kept by label values:
    its `labels()` checks and locks each time."""

    def __init__(self, metric: Counter | Histogram, uncounted: Callable[[OSError], None] | None = None) -> None:
        """`uncounted`: told when a value cannot be made, its file refused (the workers'
        directory removed under them), which then goes uncounted rather than failing the call
        that counts it; None: the error is raised."""
        self._metric = metric
        self._children: dict[Labels, Counter | Histogram] = {}
        self._uncounted = uncounted

    def _child(self, labels: Labels) -> Counter | Histogram | _Uncounted:
        child = self._children.get(labels)
        if child is None:
            try:
                child = self._children[labels] = self._metric.labels(*labels)
            except OSError as exc:  # a kind's first value opens this process's file for it
                if self._uncounted is None:
                    raise
                self._uncounted(exc)
                return _UNCOUNTED
        return child

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self._child(labels).inc(amount)  # type: ignore[union-attr]

    def observe(self, labels: Labels, amount: float) -> None:
        self._child(labels).observe(amount)  # type: ignore[union-attr]


class _Uncounted:
    def inc(self, amount: float = 1.0) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_UNCOUNTED = _Uncounted()


def counter(name: str, documentation: str, labelnames: Labels, registry: CollectorRegistry,
            shared: bool, uncounted: Callable[[OSError], None] | None = None) -> Counting:
    """`shared`: in prometheus-client's multiprocess mode, `uncounted` told of a value that
    cannot be counted there (`Shared`)."""
    if shared:
        return Shared(Counter(name, documentation, labelnames, registry=registry), uncounted)
    return LocalCounter(name, documentation, labelnames, registry)


def histogram(name: str, documentation: str, labelnames: Labels, buckets: tuple[float, ...],
              registry: CollectorRegistry, shared: bool,
              uncounted: Callable[[OSError], None] | None = None) -> Observing:
    if shared:
        return Shared(Histogram(name, documentation, labelnames, buckets=buckets, registry=registry), uncounted)
    return LocalHistogram(name, documentation, labelnames, buckets, registry)
