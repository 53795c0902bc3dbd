"""least_request: the replica with the fewest requests this balancer has in flight on it.

Ties go to the fewer in-flight tokens (prompt + predicted output), then are drawn with
`request.rng()` (seeded from the request's content): the same request and views always give the
same replica, and an idle fleet is not filled lowest-id first. Same rule as KubeAI's LeastLoad
strategy (internal/loadbalancer/balance_least_load.go: fewest in-flight requests; its ties fall
to Go's random map order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


def least_request_key(view: ReplicaView) -> tuple[int, int]:
    return (view.inflight_requests, view.inflight_tokens)


@dataclass(frozen=True, slots=True)
class LeastRequestConfig:
    """least_request has no settings."""


class LeastRequestPolicy(Policy):
    name: ClassVar[str] = "least_request"
    Config: ClassVar[type] = LeastRequestConfig

    def __init__(self, config: LeastRequestConfig | None = None) -> None:
        self.config = config or LeastRequestConfig()

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        low = min(least_request_key(r) for r in replicas)
        tied = sorted((r for r in replicas if least_request_key(r) == low), key=lambda r: r.replica_id)
        best = tied[0] if len(tied) == 1 else request.rng().choice(tied)
        scores = {
            r.replica_id: {"inflight_requests": float(r.inflight_requests), "inflight_tokens": float(r.inflight_tokens)}
            for r in replicas
        }
        return Decision(
            replica_id=best.replica_id,
            reason=f"fewest in-flight requests ({best.inflight_requests})",
            scores=scores,
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
