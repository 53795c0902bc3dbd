"""llmd_scorer: llm-d's endpoint picker (EPP) default scheduling profile, a weighted sum of scorers.

Sources: llm-d deploys the Gateway API Inference Extension EPP (kubernetes-sigs/
gateway-api-inference-extension); its chart's default profile
(config/charts/inferencepool/templates/epp-config.yaml, `default-plugins.yaml`) is
queue-scorer weight 2, kv-cache-utilization-scorer weight 2, prefix-cache-scorer weight 3, with
the max-score picker; llm-d's inference-scheduling guide uses the same 3/2/2. Scorers
(pkg/epp/scheduling/framework/plugins/...):

- prefix-cache-scorer: matched blocks / total blocks of the prompt (0 when the prompt has no full
  block). Here the match comes from the prefix index (`request.matched_blocks`), i.e. llm-d's
  precise-prefix-cache-scorer flavour rather than its approximate one.
- Lower KV tiers (llm-d-kv-cache, pkg/kvcache/kvblock_scorer.go `LongestPrefixScorer`, and
  pkg/kvcache/backend.go `DefaultKVCacheBackendConfig`): the consecutive match runs across
  media, each block weighted by the best medium the pod holds it in (the medium lowercased):
  gpu 1.0, cpu 0.8, and "storage" 0.3 ("covers the vLLM tiering offload", vLLM's disk-backed
  tier, medium "STORAGE"). Here the blocks after the device prefix that continue the chain in a
  lower tier (`request.offloaded_blocks`) count `cpu_weight` each, but those on disk only
  (`request.offloaded_disk_blocks`) `storage_weight`: prefix = (device + 0.8 × host + 0.3 ×
  disk) / total. (A block past a gap in the device prefix that the GPU holds too counts 0.8 here,
  1.0 there; a medium llm-d has no weight for is ignored there, weighted as host memory here, or
  as storage for the spellings protocol.events.canonical_medium reads as disk.)
- queue-scorer (scorer/queue.go): (max_q - q) / (max_q - min_q) over the candidates, 1.0 for
  all when they are equal; q = the waiting-queue size. Here q = the replica's last reported
  num_waiting plus the requests this balancer sent it since that report.
- kv-cache-utilization-scorer (scorer/kvcache_utilization.go): 1 - KV-cache usage (as reported).
- The profile's score is sum(weight * score); the max-score picker shuffles the candidates and
  sorts by score (picker/max_score_picker.go: "Shuffle in-place - needed for random tie break"),
  so exact ties are broken at random — here with `request.rng()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


@dataclass(frozen=True, slots=True)
class LlmdScorerConfig:
    # epp-config.yaml default-plugins.yaml: prefix-cache-scorer weight 3.
    prefix_weight: float = 3.0
    # queue-scorer weight 2.
    queue_weight: float = 2.0
    # kv-cache-utilization-scorer weight 2.
    kv_cache_weight: float = 2.0
    # llm-d-kv-cache DefaultKVCacheBackendConfig: {gpu: 1.0, cpu: 0.8}: the weight of a prefix
    # block held in host memory rather than on the GPU.
    cpu_weight: float = 0.8
    # DefaultKVCacheBackendConfig {storage: 0.3}: a block held on disk only (vLLM's "STORAGE").
    storage_weight: float = 0.3

    def __post_init__(self) -> None:
        for field_name in ("prefix_weight", "queue_weight", "kv_cache_weight", "cpu_weight", "storage_weight"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < float("inf"):
                raise ValueError(f"{field_name} must be a finite number >= 0, got {value!r}")
        if self.prefix_weight + self.queue_weight + self.kv_cache_weight == 0:
            raise ValueError("at least one scorer weight must be positive")


def prefix_scores(request: RoutingRequest, replica_ids: Sequence[str], cpu_weight: float = 0.8,
                  storage_weight: float = 0.3) -> dict[str, float]:
    total = len(request.block_hashes)
    if total == 0:
        return {rid: 0.0 for rid in replica_ids}
    matched, lower, disk = request.matched_blocks, request.offloaded_blocks, request.offloaded_disk_blocks
    if not lower:
        return {rid: min(matched.get(rid, 0), total) / total for rid in replica_ids}
    out = {}
    for rid in replica_ids:
        n_lower = lower.get(rid, 0)
        n_disk = min(disk.get(rid, 0), n_lower)
        out[rid] = min(matched.get(rid, 0) + cpu_weight * (n_lower - n_disk) + storage_weight * n_disk, total) / total
    return out


def queue_scores(queues: dict[str, int]) -> dict[str, float]:
    lo, hi = min(queues.values()), max(queues.values())
    if lo == hi:
        return {rid: 1.0 for rid in queues}
    return {rid: (hi - q) / (hi - lo) for rid, q in queues.items()}


def waiting_queue(view: ReplicaView) -> int:
    return view.load.num_waiting + view.sent_since_report


class LlmdScorerPolicy(Policy):
    name: ClassVar[str] = "llmd_scorer"
    Config: ClassVar[type] = LlmdScorerConfig

    def __init__(self, config: LlmdScorerConfig | None = None) -> None:
        self.config = config or LlmdScorerConfig()

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        cfg = self.config
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        ids = [r.replica_id for r in ordered]
        prefix = prefix_scores(request, ids, cfg.cpu_weight, cfg.storage_weight)
        queues = {r.replica_id: waiting_queue(r) for r in ordered}
        queue = queue_scores(queues)
        kv = {r.replica_id: 1.0 - r.load.kv_usage for r in ordered}

        scores: dict[str, dict[str, float]] = {}
        for rid in ids:
            total = cfg.prefix_weight * prefix[rid] + cfg.queue_weight * queue[rid] + cfg.kv_cache_weight * kv[rid]
            scores[rid] = {
                "prefix": prefix[rid],
                "queue": queue[rid],
                "kv_cache": kv[rid],
                "waiting": float(queues[rid]),
                "total": total,
            }
        top = max(s["total"] for s in scores.values())
        tied = [rid for rid in ids if scores[rid]["total"] == top]
        chosen = tied[0] if len(tied) == 1 else request.rng().choice(tied)
        s = scores[chosen]
        reason = (
            f"top score {top:.3f} = {cfg.prefix_weight} x prefix {s['prefix']:.3f} + "
            f"{cfg.queue_weight} x queue {s['queue']:.3f} + {cfg.kv_cache_weight} x kv-cache {s['kv_cache']:.3f}"
        )
        if len(tied) > 1:
            reason += f" (random among {len(tied)} tied)"
        return Decision(replica_id=chosen, reason=reason, scores=scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
