"""Request classes, priorities, per-tenant fair share and early load shedding (issue #17 part 4).

Off by default (`FairnessConfig.enabled`). On, every generation request passes through one
admission queue after the router has tokenized it (balancer/proxy.py) and before a replica is
chosen, so the cached prefix the router predicts is read when the request is sent, never when it
was queued:

    class   ─ the API key's class (`api_keys` of a class), else the class header
              (`X-Kvfleet-Class`), else the default class; an unknown class name ─▶ 400
    tenant  ─ the API key, else the tenant header (`X-Kvfleet-Tenant`), else the class itself:
              one flow of the queue per (class, tenant), weighted by its class's weight
    cost    ─ prompt tokens + predicted output tokens (the predictor's, else max_tokens × n)

    fleet below capacity (requests in flight < max_inflight_per_replica × usable replicas)
        ─▶ dispatch in order: highest priority first, then weighted fair queueing (WFQ) in tokens
    fleet at capacity, but the tenant within its fair share (its weight over the active
        tenants' weights, of the fleet's capacity in tokens): holding less than that in flight,
        or served lately no more than that (its finish tag at most that far ahead of the least
        advanced other tenant's: a burst within its share), and no higher priority waiting
                                          ─▶ dispatch at once (up to `overcommit` × capacity, 2)
    else wait; a request whose estimated wait plus its class's service time exceeds its class's
        TTFT target ─▶ 429 with Retry-After at once (early shedding: the fleet is not saturated
        yet, the queue only predicts that it would be for this class); a wait longer than
        `max_wait_s` ─▶ 429; more than `max_queue` waiting ─▶ 429

WFQ is self-clocked fair queueing (Golestani, INFOCOM 1994): a request's finish tag is
`max(V, the flow's last tag) + cost / weight`, V the tag of the request dispatched last at its
priority; the smallest tag goes first. A flooding tenant's tags race ahead of the others', so a
tenant within its share keeps its place whatever the flood does, and is never shed while within
it (it never waits, so its estimate is 0). A flood, ahead of the others' tags, never passes the
full fleet, and no tenant's burst takes more than its share of the overcommitted fleet.

The wait estimate is the work ahead of the request (tokens queued at a higher priority, and at its
priority with a smaller finish tag) over the queue's measured drain rate (tokens dispatched per
second while requests were waiting, as decayed sums of tokens and time: what the fleet actually
served, not what its step times promise), times a calibration factor learned from the measured
waits: the running mean of measured wait / estimate made at enqueue plus two mean deviations
(later arrivals at a higher priority or with smaller tags jump ahead of a waiting request, and
waits vary: with the mean alone half the admitted requests would miss the target). Until the
queue has drained a few requests there is no estimate and nothing is shed early (the timeout
and the queue bound still hold); work past capacity (tenants within their share went over it)
counts as work ahead.

The class's service time is the measured time from dispatch to the first byte (mean per class).
Metrics: `FairnessMetrics` below; per class, never per tenant (tenants are the clients').
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from balancer.metrics import LATENCY_BUCKETS
from balancer.plain_series import PlainCounter, PlainGauge, PlainHistogram
from protocol.auth import KeySet, parse_bearer
from protocol.openai_api import APIError

SHED_REASONS = ("predicted_wait", "queue_timeout", "queue_full")
_REPUMP_S = 0.25  # waiters re-check capacity this often (a replica may come back without an event)
_RATE_MIN_DISPATCHES = 4  # a drain-rate sample needs this many dispatches from the queue ...
_RATE_MIN_WINDOW_S = 0.2  # ... over at least this long
_EWMA = 0.3  # weight of a new drain-rate sample
_CALIB_EWMA = 0.2  # weight of a new measured/estimated wait ratio
_CALIB_MIN_EST_S = 0.02  # estimates shorter than this are not used to calibrate (noise)
_CALIB_RANGE = (0.25, 8.0)


def _header_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in " :\r\n"):
        raise ValueError(f"fairness.{what} must be an HTTP header name, got {name!r}")
    return name


@dataclass(frozen=True)
class ClassConfig:
    """One request class."""

    name: str
    weight: float = 1.0  # share of the fleet per tenant of this class, against the others' weights
    priority: int = 0  # higher is dispatched first (strict)
    ttft_target_s: float = 0.0  # shed early (429) when the estimated TTFT exceeds it; 0 = no target
    api_keys: tuple[str, ...] = ()  # requests with one of these Bearer keys are in this class
    max_wait_s: float = 0.0  # longest wait in the queue, then 429; 0 = FairnessConfig.queue_timeout_s

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 64 or not all(
                c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"a class name must be 1-64 letters, digits, '-', '_' or '.', got {self.name!r}")
        for attr in ("weight", "ttft_target_s", "max_wait_s"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"class {self.name}: {attr} must be a non-negative number, got {v!r}")
        if not self.weight > 0:
            raise ValueError(f"class {self.name}: weight must be positive, got {self.weight}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"class {self.name}: priority must be an integer, got {self.priority!r}")
        keys = self.api_keys
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"class {self.name}: api_keys must be a list of strings")
        object.__setattr__(self, "api_keys", tuple(keys))
        KeySet(keys)  # validates each key

    @classmethod
    def parse(cls, spec: str) -> "ClassConfig":
        """`NAME[,weight=W][,priority=P][,ttft=S][,max_wait=S]` (the --fair-class flag)."""
        name, *items = [s.strip() for s in spec.split(",")]
        names = {"weight": ("weight", float), "priority": ("priority", int), "ttft": ("ttft_target_s", float),
                 "max_wait": ("max_wait_s", float)}
        kw: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in names:
                raise ValueError(f"bad class spec {spec!r}: write NAME,weight=W,priority=P,ttft=S,max_wait=S "
                                 f"(any of them), e.g. interactive,weight=2,priority=1,ttft=0.5")
            attr, kind = names[key]
            try:
                kw[attr] = kind(value)
            except ValueError:
                raise ValueError(f"bad class spec {spec!r}: {key}={value!r} is not a number") from None
        return cls(name=name, **kw)


@dataclass(frozen=True)
class FairnessConfig:
    """The admission queue's classes and limits (BalancerConfig.fairness; `[fairness]` in a
    config file, its classes as `[fairness.classes.NAME]` tables)."""

    enabled: bool = False
    class_header: str = "X-Kvfleet-Class"
    tenant_header: str = "X-Kvfleet-Tenant"
    default_class: str = "default"  # requests naming no class (added with defaults if not listed)
    classes: tuple[ClassConfig, ...] = ()
    max_inflight_per_replica: int = 8  # the fleet's capacity: requests in flight per usable replica
    max_queue: int = 1000  # requests waiting, all classes together; 429 beyond
    queue_timeout_s: float = 30.0  # longest wait of a class without its own max_wait_s
    default_output_tokens: int = 256  # a request's output cost when it gives no max_tokens and nothing predicts it
    max_tenants: int = 1024  # flows kept; idle ones are forgotten beyond this
    # Tenants within their share may take the fleet to this multiple of its capacity (1: never
    # past it; they then wait at the head of the queue for the next slot).
    overcommit: float = 2.0

    def __post_init__(self) -> None:
        _header_name(self.class_header, "class_header")
        _header_name(self.tenant_header, "tenant_header")
        classes = tuple(c if isinstance(c, ClassConfig) else ClassConfig(**c) for c in self.classes)
        if not any(c.name == self.default_class for c in classes):
            classes += (ClassConfig(name=self.default_class),)
        names = [c.name for c in classes]
        if len(names) != len(set(names)):
            raise ValueError(f"fairness: a class is listed twice in {names}")
        keys = [k for c in classes for k in c.api_keys]
        if len(keys) != len(set(keys)):
            raise ValueError("fairness: an API key is in two classes; give each key one class")
        object.__setattr__(self, "classes", classes)
        for name in ("max_inflight_per_replica", "max_queue", "default_output_tokens", "max_tenants"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"fairness.{name} must be a positive integer, got {v!r}")
        if isinstance(self.overcommit, bool) or not isinstance(self.overcommit, (int, float)) or not (
                1 <= self.overcommit <= 16):
            raise ValueError(f"fairness.overcommit must be a number from 1 to 16, got {self.overcommit!r}")
        if not (isinstance(self.queue_timeout_s, (int, float)) and self.queue_timeout_s > 0):
            raise ValueError(f"fairness.queue_timeout_s must be positive (seconds), got {self.queue_timeout_s!r}")

    def klass(self, name: str) -> ClassConfig | None:
        return next((c for c in self.classes if c.name == name), None)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "FairnessConfig":
        """From a config file's `[fairness]` table: `classes` a table of tables (name -> keys) or
        a list of tables with a `name`."""
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"fairness: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        kw = dict(raw)
        classes = kw.get("classes", ())
        try:
            if isinstance(classes, Mapping):
                kw["classes"] = tuple(ClassConfig(name=n, **(v or {})) for n, v in classes.items())
            else:
                kw["classes"] = tuple(ClassConfig(**c) for c in classes)
        except TypeError as e:
            raise ValueError(f"fairness.classes: {e}; a class's keys are "
                             f"{sorted(f.name for f in fields(ClassConfig) if f.name != 'name')}") from None
        return cls(**kw)


# ---------------------------------------------------------------------------------- metrics


class FairnessMetrics:
    """Per-class series, created for every configured class at start (a panel shows 0, not "no data").
    Those every admitted request updates are plain numbers exported at scrape time
    (balancer/plain_series.py); the shed counter stays prometheus_client's."""

    def __init__(self, registry: CollectorRegistry, classes: tuple[ClassConfig, ...]) -> None:
        r = registry
        self.queued = PlainGauge("kvfleet_fairness_queue_requests", "Requests waiting in the fair admission queue.",
                                 ("class",), registry=r)
        self.queued_tokens = PlainGauge("kvfleet_fairness_queue_tokens",
                                        "Tokens (prompt + predicted output) waiting in the fair admission queue.",
                                        ("class",), registry=r)
        self.inflight_tokens = PlainGauge(
            "kvfleet_fairness_inflight_tokens",
            "Tokens (prompt + predicted output) of the admitted requests still in flight.",
            ("class",), registry=r)
        self.admitted = PlainCounter("kvfleet_fairness_admitted_requests_total",
                                     "Requests admitted by the fair admission queue.", ("class",), registry=r)
        self.admitted_tokens = PlainCounter("kvfleet_fairness_admitted_tokens_total",
                                            "Tokens (prompt + predicted output) admitted: each class's share of the "
                                            "fleet.", ("class",), registry=r)
        self.shed = Counter("kvfleet_fairness_shed_requests_total",
                            "Requests refused with 429 by the fair admission queue, by reason (predicted_wait: "
                            "the estimated TTFT exceeded the class's target; queue_timeout; queue_full).",
                            ("class", "reason"), registry=r)
        self.wait = PlainHistogram("kvfleet_fairness_queue_wait_seconds",
                                   "Time an admitted request waited in the queue.",
                                   ("class",), buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = PlainHistogram("kvfleet_fairness_time_to_first_token_seconds",
                                   "Time from arrival to the first byte, per class (admitted requests).", ("class",),
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.good = PlainCounter("kvfleet_fairness_goodput_requests_total",
                                 "Admitted requests answered with their first byte within the class's TTFT target "
                                 "(every answered request of a class without a target).", ("class",), registry=r)
        self.estimated_wait = PlainGauge("kvfleet_fairness_estimated_wait_seconds",
                                         "The latest queue-wait estimate made for a request of the class.", ("class",),
                                         registry=r)
        self.drain_rate = PlainGauge("kvfleet_fairness_drain_rate_tokens_per_second",
                                     "Tokens per second the queue drains while requests wait (the measured capacity "
                                     "behind the wait estimates; 0 until measured).", registry=r)
        self.calibration = PlainGauge("kvfleet_fairness_estimate_calibration",
                                      "Measured over estimated queue wait (the factor applied to the estimates).",
                                      registry=r)
        self.calibration.set(1.0)
        for c in classes:
            for m in (self.queued, self.queued_tokens, self.inflight_tokens, self.admitted, self.admitted_tokens,
                      self.wait, self.ttft, self.good, self.estimated_wait):
                m.labels(c.name)
            for reason in SHED_REASONS:
                self.shed.labels(c.name, reason)


# ---------------------------------------------------------------------------------- state


class _Flow:
    """One tenant's requests (a flow of the queue)."""

    __slots__ = ("key", "klass", "weight", "finish", "waiting", "inflight", "inflight_tokens")

    def __init__(self, key: tuple[str, str], klass: ClassConfig) -> None:
        self.key, self.klass, self.weight = key, klass, klass.weight
        self.finish = 0.0  # the finish tag of its latest request
        self.waiting: deque[_Waiter] = deque()
        self.inflight = 0
        self.inflight_tokens = 0

    @property
    def active(self) -> bool:
        return bool(self.waiting) or self.inflight > 0


class _Waiter:
    __slots__ = ("flow", "cost", "tag", "fut", "since", "estimate")  # estimate: raw (uncalibrated)

    def __init__(self, flow: _Flow, cost: int, tag: float, fut: asyncio.Future, since: float,
                 estimate: float | None) -> None:
        self.flow, self.cost, self.tag, self.fut, self.since, self.estimate = flow, cost, tag, fut, since, estimate


class Refused(Exception):
    """Shed: answer 429 with Retry-After `retry_after_s`."""

    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


class Ticket:
    """An admitted request's hold on the fleet; `release` exactly once when it has ended."""

    __slots__ = ("queue", "flow", "cost", "waited_s", "open")

    def __init__(self, queue: "FairQueue", flow: _Flow, cost: int, waited_s: float) -> None:
        self.queue, self.flow, self.cost, self.waited_s, self.open = queue, flow, cost, waited_s, True

    @property
    def klass(self) -> ClassConfig:
        return self.flow.klass

    def release(self, ttft_s: float | None) -> None:
        """The request ended; `ttft_s` from its arrival (None: it got no first byte)."""
        if self.open:
            self.open = False
            self.queue._release(self, ttft_s)


class FairQueue:
    """The admission queue (see the module docstring). `capacity()` is the fleet's request
    capacity now (a scan of the registry: read once per admission and once per `pump`); call
    `pump()` whenever it may have grown."""

    def __init__(self, cfg: FairnessConfig, capacity: Callable[[], int], registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.capacity = capacity
        self.clock = clock
        self.metrics = FairnessMetrics(registry if registry is not None else CollectorRegistry(), cfg.classes)
        self._by_key: dict[str, ClassConfig] = {k: c for c in cfg.classes for k in c.api_keys}
        self._keys = KeySet(tuple(self._by_key)) if self._by_key else None
        self._flows: dict[tuple[str, str], _Flow] = {}
        self._vtime: dict[int, float] = {}  # priority -> virtual time (tag of the last dispatch)
        self.inflight = 0  # admitted requests not yet released
        self.inflight_tokens = 0
        self.waiting = 0
        # Drain-rate measurement: tokens dispatched from the queue over the time requests waited.
        self.rate: float | None = None  # tokens/s
        self._window_start: float | None = None
        self._window_tokens = 0
        self._window_dispatches = 0
        self._drained_tokens = 0.0
        self._drained_s = 0.0
        # Measured wait over the raw estimate: its running mean and mean deviation; the factor
        # applied is mean + 2 deviations, so that an admitted request meets its target with a
        # margin, not half the time.
        self._ratio = 1.0
        self._ratio_dev = 0.0
        self.calibration = 1.0
        self._service: dict[str, float] = {}  # class -> mean dispatch-to-first-byte seconds
        self._mean_cost: float | None = None

    # ------------------------------------------------------------------ who
    def identify(self, header: Callable[[str], str | None], api_key: str | None) -> tuple[ClassConfig, str]:
        """(class, tenant) of a request; `APIError(400)` for a class name no class has."""
        cfg = self.cfg
        klass = None
        if api_key is not None and self._keys is not None and self._keys.accepts(api_key):
            klass = self._by_key[api_key]
        if klass is None:
            name = header(cfg.class_header)
            if name is None or not name.strip():
                klass = cfg.klass(cfg.default_class)
            else:
                klass = cfg.klass(name.strip())
                if klass is None:
                    raise APIError(400, f"unknown request class {name.strip()[:64]!r} in the {cfg.class_header} "
                                        f"header; this balancer's classes are "
                                        f"{', '.join(c.name for c in cfg.classes)} (or leave the header out)",
                                   cfg.class_header)
        tenant = api_key or (header(cfg.tenant_header) or "")[:256]
        return klass, tenant

    def _flow(self, klass: ClassConfig, tenant: str) -> _Flow:
        key = (klass.name, tenant)
        flow = self._flows.get(key)
        if flow is None:
            if len(self._flows) >= self.cfg.max_tenants:
                for k in [k for k, f in self._flows.items() if not f.active]:
                    del self._flows[k]
                if len(self._flows) >= self.cfg.max_tenants:  # all active: the class is the flow
                    key = (klass.name, "")
                    flow = self._flows.get(key)
            if flow is None:
                flow = self._flows[key] = _Flow(key, klass)
        return flow

    # ------------------------------------------------------------------ admission
    async def admit(self, klass: ClassConfig, tenant: str, cost: int) -> Ticket:
        """Wait for the request's turn; its `Ticket`, or `Refused` (shed)."""
        flow = self._flow(klass, tenant)
        cost = max(1, int(cost))
        now = self.clock()
        m = self.metrics
        capacity = self.capacity()
        # No usable replica (capacity 0): nothing to wait for, the proxy answers 503 at once.
        if not capacity or not self.waiting and self.inflight < capacity:
            # Nothing waits: the virtual time follows what is served now, so a tenant's tags
            # measure its service against everyone's even while no queue forms.
            tag = self._tag(flow, cost)
            p = klass.priority
            self._vtime[p] = max(self._vtime.get(p, 0.0), tag)
            m.estimated_wait.labels(klass.name).set(0.0)
            return self._dispatch(flow, cost, 0.0)
        if not flow.waiting and self._under_share(flow, cost, capacity):
            self._tag(flow, cost)
            m.estimated_wait.labels(klass.name).set(0.0)
            return self._dispatch(flow, cost, 0.0)
        if self.waiting >= self.cfg.max_queue:
            self._shed(klass, "queue_full")
            raise Refused("queue_full", f"the admission queue is full ({self.cfg.max_queue} waiting)",
                          self._retry_after(None))
        tag = self._tag(flow, cost)
        raw = self.raw_estimate(klass.priority, tag, cost, capacity)
        estimate = None if raw is None else raw * self.calibration
        m.estimated_wait.labels(klass.name).set(estimate if estimate is not None else 0.0)
        target = klass.ttft_target_s
        if target > 0 and estimate is not None and estimate + self._service.get(klass.name, 0.0) > target:
            flow.finish -= cost / flow.weight  # never queued: its tag is not spent
            self._shed(klass, "predicted_wait")
            over = estimate + self._service.get(klass.name, 0.0) - target
            raise Refused("predicted_wait", f"class {klass.name!r} would wait about {estimate:.2f} s for the "
                                            f"fleet, beyond its TTFT target of {target:g} s", self._retry_after(over))
        loop = asyncio.get_running_loop()
        waiter = _Waiter(flow, cost, tag, loop.create_future(), now, raw)
        if not self.waiting:
            self._window_start, self._window_tokens, self._window_dispatches = now, 0, 0
        flow.waiting.append(waiter)
        self.waiting += 1
        m.queued.labels(klass.name).inc()
        m.queued_tokens.labels(klass.name).inc(cost)
        max_wait = klass.max_wait_s or self.cfg.queue_timeout_s
        deadline = loop.time() + max_wait
        try:
            while not waiter.fut.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait((waiter.fut,), timeout=min(left, _REPUMP_S))
                if not waiter.fut.done():
                    self.pump()
        except BaseException:  # the client went away
            if waiter.fut.done() and not waiter.fut.cancelled():
                waiter.fut.result().release(None)  # admitted at the last moment: hand the slot on
            else:
                self._unqueue(waiter)
            raise
        if not waiter.fut.done():
            self._unqueue(waiter)
            self._shed(klass, "queue_timeout")
            raise Refused("queue_timeout", f"class {klass.name!r} waited {max_wait:g} s for the fleet",
                          self._retry_after(None))
        return waiter.fut.result()

    def _tag(self, flow: _Flow, cost: int) -> float:
        """The request's finish tag (self-clocked fair queueing), recorded on its flow."""
        flow.finish = max(self._vtime.get(flow.klass.priority, 0.0), flow.finish) + cost / flow.weight
        return flow.finish

    def _under_share(self, flow: _Flow, cost: int, capacity: int, tag: float | None = None) -> bool:
        """The tenant is within its fair share — it holds less than its share of the in-flight
        tokens (counting this request; its weight over the active tenants' weights, of the fleet's
        capacity in tokens), or its finish tag (`tag`, else the one this request would get) is at
        most that share ahead of the least advanced other active tenant's at its priority (what it
        was served lately is within its share, and this is a burst of at most its share) — no
        higher priority waits, and the fleet (of `capacity` requests) is below the overcommit bound."""
        if self.inflight + 1 > self.cfg.overcommit * capacity:
            return False
        p = flow.klass.priority
        if any(f.waiting and f.klass.priority > p for f in self._flows.values()):
            return False  # priority is strict: no share passes a higher class's waiters
        weights = sum(f.weight for f in self._flows.values() if f.active and f is not flow)
        if weights <= 0:
            return False  # alone: the capacity is its share
        share = flow.weight / (weights + flow.weight)
        budget = share * capacity * (self._mean_cost or cost)
        if flow.inflight_tokens + cost <= budget:
            return True
        # Served lately within its share: its finish tag at most a share's burst ahead of the least
        # advanced other active tenant at its priority (not of the virtual time, which the
        # dominant tenant's own dispatches set: against it a flood would always look fair).
        others = [f.finish for f in self._flows.values() if f.active and f is not flow and f.klass.priority == p]
        # A burst never takes more than its share of the overcommitted fleet, so the others keep theirs.
        if not others or flow.inflight_tokens + cost > self.cfg.overcommit * budget:
            return False
        if tag is None:
            tag = max(self._vtime.get(p, 0.0), flow.finish) + cost / flow.weight
        return tag - min(others) <= budget / flow.weight

    def raw_estimate(self, priority: int, tag: float, cost: int, capacity: int) -> float | None:
        """Seconds a request queued now at `priority` with finish tag `tag` would wait by the
        work ahead of it and the drain rate (before calibration), the fleet's capacity being
        `capacity` requests; None until the rate is measured."""
        if not self.rate:
            return None
        # Past capacity (tenants within their share went over it), that much must end first.
        ahead = cost + max(0, self.inflight - capacity) * (self._mean_cost or cost)
        for f in self._flows.values():
            p = f.klass.priority
            if p > priority:
                ahead += sum(w.cost for w in f.waiting)
            elif p == priority:
                ahead += sum(w.cost for w in f.waiting if w.tag <= tag)
        return ahead / self.rate

    def pump(self) -> None:
        """Dispatch waiters while the fleet has room, in priority then finish-tag order."""
        capacity = self.capacity() if self.waiting else 0  # dispatching changes no replica's usability
        while self.waiting:
            best: _Waiter | None = None
            for f in self._flows.values():
                if f.waiting:
                    w = f.waiting[0]
                    if best is None or (w.flow.klass.priority, -w.tag) > (best.flow.klass.priority, -best.tag):
                        best = w
            if best is None:
                return
            if self.inflight >= capacity and not self._under_share(best.flow, best.cost, capacity, best.tag):
                # The head may not go; a tenant under its share may (the queue is per flow).
                best = next((f.waiting[0] for f in self._flows.values()
                             if f.waiting and self._under_share(f, f.waiting[0].cost, capacity, f.waiting[0].tag)),
                            None)
                if best is None:
                    return
            self._take(best)

    def _take(self, w: _Waiter) -> None:
        flow = w.flow
        flow.waiting.popleft()
        self.waiting -= 1
        m = self.metrics
        m.queued.labels(flow.klass.name).dec()
        m.queued_tokens.labels(flow.klass.name).dec(w.cost)
        p = flow.klass.priority
        self._vtime[p] = max(self._vtime.get(p, 0.0), w.tag)
        now = self.clock()
        waited = now - w.since
        if w.estimate is not None and w.estimate >= _CALIB_MIN_EST_S:
            ratio = min(max(waited / w.estimate, _CALIB_RANGE[0]), _CALIB_RANGE[1])
            self._ratio_dev += _CALIB_EWMA * (abs(ratio - self._ratio) - self._ratio_dev)
            self._ratio += _CALIB_EWMA * (ratio - self._ratio)
            self.calibration = min(max(self._ratio + 2 * self._ratio_dev, _CALIB_RANGE[0]), _CALIB_RANGE[1])
            m.calibration.set(self.calibration)
        self._window_tokens += w.cost
        self._window_dispatches += 1
        self._sample_rate(now, final=not self.waiting)
        w.fut.set_result(self._dispatch(flow, w.cost, waited))

    def _sample_rate(self, now: float, final: bool) -> None:
        start = self._window_start
        if start is None:
            return
        span = now - start
        if self._window_dispatches >= _RATE_MIN_DISPATCHES and span >= _RATE_MIN_WINDOW_S:
            # Decayed sums of tokens and time, not a mean of per-window rates: windows end after a
            # count of dispatches, and a mean of count/time overstates the rate (Jensen).
            self._drained_tokens = self._drained_tokens * (1 - _EWMA) + self._window_tokens
            self._drained_s = self._drained_s * (1 - _EWMA) + span
            self.rate = self._drained_tokens / self._drained_s
            self.metrics.drain_rate.set(self.rate)
            self._window_start, self._window_tokens, self._window_dispatches = now, 0, 0
        elif final:
            self._window_start = None  # too short a backlog to say anything

    def _dispatch(self, flow: _Flow, cost: int, waited: float) -> Ticket:
        flow.inflight += 1
        flow.inflight_tokens += cost
        self.inflight += 1
        self.inflight_tokens += cost
        self._mean_cost = cost if self._mean_cost is None else self._mean_cost + 0.05 * (cost - self._mean_cost)
        m, name = self.metrics, flow.klass.name
        m.admitted.labels(name).inc()
        m.admitted_tokens.labels(name).inc(cost)
        m.inflight_tokens.labels(name).inc(cost)
        m.wait.labels(name).observe(waited)
        return Ticket(self, flow, cost, waited)

    def _release(self, t: Ticket, ttft_s: float | None) -> None:
        flow, name = t.flow, t.flow.klass.name
        flow.inflight -= 1
        flow.inflight_tokens -= t.cost
        self.inflight -= 1
        self.inflight_tokens -= t.cost
        m = self.metrics
        m.inflight_tokens.labels(name).dec(t.cost)
        if ttft_s is not None:
            m.ttft.labels(name).observe(ttft_s)
            target = flow.klass.ttft_target_s
            if not target or ttft_s <= target:
                m.good.labels(name).inc()
            service = max(0.0, ttft_s - t.waited_s)
            old = self._service.get(name)
            self._service[name] = service if old is None else old + _CALIB_EWMA * (service - old)
        self.pump()

    def _unqueue(self, w: _Waiter) -> None:
        w.fut.cancel()
        flow = w.flow
        try:
            flow.waiting.remove(w)
        except ValueError:
            return
        self.waiting -= 1
        self.metrics.queued.labels(flow.klass.name).dec()
        self.metrics.queued_tokens.labels(flow.klass.name).dec(w.cost)
        if not self.waiting:
            self._sample_rate(self.clock(), final=True)

    def _shed(self, klass: ClassConfig, reason: str) -> None:
        self.metrics.shed.labels(klass.name, reason).inc()

    def _retry_after(self, over_s: float | None) -> int:
        """Whole seconds to wait before retrying: the excess of the estimate over the target, or
        the time the queue takes to drain what waits now."""
        if over_s is None:
            queued = sum(w.cost for f in self._flows.values() for w in f.waiting)
            over_s = queued / self.rate if self.rate else 1.0
        return max(1, min(600, math.ceil(over_s)))


# ---------------------------------------------------------------------------------- flags


def add_arguments(p) -> None:
    d = FairnessConfig()
    g = p.add_argument_group("request classes and fair admission (balancer/fairness.py; off unless --fairness)")
    g.add_argument("--fairness", action="store_true", default=None,
                   help="queue generation requests per tenant with weighted fair queueing in tokens, priorities "
                        "and early 429s (Retry-After) for a class whose estimated TTFT passes its target; the "
                        f"class is the {d.class_header} header (or an API key's class), the tenant the API key "
                        f"or the {d.tenant_header} header")
    g.add_argument("--fair-class", action="append", default=[], metavar="NAME[,weight=W,priority=P,ttft=S,max_wait=S]",
                   help="a request class (repeatable), e.g. interactive,weight=2,priority=1,ttft=0.5; API keys "
                        "per class go in the config file ([fairness.classes.NAME] api_keys = [...])")
    g.add_argument("--fair-default-class", default=None, metavar="NAME",
                   help=f"the class of requests that name none (default {d.default_class!r})")
    g.add_argument("--fair-max-inflight-per-replica", type=int, default=None, metavar="N",
                   help="the fleet's capacity for the fair queue: requests in flight per usable replica "
                        f"(default {d.max_inflight_per_replica}); the rest wait at the balancer in fair order")
    g.add_argument("--fair-queue-timeout", type=float, default=None, metavar="S",
                   help=f"longest wait in the fair queue, then 429 (default {d.queue_timeout_s:g} s)")
    g.add_argument("--fair-max-queue", type=int, default=None, metavar="N",
                   help=f"requests that may wait in the fair queue (default {d.max_queue}); 429 beyond")


def apply_arguments(cfg, args):
    """`cfg` (a BalancerConfig) with the fairness flags given in `args` applied over it."""
    from dataclasses import replace

    f = cfg.fairness
    given: dict[str, Any] = {}
    if getattr(args, "fairness", None):
        given["enabled"] = True
    for flag, name in (("fair_default_class", "default_class"),
                       ("fair_max_inflight_per_replica", "max_inflight_per_replica"),
                       ("fair_queue_timeout", "queue_timeout_s"), ("fair_max_queue", "max_queue")):
        v = getattr(args, flag, None)
        if v is not None:
            given[name] = v
    specs = getattr(args, "fair_class", None) or []
    if specs:
        added = tuple(ClassConfig.parse(s) for s in specs)
        names = {c.name for c in added}
        given["classes"] = tuple(c for c in f.classes if c.name not in names) + added
    return replace(cfg, fairness=replace(f, **given)) if given else cfg


def api_key_of(ex) -> str | None:
    """The request's API key: the one the guard verified, else the client's Bearer header."""
    key = getattr(ex, "api_key", None)
    return key if key is not None else parse_bearer(ex.header("Authorization"))
