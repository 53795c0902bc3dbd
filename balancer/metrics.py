"""The balancer's Prometheus metrics, on the app's own registry.

Conventions (https://prometheus.io/docs/practices/naming/, checked by `promtool check metrics`
in tests/test_observability_prometheus.py):
- `kvfleet_` prefix; base units in the name (`_seconds`, `_tokens`); counters end in `_total`
  (written out here, so the name in the code is the name in PromQL and the dashboards).
- Label sets bounded by the fleet: `replica` (the replica's URL), `policy` (one per process),
  `status` (a class: 2xx, 4xx, 5xx), `reason` (a fixed set of resync causes).
- Every per-replica series is created when the replica joins (so a dashboard shows 0, not "no
  data", for a replica that never failed) and removed when it leaves (`forget_replica`), so a
  fleet whose replicas come and go does not grow the balancer's series without bound.

What a fleet overview reads here: request rate (`kvfleet_requests_total`), TTFT and E2E
histograms, routing decision latency, predicted vs reported cached tokens over prompt tokens
(and per request: histograms, the share of requests where the index said hit and the engine
said miss),
per-replica in-flight, health and circuit state, retries, failovers and KV-index resyncs.

The series every proxied request updates (requests, TTFT / E2E / decision histograms, token
counts, the decision audit's, in-flight, LoRA routing) are `balancer/plain_series.py`'s plain
numbers, exported at scrape time under the same names; the rest (health, failures, KV events,
digests, disaggregation) change a few times a second at most and stay prometheus_client's.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from balancer.plain_series import PlainCounter, PlainGauge, PlainHistogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3)
TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
NO_REPLICA = "none"  # the `replica` label of requests that no replica answered
DISAGG_OUTCOMES = ("disaggregated", "unified", "fallback_prefill", "fallback_decode", "fallback_no_pair")


class BalancerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = PlainCounter(
            "kvfleet_requests_total",
            "Requests answered, by serving replica (`none` when no replica could answer), policy and status "
            "code class.", ("replica", "policy", "status"), registry=r)
        self.ttft = PlainHistogram("kvfleet_time_to_first_token_seconds",
                                   "Time from request arrival to the first byte relayed to the client.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = PlainHistogram("kvfleet_e2e_request_latency_seconds",
                                  "Time from request arrival to the end of the response.",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.decision = PlainHistogram("kvfleet_routing_decision_seconds",
                                       "Time to tokenize, hash, look up and score one request.",
                                       buckets=DECISION_BUCKETS, registry=r)
        self.predicted_cached = PlainCounter("kvfleet_predicted_cached_tokens_total",
                                             "Prompt tokens the prefix index said the chosen replica holds.",
                                             ("replica",), registry=r)
        self.reported_cached = PlainCounter(
            "kvfleet_reported_cached_tokens_total",
            "Prompt tokens the replica reported as cached (usage.prompt_tokens_details).",
            ("replica",), registry=r)
        self.prompt_tokens = PlainCounter("kvfleet_prompt_tokens_total", "Prompt tokens routed to the replica.",
                                          ("replica",), registry=r)
        # Decision accounting (balancer/audit.py): per request whose replica reported its cached tokens.
        self.predicted_cached_hist = PlainHistogram("kvfleet_request_predicted_cached_tokens",
                                                    "Cached prompt tokens the prefix index predicted on the chosen "
                                                    "replica, per request the replica reported on.", ("replica",),
                                                    buckets=TOKEN_BUCKETS, registry=r)
        self.delivered_cached_hist = PlainHistogram("kvfleet_request_delivered_cached_tokens",
                                                    "Cached prompt tokens the replica reported for the request "
                                                    "(usage.prompt_tokens_details.cached_tokens).", ("replica",),
                                                    buckets=TOKEN_BUCKETS, registry=r)
        self.cache_accounted = PlainCounter("kvfleet_cache_accounted_requests_total",
                                            "Requests whose replica reported its cached tokens (the mismatch share's "
                                            "denominator).", ("replica",), registry=r)
        self.cache_mismatch = PlainCounter(
            "kvfleet_cache_mismatch_total",
            "Requests where the index predicted a cached prefix and the replica delivered "
            "less than the audit's ratio of it (index said hit, engine said miss).",
            ("replica",), registry=r)
        self.cache_unseen = PlainCounter(
            "kvfleet_cache_unseen_total",
            "Requests where the replica delivered a cached prefix the index did not predict "
            "(engine said hit, index said miss: the index does not see the replica's blocks).",
            ("replica",), registry=r)
        self.retries = Counter("kvfleet_retries_total",
                               "Attempts that failed before the first byte, by the replica that failed (the request "
                               "goes on to another replica while attempts are left).", ("replica",), registry=r)
        self.failovers = Counter("kvfleet_failovers_total",
                                 "Streams continued on another replica after this replica was lost mid-stream.",
                                 ("replica",), registry=r)
        self.failover_errors = Counter("kvfleet_failover_errors_total",
                                       "Streams that ended with an error because no replica could continue them.",
                                       registry=r)
        self.no_replica = Counter("kvfleet_no_replica_total", "Requests refused (503) because no replica was usable.",
                                  registry=r)
        self.breaker_state = Gauge("kvfleet_replica_circuit_state",
                                   "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ("replica",), registry=r)
        self.healthy = Gauge("kvfleet_replica_healthy", "1 if the replica passes health checks, else 0.",
                             ("replica",), registry=r)
        self.inflight = PlainGauge("kvfleet_replica_inflight_requests",
                                   "Requests in flight at this balancer, per replica.",
                                   ("replica",), registry=r)
        self.resyncs = Counter("kvfleet_kv_resyncs_total",
                               "Prefix-index resynchronisations from a replica's KV-event snapshot, by reason.",
                               ("replica", "reason"), registry=r)
        self.kv_events = Counter("kvfleet_kv_events_total", "KV events applied to the prefix index.",
                                 ("replica",), registry=r)
        self.indexed_blocks = Gauge("kvfleet_indexed_blocks", "KV blocks the prefix index holds for the replica.",
                                    ("replica",), registry=r)
        # LoRA-aware routing: a request naming an adapter went to a replica that held it resident
        # ("resident") or to one that must load it first ("load"); "unserved": its `model` is
        # served by no replica (404).
        self.lora_routed = PlainCounter(
            "kvfleet_lora_routed_total",
            "Requests naming a LoRA adapter, by where they went: resident, load, unserved (404).",
            ("outcome",), registry=r)
        for outcome in ("resident", "load", "unserved"):
            self.lora_routed.labels(outcome)
        self.replica_loras = Gauge("kvfleet_replica_lora_adapters",
                                   "LoRA adapters the replica reports resident.", ("replica",), registry=r)
        # --- compact cache digests (issue #17 part 2; balancer/digest_feed.py, digest_index.py) ---
        self.digests_received = Counter("kvfleet_digest_received_total",
                                        "Cache digests received from the replica (periodic and on request).",
                                        ("replica",), registry=r)
        self.digest_age = Gauge("kvfleet_digest_age_seconds",
                                "Seconds since the replica's latest cache digest arrived (-1: none yet).",
                                ("replica",), registry=r)
        self.digest_bytes = Gauge("kvfleet_digest_size_bytes", "Size on the wire of the replica's latest cache digest.",
                                  ("replica",), registry=r)
        self.digest_blocks = Gauge("kvfleet_digest_blocks",
                                   "KV blocks the replica held when it took its latest cache digest.",
                                   ("replica",), registry=r)
        self.digest_in_use = Gauge("kvfleet_digest_in_use",
                                   "1 while prefix matching for the replica reads its cache digest instead of the "
                                   "event index (index_source digests, or both before the event index is exact).",
                                   ("replica",), registry=r)
        # --- end of cache digests ---
        self.warmups = Counter("kvfleet_warmups_total",
                               "Prefill-only warm-up requests the policy asked for (a prompt prefix computed on a second "
                               "replica ahead of demand: predictive's `replicate`), by outcome: ok, refused (an HTTP "
                               "error), failed (no answer, or cancelled at shutdown).",
                               ("outcome",), registry=r)
        for outcome in ("ok", "refused", "failed"):
            self.warmups.labels(outcome)
        # --- prefill/decode disaggregation (balancer/handover.py) ---
        self.disagg = Counter("kvfleet_disagg_requests_total",
                              "Requests for a prefill/decode pair, by outcome: disaggregated (served by the pair), unified (the "
                              "pair selector kept it whole on one `both` replica), "
                              "fallback_prefill / fallback_decode (that member failed; served by one replica), fallback_no_pair (the "
                              "fleet has prefill/decode replicas but no usable pair now).",
                              ("outcome",), registry=r)
        for outcome in DISAGG_OUTCOMES:
            self.disagg.labels(outcome)
        self.disagg_prefill = Histogram("kvfleet_disagg_prefill_seconds",
                                        "Time of a disaggregated request's prefill leg (sent to the prefill replica "
                                        "until its kv_transfer_params are back).", buckets=LATENCY_BUCKETS, registry=r)
        self.replica_role = Gauge("kvfleet_replica_role_info",
                                  "1 for the role the replica reports (prefill, decode or both).", ("replica", "role"),
                                  registry=r)
        # (metric, label values) -> child: `labels()` costs a few µs (lock, tuple, dict), and the
        # request path touches five series per request.
        self._children: dict[tuple, object] = {}
        self._per_replica = (self.predicted_cached, self.reported_cached, self.prompt_tokens, self.predicted_cached_hist,
                             self.delivered_cached_hist, self.cache_accounted, self.cache_mismatch, self.cache_unseen,
                             self.retries,
                             self.failovers, self.breaker_state, self.healthy, self.inflight, self.kv_events,
                             self.indexed_blocks, self.replica_loras, self.digests_received, self.digest_age,
                             self.digest_bytes, self.digest_blocks, self.digest_in_use)

    def add_replica(self, replica_id: str, healthy: bool = True) -> None:
        """Create the replica's series at zero, so that every panel has data from the start."""
        for metric in self._per_replica:
            metric.labels(replica_id)
        self.healthy.labels(replica_id).set(1 if healthy else 0)
        self.digest_age.labels(replica_id).set(-1.0)  # no digest yet (or none followed)

    def series(self, metric, *labels: str):
        """`metric.labels(*labels)`, cached (forget_replica drops a replica's entries)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def forget_replica(self, replica_id: str) -> None:
        """Drop every series labelled with the replica (it left the fleet)."""
        for key in [k for k in self._children if k[1] and k[1][0] == replica_id]:
            del self._children[key]
        for metric in self._per_replica:
            try:
                metric.remove(replica_id)
            except KeyError:
                pass
        for metric, names in ((self.requests, ("replica", "policy", "status")), (self.resyncs, ("replica", "reason")),
                              (self.replica_role, ("replica", "role"))):
            for values in _children_of(metric, names, replica_id):
                metric.remove(*values)


class SessionCollector:
    """Sticky sessions' series (balancer/sessions.py), read from the session table at scrape
    time: the table keeps plain counts (the simulator runs it without Prometheus)."""

    def __init__(self, sessions, clock: Callable[[], float]) -> None:
        self.sessions, self.clock = sessions, clock

    def collect(self):
        s = self.sessions
        routed = CounterMetricFamily("kvfleet_session_routed", "Requests with a session key routed, by outcome: "
                                     "new (no home known), stuck (kept on its home), followed (another replica "
                                     "holds more of it: moved by another balancer), moved_overloaded, moved_gone.",
                                     labels=("outcome",))
        for outcome, n in s.routed.items():
            routed.add_metric((outcome,), n)
        ended = CounterMetricFamily("kvfleet_sessions_ended", "Sessions forgotten, by reason: expired (unused for "
                                    "the TTL), released (DELETE /admin/sessions), evicted (over max_sessions).",
                                    labels=("reason",))
        for reason, n in s.ended.items():
            ended.add_metric((reason,), n)
        yield routed
        yield ended
        yield GaugeMetricFamily("kvfleet_sessions_active", "Sessions with a remembered home (used within the TTL).",
                                value=s.active(self.clock()))


def _children_of(metric, names: tuple[str, ...], replica_id: str) -> set[tuple[str, ...]]:
    """Label values (in `names` order) of the children of `metric` that belong to `replica_id`."""
    return {tuple(s.labels[n] for n in names)
            for fam in metric.collect() for s in fam.samples if s.labels.get("replica") == replica_id}
