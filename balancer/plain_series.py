"""The request path's Prometheus series kept as plain numbers, exported at scrape time.

prometheus_client's `Counter.inc`, `Histogram.observe` and `Gauge.set` take a lock, check that
the metric is observable and (a histogram) walk its buckets in Python on every call: 1-4 µs
each, 15-25 µs a request over the dozen calls a proxied request makes (docs/benchmarks.md,
"Hot-path review"). The series a request touches are these instead: a child is a slotted
object holding a number (a histogram: a list of per-bucket counts and a sum), updated by one
attribute add; `collect()` turns them into the metric families prometheus_client would expose —
the same name, HELP, TYPE, label names and values in creation order, `le` bounds, `_count`,
`_sum` and `_created` — when the registry is scraped. Each metric registers itself on the
registry as it is built, as prometheus_client's do, so the exposition keeps its order
(tests/test_observability.py compares the two expositions).

Updated from one thread, the event loop's (as everything on the request path); a scrape from
another thread copies the children first and may read a child mid-request, never a broken table.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_INF = float("inf")


def _use_created() -> bool:
    """prometheus_client's own switch for `_created` series (PROMETHEUS_DISABLE_CREATED_SERIES,
    `disable_created_metrics()`), so that these series and its own agree."""
    return getattr(_prometheus_metrics, "_use_created", True)


class _Count:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _Level:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class _Buckets:
    """Per-bucket (not cumulative) counts: `counts[i]` holds the observations in
    (bounds[i-1], bounds[i]], as prometheus_client's Histogram keeps them."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ascending, +Inf last
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount
        self.sum += amount


class _Series:
    """A metric's children by label values; an unlabelled metric has its one child at once."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if not self.labelnames:
            self._only = self.labels()
        if registry is not None:
            registry.register(self)

    def _child(self):
        raise NotImplementedError

    def labels(self, *values: str):
        """The child for `values` (created at zero the first time)."""
        child = self._children.get(values)
        if child is None:
            key = tuple(str(v) for v in values)  # label values are strings, as prometheus_client makes them
            child = self._children.get(key)
            if child is None:
                if len(key) != len(self.labelnames):
                    raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected "
                                     f"({', '.join(self.labelnames)}), got {values!r}")
                child = self._children[key] = self._child()
        return child

    def remove(self, *values: str) -> None:
        del self._children[tuple(str(v) for v in values)]

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        created = _use_created()
        for values, child in list(self._children.items()):
            self._add(family, values, child, created)
        yield family

    def _add(self, family: Metric, values: tuple[str, ...], child, created: bool) -> None:
        raise NotImplementedError


class PlainCounter(_Series):
    """A counter (`name` ends in `_total`, as prometheus_client's would be written)."""

    def _child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        self._only.inc(amount)

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child, created) -> None:
        family.add_metric(values, child.value, child.created if created else None)


class PlainGauge(_Series):
    def _child(self) -> _Level:
        return _Level()

    def set(self, value: float) -> None:
        self._only.set(value)

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child, created) -> None:
        family.add_metric(values, child.value)


class PlainHistogram(_Series):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None, buckets: Sequence[float] = ()) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets must be given in increasing order")
        if bounds[-1] != _INF:
            bounds.append(_INF)
        self.bounds = tuple(bounds)
        self._le = tuple(floatToGoString(b) for b in bounds)  # the `le` label, as prometheus_client writes it
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, amount: float) -> None:
        self._only.observe(amount)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child, created) -> None:
        cumulative, total = [], 0
        for le, n in zip(self._le, list(child.counts)):
            total += n
            cumulative.append((le, total))
        family.add_metric(values, cumulative, child.sum)
        if created:
            family.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, values)), child.created))
