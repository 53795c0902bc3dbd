"""power_of_two: draw two distinct replicas at random, send to the one with fewer in flight.

As SGLang's router (sgl-router/src/policies/power_of_two.rs): `choose_multiple(rng, 2)`, then
`if load1 <= load2 { first } else { second }` — a tie goes to the first one drawn. Load is the
number of requests this balancer has in flight on the replica. The draw comes from
`request.rng()` over the candidates sorted by id, so it is reproducible across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


@dataclass(frozen=True, slots=True)
class PowerOfTwoConfig:
    """power_of_two has no settings."""


class PowerOfTwoPolicy(Policy):
    name: ClassVar[str] = "power_of_two"
    Config: ClassVar[type] = PowerOfTwoConfig

    def __init__(self, config: PowerOfTwoConfig | None = None) -> None:
        self.config = config or PowerOfTwoConfig()

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        scores = {r.replica_id: {"inflight_requests": float(r.inflight_requests), "drawn": 0.0} for r in ordered}
        if len(ordered) == 1:
            only = ordered[0]
            scores[only.replica_id]["drawn"] = 1.0
            return Decision(replica_id=only.replica_id, reason="only one replica", scores=scores)
        first, second = request.rng().sample(ordered, 2)
        scores[first.replica_id]["drawn"] = 1.0
        scores[second.replica_id]["drawn"] = 2.0
        chosen = first if first.inflight_requests <= second.inflight_requests else second
        return Decision(
            replica_id=chosen.replica_id,
            reason=(
                f"drew {first.replica_id} ({first.inflight_requests} in flight) and "
                f"{second.replica_id} ({second.inflight_requests} in flight); took the less loaded"
            ),
            scores=scores,
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
