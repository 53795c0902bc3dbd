"""precise_prefix: the replica holding the longest exact cached prefix, by the prefix index.

Pure longest-prefix routing on `request.matched_blocks` (fed by the replicas' KV events): the most
leading blocks wins; ties, and misses (no replica holds the first block), go to the least loaded:
fewest requests in flight at this balancer, then the least queued prefill (reported queued prompt
tokens plus the uncached tokens sent since that report); a remaining tie is drawn with
`request.rng()`.

Only device (GPU) blocks count: a lower-tier hit (`request.offloaded_blocks`) is ignored, as a
prefix router that knows no tiers ignores it.

This is the baseline that design §8's first failure mode is about: a prefix every request shares
(a system prompt) sends everything to whichever replica cached it first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


@dataclass(frozen=True, slots=True)
class PrecisePrefixConfig:
    """precise_prefix has no settings."""


def queued_prefill_tokens(view: ReplicaView) -> int:
    return view.load.queued_prefill_tokens + view.sent_tokens_since_report


class PrecisePrefixPolicy(Policy):
    name: ClassVar[str] = "precise_prefix"
    Config: ClassVar[type] = PrecisePrefixConfig

    def __init__(self, config: PrecisePrefixConfig | None = None) -> None:
        self.config = config or PrecisePrefixConfig()

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        matched = {r.replica_id: request.matched_blocks.get(r.replica_id, 0) for r in ordered}
        key = {r.replica_id: (-matched[r.replica_id], r.inflight_requests, queued_prefill_tokens(r)) for r in ordered}
        best_key = min(key.values())
        tied = [rid for rid in key if key[rid] == best_key]
        chosen = tied[0] if len(tied) == 1 else request.rng().choice(tied)

        def reason() -> str:
            longest = matched[chosen]
            holders = sum(1 for m in matched.values() if m == longest)
            if longest == 0:
                return "no replica holds the first block: least loaded"
            if holders > 1:
                return f"{holders} replicas hold {longest} blocks: the least loaded of them"
            return f"longest cached prefix: {longest} of {len(request.block_hashes)} blocks"

        def scores() -> dict[str, dict[str, float]]:
            return {
                r.replica_id: {
                    "matched_blocks": float(matched[r.replica_id]),
                    "inflight_requests": float(r.inflight_requests),
                    "queued_prefill_tokens": float(queued_prefill_tokens(r)),
                }
                for r in ordered
            }

        # The explanation is built only when read (explain, tests): not on every routed request.
        return Decision(replica_id=chosen, reason=reason, scores=scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
