"""chwbl: consistent hashing with bounded loads, as KubeAI's PrefixHash strategy.

Source: kubeai-project/kubeai (formerly substratusai/kubeai), internal/loadbalancer/balance_chwbl.go,
group.go, internal/apiutils/request.go, api/k8s/v1/model_types.go. Facts carried over:

- The ring holds `replication` virtual nodes per replica; vnode i of replica `name` sits at
  xxhash64(f"{name}{i}") (`chwblEndpointReplicaHashInput` is fmt "%s%d"); the ring is sorted.
- The key is xxhash64 of the first `prefix_chars` characters (runes) of the first *user* message
  for chat requests, of the prompt for completions, after the LoRA adapter's name when the request
  names one (group.go: `chwblGetAddr(req.Adapter+req.Prefix, ...)`; KubeAI walks only endpoints
  holding the adapter, which the router's `adapter_candidates` does here).
- Lookup: the first vnode with hash >= key (wrapping), then clockwise. A replica is acceptable if
  no request is in flight anywhere, or if `load + 1 <= (total + 1) / n * load_factor`, where load
  is its in-flight requests, total the sum over the ring and n the number of replicas
  (`chwblLoadOK`). If the whole ring is walked without an acceptable replica, the request goes to
  the replica of the first vnode (`defaultEndpoint`).

Note the bound's consequence at low load: with 4 replicas holding one request each,
(1 + 1) <= 5 / 4 * 1.25 fails for every replica and the request stays on its hash owner.

The ring is rebuilt lazily for each distinct candidate set and memoized (a bounded cache of a
pure function of the ids: it changes no decision).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import xxhash

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest

_RING_CACHE_SIZE = 16  # distinct candidate sets kept; a fleet sees few (healthy set changes)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class ChwblConfig:
    # KubeAI Model CRD `spec.loadBalancing.prefixHash.meanLoadFactor` is a percentage, default 125,
    # minimum 100 (api/k8s/v1/model_types.go, +kubebuilder:default=125); here as a factor.
    load_factor: float = 1.25
    # `prefixHash.replication`, +kubebuilder:default=256 (model_types.go).
    replication: int = 256
    # `prefixHash.prefixCharLength`, +kubebuilder:default=100 (model_types.go).
    prefix_chars: int = 100

    def __post_init__(self) -> None:
        if not _is_number(self.load_factor) or not self.load_factor >= 1.0:
            raise ValueError(f"load_factor must be a number >= 1.0 (KubeAI's minimum is 100%), got {self.load_factor!r}")
        if not isinstance(self.replication, int) or isinstance(self.replication, bool) or self.replication < 1:
            raise ValueError(f"replication must be an integer >= 1, got {self.replication!r}")
        if not isinstance(self.prefix_chars, int) or isinstance(self.prefix_chars, bool) or self.prefix_chars < 1:
            raise ValueError(f"prefix_chars must be an integer >= 1, got {self.prefix_chars!r}")


def chwbl_hash(text: str) -> int:
    """xxhash64 (seed 0) of the UTF-8 bytes, as cespare/xxhash.Sum64 in KubeAI."""
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def routing_key(request: RoutingRequest, prefix_chars: int) -> str:
    """The text KubeAI hashes: the adapter's name, then the start of the first user message,
    else of the prompt."""
    source = request.first_user_message if request.first_user_message is not None else request.prompt_text
    return (request.lora_name or "") + source[:prefix_chars]  # by code point, as firstNChars slices runes


def build_ring(replica_ids: Sequence[str], replication: int) -> tuple[list[int], list[str]]:
    """Sorted vnode hashes and, aligned with them, the replica each belongs to. Pure."""
    points = sorted((chwbl_hash(f"{rid}{i}"), rid) for rid in replica_ids for i in range(replication))
    return [h for h, _ in points], [rid for _, rid in points]


def load_ok(load: int, total: int, n: int, load_factor: float) -> bool:
    """KubeAI's chwblLoadOK: acceptable while load + 1 <= (total + 1) / n * load_factor."""
    if total == 0:
        return True
    return float(load) + 1.0 <= float(total + 1) / float(n) * load_factor


class ChwblPolicy(Policy):
    name: ClassVar[str] = "chwbl"
    needs_text = True
    Config: ClassVar[type] = ChwblConfig

    def __init__(self, config: ChwblConfig | None = None) -> None:
        self.config = config or ChwblConfig()
        self._rings: OrderedDict[tuple[str, ...], tuple[list[int], list[str]]] = OrderedDict()

    def _ring(self, replica_ids: tuple[str, ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(replica_ids)
        if ring is None:
            ring = build_ring(replica_ids, self.config.replication)
            self._rings[replica_ids] = ring
            if len(self._rings) > _RING_CACHE_SIZE:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(replica_ids)
        return ring

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        cfg = self.config
        loads = {r.replica_id: r.inflight_requests for r in replicas}
        ids = tuple(sorted(loads))
        hashes, owners = self._ring(ids)
        total = sum(loads.values())
        n = len(ids)
        bound = float(total + 1) / float(n) * cfg.load_factor

        key = routing_key(request, cfg.prefix_chars)
        start = bisect_left(hashes, chwbl_hash(key))
        if start == len(hashes):
            start = 0

        # Walk clockwise; each replica is judged at its first vnode after the key (a later vnode
        # of the same replica would give the same answer, so it is skipped).
        walk: list[str] = []
        seen: set[str] = set()
        chosen: str | None = None
        for step in range(len(hashes)):
            rid = owners[(start + step) % len(hashes)]
            if rid in seen:
                continue
            seen.add(rid)
            walk.append(rid)
            if chosen is None and load_ok(loads[rid], total, n, cfg.load_factor):
                chosen = rid
            if len(seen) == n:
                break
        owner = walk[0]
        if chosen is None:
            chosen = owner
            reason = f"every replica is over the bound {bound:.2f}; kept the hash owner {owner}"
        elif chosen == owner:
            reason = f"hash owner {owner} is within the bound ({loads[owner]} + 1 <= {bound:.2f})"
        else:
            reason = f"hash owner {owner} is over the bound {bound:.2f}; walked the ring to {chosen}"

        scores = {
            rid: {
                "load": float(loads[rid]),
                "bound": bound,
                "acceptable": 1.0 if load_ok(loads[rid], total, n, cfg.load_factor) else 0.0,
                "ring_rank": float(rank),
            }
            for rank, rid in enumerate(walk)
        }
        return Decision(replica_id=chosen, reason=reason, scores=scores)

    def on_replica_removed(self, replica_id: str) -> None:
        for ids in [ids for ids in self._rings if replica_id in ids]:
            del self._rings[ids]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
