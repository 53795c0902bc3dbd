"""round_robin: replicas in turn, in natural id order ("r2" before "r10").

The cursor is the id of the replica the last request was routed to; it moves only in
`on_routed`, so `explain` never advances it. `select` returns the first candidate after the
cursor in the id order, wrapping around, so a replica missing from the candidate list (unhealthy,
draining) is simply skipped and the turn goes to the next one; a replica that comes back takes its
old place in the order. Same shape as SGLang's round robin (sgl-router/src/policies/round_robin.rs:
a counter over the healthy workers), but keyed by id so that a change in the candidate set does
not reshuffle whose turn it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest

_DIGITS = re.compile(r"(\d+)")


def natural_key(replica_id: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the digit runs of an id numerically: replica-2 < replica-10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(replica_id) if part)


def next_in_turn(cursor: str | None, replica_ids: Sequence[str]) -> str:
    """The first id after `cursor` in natural order among `replica_ids`, wrapping around.

    `cursor` need not be among `replica_ids` (that replica is skipped). Pure.
    """
    keyed = sorted((natural_key(rid), rid) for rid in replica_ids)
    if cursor is not None:
        after = natural_key(cursor)
        for key, rid in keyed:
            if key > after:
                return rid
    return keyed[0][1]


@dataclass(frozen=True, slots=True)
class RoundRobinConfig:
    """round_robin has no settings."""


class RoundRobinPolicy(Policy):
    name: ClassVar[str] = "round_robin"
    Config: ClassVar[type] = RoundRobinConfig

    def __init__(self, config: RoundRobinConfig | None = None) -> None:
        self.config = config or RoundRobinConfig()
        self._cursor: str | None = None  # id of the replica the last routed request went to

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        ids = [r.replica_id for r in replicas]
        chosen = next_in_turn(self._cursor, ids)
        order = [rid for _, rid in sorted((natural_key(rid), rid) for rid in ids)]
        start = order.index(chosen)
        # turns_away: 0 for the chosen replica, 1 for the one after it, ...
        scores = {rid: {"turns_away": float((i - start) % len(order))} for i, rid in enumerate(order)}
        after = "the first in id order" if self._cursor is None else f"the next after {self._cursor}"
        return Decision(replica_id=chosen, reason=f"round robin: {chosen} is {after}", scores=scores)

    def on_routed(self, request: RoutingRequest, decision: Decision) -> None:
        self._cursor = decision.replica_id

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config), "cursor": self._cursor}
