"""random: a uniform choice among the candidates.

The draw comes from `request.rng()`, which is seeded from the request's content, so two balancer
processes (or `explain` and the real send) pick the same replica for the same request and
candidates. Candidates are sorted by id first so that the order the balancer lists them in does
not matter. (SGLang's random policy, sgl-router/src/policies/random.rs, draws from a thread rng.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


@dataclass(frozen=True, slots=True)
class RandomConfig:
    """random has no settings."""


class RandomPolicy(Policy):
    name: ClassVar[str] = "random"
    Config: ClassVar[type] = RandomConfig

    def __init__(self, config: RandomConfig | None = None) -> None:
        self.config = config or RandomConfig()

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        ids = sorted(r.replica_id for r in replicas)
        chosen = request.rng().choice(ids)
        p = 1.0 / len(ids)
        return Decision(
            replica_id=chosen,
            reason=f"uniform random draw among {len(ids)} replicas",
            scores={rid: {"probability": p} for rid in ids},
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
