"""The replicas the balancer knows, with their runtime state (health, breaker, load, in-flight).

Config (`ReplicaSpec`) is frozen; everything that changes at run time lives on `ReplicaState`.
The registry answers one question on the hot path — which replicas may take a request now —
and builds the `ReplicaView`s policies score.

Circuit breaker per replica:

    closed ──(refused connection, or N consecutive 5xx/timeouts)──▶ open
    open ──(open_s elapsed)──▶ half-open: one trial request may go
    half-open ──(success, or a good health poll)──▶ closed;  ──(failure)──▶ open

Sent since the last report: what this balancer sent to a replica that its last load report
cannot hold yet (policies add it to the report, to not herd onto a replica between reports).
A request is in a report only once it has reached the replica's queue, `in_transit_s` after it
was sent (the hop to the replica, its parsing and tokenizing), so a report made less than that
after a send does not count the send: it stays counted until a later report. Resetting the
count at every report instead lost the requests in transit whenever reports come faster than
that (a replica reporting every engine step, ~15–30 ms, lost a quarter of the sends of a 5 ms
hop: two requests sent 5 ms apart both saw an empty queue).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
from balancer.policies.base import ReplicaLoad, ReplicaView
from protocol.roles import BOTH


_INF = float("inf")


class Breaker(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class ReplicaState:
    spec: ReplicaSpec
    healthy: bool = True  # optimistic until the first poll says otherwise
    draining: bool = False
    breaker: Breaker = Breaker.CLOSED
    breaker_opened_at: float = 0.0
    consecutive_failures: int = 0  # passive (request) failures
    poll_failures: int = 0  # consecutive failed health polls
    poll_successes: int = 0
    half_open_inflight: bool = False
    inflight_requests: int = 0
    inflight_tokens: int = 0
    sent_since_report: int = 0
    sent_tokens_since_report: int = 0
    # (clock time, uncached tokens) of the sends the last report may not hold, oldest first
    sends: deque = field(default_factory=lambda: deque(maxlen=4096))  # bounded: a replica may never report
    load: ReplicaLoad = ReplicaLoad()  # age_s = inf until the first report
    load_at: float = float("-inf")  # clock time of the last load report
    requests_total: int = 0
    models: frozenset[str] = frozenset()  # what its /v1/models lists (empty: not known yet)
    models_at: float = float("-inf")  # clock time they were last read
    adapters: dict[str, str] = field(default_factory=dict)  # of `models`, the LoRA adapters -> their parent
    loras: frozenset[str] = frozenset()  # adapters resident now (its last load report)
    lora_load_s: float = 0.0  # its adapter loads' mean duration, as it reported (0: not measured)
    role: str = BOTH  # prefill | decode | both, as its load reports say (balancer/handover.py)

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    @property
    def url(self) -> str:
        return self.spec.url


class Registry:
    def __init__(self, breaker: BreakerConfig, health: HealthConfig, clock: Callable[[], float],
                 in_transit_s: float = 0.0) -> None:
        if not in_transit_s >= 0:
            raise ValueError("in_transit_s must be >= 0 (seconds from a send to the replica's queue)")
        self.in_transit_s = in_transit_s
        self.breaker_cfg = breaker
        self.health_cfg = health
        self.clock = clock
        self._replicas: dict[str, ReplicaState] = {}
        self.on_change: list[Callable[[str, str], None]] = []  # (replica_id, what) listeners
        self._served: list[str] | None = None  # served_models(), until something changes
        self._roles: dict[str, str] | None = None  # roles(), until membership or a role changes
        # Some replica has a single role (prefill or decode): requests may go to a pair
        # (balancer/disagg.py). Kept as membership and roles change: read per request.
        self.disaggregated = False

    # ------------------------------------------------------------- membership
    def __iter__(self) -> Iterator[ReplicaState]:
        return iter(list(self._replicas.values()))

    def __len__(self) -> int:
        return len(self._replicas)

    def get(self, replica_id: str) -> ReplicaState | None:
        return self._replicas.get(replica_id)

    def add(self, spec: ReplicaSpec) -> ReplicaState:
        if spec.replica_id in self._replicas:
            raise ValueError(f"replica {spec.replica_id} is already registered")
        state = ReplicaState(spec, role=spec.role or BOTH)
        self._replicas[spec.replica_id] = state
        self._roles_changed()
        self._notify(spec.replica_id, "added")
        return state

    def remove(self, replica_id: str) -> ReplicaState | None:
        state = self._replicas.pop(replica_id, None)
        if state is not None:
            self._roles_changed()
            self._notify(replica_id, "removed")
        return state

    def drain(self, replica_id: str) -> ReplicaState:
        state = self._replicas[replica_id]
        state.draining = True
        self._notify(replica_id, "draining")
        return state

    def undrain(self, replica_id: str) -> ReplicaState:
        state = self._replicas[replica_id]
        state.draining = False
        self._notify(replica_id, "undrained")
        return state

    def _notify(self, replica_id: str, what: str) -> None:
        self._served = None  # membership, health or draining changed
        self._roles = None
        for fn in self.on_change:
            fn(replica_id, what)

    # ------------------------------------------------------------- who may take a request
    def usable(self, exclude: frozenset[str] = frozenset(), model: str | None = None) -> list[ReplicaState]:
        """The replicas that may take a request now (for `model`: those that serve it, or
        have not said yet what they serve)."""
        now = self.clock()
        out = []
        for r in self._replicas.values():
            if r.draining or not r.healthy or (exclude and r.spec.url in exclude):
                continue
            if model is not None and r.models and model not in r.models:
                continue
            if r.breaker is Breaker.OPEN:
                if now - r.breaker_opened_at < self.breaker_cfg.open_s:
                    continue
                r.breaker = Breaker.HALF_OPEN
                r.half_open_inflight = False
            if r.breaker is Breaker.HALF_OPEN and r.half_open_inflight:
                continue
            out.append(r)
        return out

    def views(self, replicas: Sequence[ReplicaState], cached_blocks: Callable[[str], int],
              shared_only: bool = False) -> list[ReplicaView]:
        """The policy's views of `replicas` (one clock read for all: this runs per request).

        `shared_only` (BalancerConfig.consistent_routing): views made only of what every
        balancer instance fed by the same replicas sees alike — the last load report, the
        index's cached blocks, the reported adapters. This instance's own bookkeeping is left
        out: nothing counts as sent since the report, and the requests and tokens in flight
        are the replica's reported ones (running + waiting; queued prefill + running decode
        tokens), zero before its first report."""
        now = self.clock()
        new = tuple.__new__  # every field given, in order: skips NamedTuple.__new__'s keyword handling
        out = []
        for r in replicas:
            load = r.load
            if load.age_s != _INF:
                load = new(ReplicaLoad, (*load[:-1], now - r.load_at))  # age_s is the last field
            rid = r.spec.url
            if shared_only:
                counts = (load.num_running + load.num_waiting,
                          load.queued_prefill_tokens + load.running_decode_tokens, 0, 0)
            else:
                counts = (r.inflight_requests, r.inflight_tokens, r.sent_since_report, r.sent_tokens_since_report)
            out.append(new(ReplicaView, (rid, *counts, load, cached_blocks(rid), r.loras, r.lora_load_s)))
        return out

    def served_models(self) -> list[str]:
        """Every model a healthy replica lists, sorted (several models may share one fleet).
        Kept between changes (membership, health, draining, a replica's list): asked per request."""
        if self._served is None:
            self._served = sorted({m for r in self._replicas.values() if r.healthy and not r.draining
                                   for m in r.models})
        return self._served

    def set_models(self, r: ReplicaState, models: frozenset[str], adapters: dict[str, str] | None = None) -> None:
        """What replica r's /v1/models lists now (`adapters`: those of them that are LoRA
        adapters -> the base model they apply to, their `parent` as vLLM lists them)."""
        r.models_at = self.clock()
        r.adapters = {name: parent for name, parent in (adapters or {}).items() if name in models}
        if models != r.models:
            r.models = models
            self._served = None

    def is_adapter(self, model: str | None) -> bool:
        """True if some replica lists `model` as a LoRA adapter."""
        return model is not None and self.adapter_parent(model) is not None

    def adapter_parent(self, model: str) -> str | None:
        """The base model of LoRA adapter `model`, as a replica lists it; None if none does."""
        for r in self._replicas.values():
            parent = r.adapters.get(model)
            if parent is not None:
                return parent
        return None

    def set_loras(self, replica_id: str, loras: frozenset[str], load_s: float) -> None:
        """The adapters replica_id reports resident, and its adapter loads' mean seconds."""
        r = self._replicas.get(replica_id)
        if r is not None:
            r.loras = loras
            if load_s > 0:
                r.lora_load_s = load_s

    def set_role(self, replica_id: str, role: str) -> bool:
        """The role replica_id reports (`kvfleet replica --role`); True when it changed. A role
        given in the replica's spec (`ROLE@URL`) wins: reports do not change it."""
        r = self._replicas.get(replica_id)
        if r is None or r.role == role or r.spec.role is not None:
            return False
        r.role = role
        self._roles_changed()
        return True

    def _roles_changed(self) -> None:
        self._roles = None
        self.disaggregated = any(r.role != "both" for r in self._replicas.values())

    def roles(self) -> dict[str, str]:
        """replica id -> role (balancer/disagg.py's input), kept between changes: asked per
        request. Do not modify it."""
        if self._roles is None:
            self._roles = {rid: r.role for rid, r in self._replicas.items()}
        return self._roles

    # ------------------------------------------------------------- bookkeeping
    def on_sent(self, r: ReplicaState, tokens: int, uncached_tokens: int) -> None:
        r.inflight_requests += 1
        r.inflight_tokens += tokens
        r.sent_since_report += 1
        r.sent_tokens_since_report += uncached_tokens
        r.sends.append((self.clock(), uncached_tokens))
        r.requests_total += 1
        if r.breaker is Breaker.HALF_OPEN:
            r.half_open_inflight = True

    def on_done(self, r: ReplicaState, tokens: int) -> None:
        r.inflight_requests -= 1
        r.inflight_tokens -= tokens

    def on_load(self, replica_id: str, load: ReplicaLoad, age_s: float = 0.0) -> None:
        """A load report made `age_s` ago (its time on the wire) arrived from replica_id."""
        r = self._replicas.get(replica_id)
        if r is None:
            return
        now = self.clock()
        r.load = load
        r.load_at = now
        # The sends that reached the replica's queue before the report was made are in it.
        cutoff = now - max(age_s, 0.0) - self.in_transit_s
        sends = r.sends
        while sends and sends[0][0] <= cutoff:
            sends.popleft()
        r.sent_since_report = len(sends)
        r.sent_tokens_since_report = sum(t for _, t in sends)

    def record_success(self, r: ReplicaState) -> None:
        r.consecutive_failures = 0
        if r.breaker is not Breaker.CLOSED:
            r.breaker = Breaker.CLOSED
            r.half_open_inflight = False
            self._notify(r.replica_id, "breaker_closed")

    def record_failure(self, r: ReplicaState, refused: bool) -> None:
        """A request to r failed: refused connection (opens at once) or 5xx / timeout / reset."""
        r.consecutive_failures += 1
        if refused or r.breaker is Breaker.HALF_OPEN or r.consecutive_failures >= self.breaker_cfg.failures_to_open:
            if r.breaker is not Breaker.OPEN:
                self._notify(r.replica_id, "breaker_open")
            r.breaker = Breaker.OPEN
            r.breaker_opened_at = self.clock()
            r.half_open_inflight = False

    def record_poll(self, r: ReplicaState, ok: bool) -> None:
        """An active health poll's outcome, with thresholds in both directions."""
        if ok:
            r.poll_failures = 0
            r.poll_successes += 1
            if not r.healthy and r.poll_successes >= self.health_cfg.healthy_after:
                r.healthy = True
                self._notify(r.replica_id, "healthy")
            if r.healthy and r.breaker is Breaker.OPEN:
                # The replica answers again: let a trial request through now.
                r.breaker = Breaker.HALF_OPEN
                r.half_open_inflight = False
        else:
            r.poll_successes = 0
            r.poll_failures += 1
            if r.healthy and r.poll_failures >= self.health_cfg.unhealthy_after:
                r.healthy = False
                self._notify(r.replica_id, "unhealthy")

