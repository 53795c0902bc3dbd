"""dynamo_kv: NVIDIA Dynamo's KV router cost, `overlap_score_weight * prefill_blocks + decode_blocks`.

Source: ai-dynamo/dynamo, lib/llm/src/kv_router/scheduler.rs (`DefaultWorkerSelector`,
`softmax_sample`), lib/llm/src/kv_router/sequence.rs (`potential_blocks_and_tokens`,
`new_tokens`), lib/llm/src/kv_router/config.rs (`KvRouterConfig::default`); later moved to
lib/kv-router/src/scheduling/selector.rs. Facts carried over:

- Per worker, prefill tokens = the worker's active (not yet prefilled) prompt tokens + this
  request's new tokens, new = isl - overlap_blocks * block_size (clamped at 0);
  prefill_blocks = prefill_tokens / block_size (a float).
- decode_blocks = the KV blocks active on the worker (Dynamo counts them from the requests it
  routed; here from the replica's report plus what this balancer sent since).
- logit = overlap_score_weight * prefill_blocks + decode_blocks; lower is better.
- temperature 0: argmin; ties go to the worker with the smaller cache (the indexer's tree size),
  then at random. temperature > 0: softmax over the negated logits rescaled to the logit range,
  p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T)), uniform when all are equal.

Mapping to kvfleet's views: overlap = request.matched_blocks (the prefix index); active prefill =
load.queued_prefill_tokens + sent_tokens_since_report; active decode blocks =
(load.running_decode_tokens + sent_tokens_since_report) / block_size; cache size =
ReplicaView.cached_blocks. Dynamo also adds, to decode_blocks, this request's blocks that are not
already active on the worker; the balancer cannot see per-request active blocks, and adding the
same amount to every replica would change neither the argmin nor the softmax, so it is left out.
With no queued prefill the prefill term is exactly the documented (isl - overlap * bs) / bs.

Lower KV tiers (Dynamo's tiered lookup, lib/kv-router/src/scheduling/: `cache_hit_estimates_
from_tiered_matches`): the device overlap is followed by the blocks that continue the chain in
host memory (then disk), and the effective overlap is device + host_cache_hit_weight × host
(+ disk_cache_hit_weight × disk); KvRouterConfig's defaults (lib/kv-router/src/config.rs,
`--router-host-cache-hit-weight`, `--router-disk-cache-hit-weight`) are 0.75 for host memory
and 0.25 for disk. Here the lower-tier hit is `request.offloaded_blocks` (PrefixIndex.
match_offloaded), of which `request.offloaded_disk_blocks` are held on disk only (match_disk:
medium "STORAGE", vLLM's and Dynamo's disk tier, or another spelling Dynamo's
`StorageTier::from_kv_medium` reads as disk or external storage, both credited at the disk's
weight there); the rest are credited as host memory, as is a lower medium no alias names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


@dataclass(frozen=True, slots=True)
class DynamoKvConfig:
    # KvRouterConfig::default().overlap_score_weight = 1.0 (lib/llm/src/kv_router/config.rs;
    # `--kv-overlap-score-weight`, "Defaults to 1").
    overlap_score_weight: float = 1.0
    # KvRouterConfig::default().router_temperature = 0.0 (`--router-temperature`).
    router_temperature: float = 0.0
    # KvRouterConfig::default().host_cache_hit_weight = 0.75 (lib/kv-router/src/config.rs,
    # `default_host_cache_hit_weight`): a block in host memory counts as 0.75 of a device one.
    host_cache_hit_weight: float = 0.75
    # KvRouterConfig::default().disk_cache_hit_weight = 0.25 (lib/kv-router/src/config.rs,
    # `default_disk_cache_hit_weight`; `--router-disk-cache-hit-weight`): a block on disk (or
    # other lower-tier storage) counts as 0.25 of a device one.
    disk_cache_hit_weight: float = 0.25

    def __post_init__(self) -> None:
        for field_name in ("overlap_score_weight", "router_temperature", "host_cache_hit_weight",
                           "disk_cache_hit_weight"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0 or math.isinf(value):
                raise ValueError(f"{field_name} must be a finite number >= 0, got {value!r}")


def replica_cost(
    view: ReplicaView, request: RoutingRequest, overlap_weight: float, host_weight: float = 0.75,
    disk_weight: float = 0.25,
) -> dict[str, float]:
    """Dynamo's logit for one replica, with its terms. Pure."""
    bs = max(1, request.block_size)
    rid = view.replica_id
    overlap = request.matched_blocks.get(rid, 0)
    offloaded = request.offloaded_blocks.get(rid, 0)
    if offloaded:  # effective overlap blocks (a float, as Dynamo's)
        on_disk = min(request.offloaded_disk_blocks.get(rid, 0), offloaded)
        overlap += host_weight * (offloaded - on_disk) + disk_weight * on_disk
    new_tokens = max(0, request.prompt_tokens - overlap * bs)
    active_prefill = view.load.queued_prefill_tokens + view.sent_tokens_since_report
    prefill_blocks = (new_tokens + active_prefill) / bs
    decode_blocks = (view.load.running_decode_tokens + view.sent_tokens_since_report) / bs
    return {
        "overlap_blocks": float(overlap),
        "new_prefill_tokens": float(new_tokens),
        "prefill_blocks": prefill_blocks,
        "decode_blocks": decode_blocks,
        "cost": overlap_weight * prefill_blocks + decode_blocks,
        "cached_blocks": float(view.cached_blocks),
    }


def softmax_probabilities(costs: Sequence[float], temperature: float) -> list[float]:
    """Dynamo's softmax_sample weights over costs (lower cost, higher probability). Pure."""
    lo, hi = min(costs), max(costs)
    if lo == hi:
        return [1.0 / len(costs)] * len(costs)
    scale = (hi - lo) * temperature
    weights = [math.exp(-(c - lo) / scale) for c in costs]
    total = sum(weights)
    return [w / total for w in weights]


class DynamoKvPolicy(Policy):
    name: ClassVar[str] = "dynamo_kv"
    Config: ClassVar[type] = DynamoKvConfig

    def __init__(self, config: DynamoKvConfig | None = None) -> None:
        self.config = config or DynamoKvConfig()

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        cfg = self.config
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        scores = {r.replica_id: replica_cost(r, request, cfg.overlap_score_weight, cfg.host_cache_hit_weight,
                                             cfg.disk_cache_hit_weight)
                  for r in ordered}
        ids = [r.replica_id for r in ordered]
        costs = [scores[rid]["cost"] for rid in ids]
        rng = request.rng()

        if cfg.router_temperature == 0.0:
            best = min(costs)
            tied = [rid for rid in ids if scores[rid]["cost"] == best]
            smallest = min(scores[rid]["cached_blocks"] for rid in tied)
            tied = [rid for rid in tied if scores[rid]["cached_blocks"] == smallest]
            chosen = tied[0] if len(tied) == 1 else rng.choice(tied)
            reason = f"lowest cost {best:.3f} = {cfg.overlap_score_weight} x prefill_blocks + decode_blocks"
            if len(tied) > 1:
                reason += f" (tied with {len(tied) - 1} others; random among the smallest caches)"
        else:
            probs = softmax_probabilities(costs, cfg.router_temperature)
            sample = rng.random()
            chosen, cumulative = ids[-1], 0.0
            for rid, p in zip(ids, probs):
                cumulative += p
                if sample <= cumulative:
                    chosen = rid
                    break
            for rid, p in zip(ids, probs):
                scores[rid]["probability"] = p
            reason = (
                f"softmax sample at temperature {cfg.router_temperature}: cost {scores[chosen]['cost']:.3f}, "
                f"p={scores[chosen]['probability']:.3f}"
            )
        return Decision(replica_id=chosen, reason=reason, scores=scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
