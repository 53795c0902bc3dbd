"""The balancer's Prometheus metrics, on the app's own registry.

Names follow Prometheus conventions: `kvfleet_` prefix, base units in the name (`_seconds`,
`_tokens`), `_total` on counters, label sets bounded by the fleet (replica, policy, status
class, reason).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3)


class BalancerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvfleet_requests", "Requests answered, by serving replica, policy and status code class.",
                                ("replica", "policy", "status"), registry=r)
        self.ttft = Histogram("kvfleet_time_to_first_token_seconds", "Time from request arrival to the first byte relayed.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvfleet_e2e_request_latency_seconds", "Time from request arrival to the end of the response.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.decision = Histogram("kvfleet_routing_decision_seconds", "Time to tokenize, hash, look up and score one request.",
                                  buckets=DECISION_BUCKETS, registry=r)
        self.predicted_cached = Counter("kvfleet_predicted_cached_tokens", "Prompt tokens the index said the chosen replica holds.",
                                        ("replica",), registry=r)
        self.reported_cached = Counter("kvfleet_reported_cached_tokens", "Prompt tokens the replica reported as cached (usage).",
                                       ("replica",), registry=r)
        self.prompt_tokens = Counter("kvfleet_prompt_tokens", "Prompt tokens routed.", ("replica",), registry=r)
        self.retries = Counter("kvfleet_retries", "Requests retried on another replica before the first byte.", ("replica",), registry=r)
        self.failovers = Counter("kvfleet_failovers", "Streams continued on another replica after their replica was lost.",
                                 ("replica",), registry=r)
        self.failover_errors = Counter("kvfleet_failover_errors", "Streams that ended with an error because no replica could continue them.",
                                       registry=r)
        self.no_replica = Counter("kvfleet_no_replica", "Requests refused because no replica was usable.", registry=r)
        self.breaker_state = Gauge("kvfleet_replica_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", ("replica",), registry=r)
        self.healthy = Gauge("kvfleet_replica_healthy", "1 if the replica passes health checks.", ("replica",), registry=r)
        self.inflight = Gauge("kvfleet_replica_inflight_requests", "Requests in flight at this balancer, per replica.", ("replica",), registry=r)
        self.resyncs = Counter("kvfleet_kv_resyncs", "KV-index resynchronisations, by replica and reason.", ("replica", "reason"), registry=r)
        self.kv_events = Counter("kvfleet_kv_events", "KV events applied to the prefix index.", ("replica",), registry=r)
        self.indexed_blocks = Gauge("kvfleet_indexed_blocks", "Blocks the prefix index holds per replica.", ("replica",), registry=r)

    def forget_replica(self, replica_id: str) -> None:
        for metric in (self.breaker_state, self.healthy, self.inflight, self.indexed_blocks):
            try:
                metric.remove(replica_id)
            except KeyError:
                pass
