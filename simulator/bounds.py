"""Bounds a policy can be held against (design §6).

- Infinite-cache hit rate: every block ever computed stays cached on every replica; a request
  hits the longest prefix of its block chain that any earlier request computed.
- Pooled-cache hit rate: the whole fleet's KV as one LRU cache (replicas × blocks per replica):
  the hits perfect placement could keep with the memory the fleet has. A prompt's chain is
  looked up, then its blocks are (re)used, the first block most recently (vLLM's block pool
  frees a request's blocks tail first, so a chain is evicted from its end). It ignores that
  running requests pin their blocks and that decode output takes blocks too, so it is a little
  optimistic; below the infinite-cache rate by what eviction must lose.
  With KV offload tiers (host memory, disk) the pool has them too, pooled the same way: the
  whole fleet's device blocks, then its host blocks, then its disk blocks, as one recency stack
  (the most recent `device` blocks are on the device, the next `host` ones in host memory, ...:
  an exclusive LRU hierarchy where a hit moves to the device and each level's least recent
  block drops to the next, as replica/kv_offload.py spills), so the hit rate counts every
  tier, as the policies' hit rates do, and each hit is known by its tier.
- Ideal TTFT: each request prefills only the tokens no earlier request shared, on an idle
  replica (the prefill time of its uncached tail, in chunks, from the step-time model), plus
  the fixed latency the fleet adds to every request whatever the routing (the simulator's
  request and response latency: the HTTP hops through the balancer), so that a policy is held
  against what placement could reach, not against a fleet without a network. Its infinite
  cache is a device cache, so no lower tier can beat it: with tiers it stays a bound as it is.
- Pooled TTFT (with tiers): the same on the pooled hierarchy's hits, a lower-tier hit loaded at
  its link's time (replica/step_model.TierCost) before the uncached tail is computed: what
  placement with the fleet's device and host memory, and no queueing, would give. A reference,
  not a strict bound: a fleet's device pools may hold hits that the pooled LRU keeps only in
  host memory (tests/test_bounds.py: within 1 % of a policy on an idle fleet); the ideal TTFT
  is the bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from replica.step_model import StepTimeModel, TierCost


@dataclass(frozen=True)
class Bounds:
    infinite_cache_hit_rate: float
    ideal_ttft_mean: float
    ideal_ttft_p50: float
    ideal_ttft_p99: float
    hit_tokens: tuple[int, ...]  # per request, under the infinite cache
    pooled_cache_hit_rate: float | None = None  # None: no capacity given
    pooled_lower_hit_rate: float | None = None  # of pooled_cache_hit_rate, hits in a lower tier (None: no tiers)
    pooled_ttft_mean: float | None = None  # Pooled TTFT (module docstring); None: no tiers
    pooled_ttft_p99: float | None = None


def _cached_prefix(chain: Sequence[int], cache) -> int:
    """Blocks at the head of `chain` that are in `cache`."""
    n = 0
    for h in chain:
        if h not in cache:
            break
        n += 1
    return n


def infinite_cache_hits(chains: Iterable[Sequence[int]], block_size: int) -> list[int]:
    """Tokens of each prompt (in arrival order) covered by blocks an earlier prompt computed."""
    seen: set[int] = set()
    out = []
    for chain in chains:
        out.append(_cached_prefix(chain, seen) * block_size)
        seen.update(chain)
    return out


def pooled_cache_hits(chains: Iterable[Sequence[int]], block_size: int, capacity_blocks: int) -> list[int]:
    """Tokens of each prompt (in arrival order) found in one LRU cache of `capacity_blocks`."""
    if capacity_blocks < 1:
        raise ValueError("capacity_blocks must be at least 1")
    lru: OrderedDict[int, None] = OrderedDict()  # oldest first
    out = []
    for chain in chains:
        out.append(_cached_prefix(chain, lru) * block_size)
        for h in reversed(chain[:capacity_blocks]):  # the first block ends most recent
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                if len(lru) > capacity_blocks:
                    lru.popitem(last=False)
    return out


def pooled_tier_hits(chains: Iterable[Sequence[int]], block_size: int,
                     capacities: Sequence[int]) -> list[tuple[int, ...]]:
    """Tokens of each prompt (in arrival order) found in each level of the pooled hierarchy of
    `capacities` blocks (device first, then the offload tiers; module docstring), as a tuple
    per prompt. Their sum is `pooled_cache_hits` with the capacities' sum."""
    if not capacities or capacities[0] < 1 or min(capacities) < 0:
        raise ValueError("capacities must start with at least 1 device block and be >= 0")
    levels: list[OrderedDict[int, None]] = [OrderedDict() for _ in capacities]  # oldest first
    total = sum(capacities)
    out = []
    for chain in chains:
        hit = [0] * len(levels)
        for h in chain:  # the cached prefix, block by block in the level holding it
            for i, lvl in enumerate(levels):
                if h in lvl:
                    hit[i] += block_size
                    break
            else:
                break
        out.append(tuple(hit))
        for h in reversed(chain[:total]):  # the first block ends most recent, on the device
            for lvl in levels:
                if h in lvl:
                    del lvl[h]
                    break
            levels[0][h] = None
            for i, cap in enumerate(capacities):  # each level's least recent drops one level
                if len(levels[i]) <= cap:
                    break
                old, _ = levels[i].popitem(last=False)
                if i + 1 < len(levels):
                    levels[i + 1][old] = None
    return out


def _hit_rate(hits: Sequence[int], prompt_lengths: Sequence[int]) -> float:
    # The last token of a prompt is always computed, so a full hit counts length - 1.
    return sum(min(h, n - 1) for h, n in zip(hits, prompt_lengths)) / max(sum(prompt_lengths), 1)


def compute_bounds(chains: Sequence[Sequence[int]], prompt_lengths: Sequence[int], block_size: int,
                   model: StepTimeModel, chunk: int, capacity_blocks: int | None = None,
                   fixed_latency_s: float = 0.0, tier_blocks: Sequence[tuple[str, int]] = (),
                   tier_cost: TierCost | None = None) -> Bounds:
    """The bounds of the module docstring; `capacity_blocks` (the fleet's total KV blocks) adds
    the pooled-cache hit rate; `fixed_latency_s` is added to every ideal TTFT. `tier_blocks`:
    the fleet's total blocks per offload tier, (medium, blocks), host first ("CPU", "STORAGE"), with
    `tier_cost` their transfer costs for blocks of `block_size`: the pooled hierarchy and its
    TTFT."""
    hits = infinite_cache_hits(chains, block_size)
    ttft = []
    for hit, length in zip(hits, prompt_lengths):
        cached = min(hit, length - 1)  # the last token is always computed
        ttft.append(fixed_latency_s + model.prefill_time(length - cached, cached, chunk))
    arr = np.asarray(ttft)
    pooled = lower = pooled_mean = pooled_p99 = None
    tier_blocks = [(m, n) for m, n in tier_blocks if n > 0]
    if capacity_blocks is not None and tier_blocks:
        per_level = pooled_tier_hits(chains, block_size, [capacity_blocks, *(n for _, n in tier_blocks)])
        pooled = _hit_rate([sum(h) for h in per_level], prompt_lengths)
        lower = pooled - _hit_rate([h[0] for h in per_level], prompt_lengths)
        cost = tier_cost or TierCost()
        times = []
        for levels, length in zip(per_level, prompt_lengths):
            cached = min(sum(levels), length - 1)
            load = sum(cost.seconds(m, "GPU", h // block_size) for (m, _), h in zip(tier_blocks, levels[1:]))
            times.append(fixed_latency_s + load + model.prefill_time(length - cached, cached, chunk))
        pooled_mean, pooled_p99 = float(np.mean(times)), float(np.quantile(times, 0.99))
    elif capacity_blocks is not None:
        pooled = _hit_rate(pooled_cache_hits(chains, block_size, capacity_blocks), prompt_lengths)
    return Bounds(_hit_rate(hits, prompt_lengths), float(arr.mean()), float(np.median(arr)),
                  float(np.quantile(arr, 0.99)), tuple(hits), pooled, lower, pooled_mean, pooled_p99)
