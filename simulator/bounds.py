"""Bounds a policy can be held against (design §6).

- Infinite-cache hit rate: every block ever computed stays cached on every replica; a request
  hits the longest prefix of its block chain that any earlier request computed.
- Pooled-cache hit rate: the whole fleet's KV as one LRU cache (replicas × blocks per replica):
  the hits perfect placement could keep with the memory the fleet has. A prompt's chain is
  looked up, then its blocks are (re)used, the first block most recently (vLLM's block pool
  frees a request's blocks tail first, so a chain is evicted from its end). It ignores that
  running requests pin their blocks and that decode output takes blocks too, so it is a little
  optimistic; below the infinite-cache rate by what eviction must lose.
- Ideal TTFT: each request prefills only the tokens no earlier request shared, on an idle
  replica (the prefill time of its uncached tail, in chunks, from the step-time model), plus
  the fixed latency the fleet adds to every request whatever the routing (the simulator's
  request and response latency: the HTTP hops through the balancer), so that a policy is held
  against what placement could reach, not against a fleet without a network.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from replica.step_model import StepTimeModel


@dataclass(frozen=True)
class Bounds:
    infinite_cache_hit_rate: float
    ideal_ttft_mean: float
    ideal_ttft_p50: float
    ideal_ttft_p99: float
    hit_tokens: tuple[int, ...]  # per request, under the infinite cache
    pooled_cache_hit_rate: float | None = None  # None: no capacity given


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


def _hit_rate(hits: Sequence[int], prompt_lengths: Sequence[int]) -> float:
    # The last token of a prompt is always computed, so a full hit counts length - 1.
    return sum(min(h, n - 1) for h, n in zip(hits, prompt_lengths)) / max(sum(prompt_lengths), 1)


def compute_bounds(chains: Sequence[Sequence[int]], prompt_lengths: Sequence[int], block_size: int,
                   model: StepTimeModel, chunk: int, capacity_blocks: int | None = None,
                   fixed_latency_s: float = 0.0) -> Bounds:
    """The bounds of the module docstring; `capacity_blocks` (the fleet's total KV blocks) adds
    the pooled-cache hit rate; `fixed_latency_s` is added to every ideal TTFT."""
    hits = infinite_cache_hits(chains, block_size)
    ttft = []
    for hit, length in zip(hits, prompt_lengths):
        cached = min(hit, length - 1)  # the last token is always computed
        ttft.append(fixed_latency_s + model.prefill_time(length - cached, cached, chunk))
    arr = np.asarray(ttft)
    pooled = None
    if capacity_blocks is not None:
        pooled = _hit_rate(pooled_cache_hits(chains, block_size, capacity_blocks), prompt_lengths)
    return Bounds(_hit_rate(hits, prompt_lengths), float(arr.mean()), float(np.median(arr)),
                  float(np.quantile(arr, 0.99)), tuple(hits), pooled)
