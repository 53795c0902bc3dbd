"""Bounds a policy can be held against (design §6).

- Infinite-cache hit rate: every block ever computed stays cached on every replica; a request
  hits the longest prefix of its block chain that any earlier request computed.
- Ideal TTFT: each request prefills only the tokens no earlier request shared, on an idle
  replica (the prefill time of its uncached tail, in chunks, from the step-time model).
"""

from __future__ import annotations

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


def infinite_cache_hits(chains: Iterable[Sequence[int]], block_size: int) -> list[int]:
    """Tokens of each prompt (in arrival order) covered by blocks an earlier prompt computed."""
    seen: set[int] = set()
    out = []
    for chain in chains:
        n = 0
        for h in chain:
            if h not in seen:
                break
            n += 1
        out.append(n * block_size)
        seen.update(chain)
    return out


def compute_bounds(chains: Sequence[Sequence[int]], prompt_lengths: Sequence[int], block_size: int,
                   model: StepTimeModel, chunk: int) -> Bounds:
    hits = infinite_cache_hits(chains, block_size)
    total = sum(prompt_lengths)
    ttft = []
    for hit, length in zip(hits, prompt_lengths):
        cached = min(hit, length - 1)  # the last token is always computed
        ttft.append(model.prefill_time(length - cached, cached, chunk))
    arr = np.asarray(ttft)
    return Bounds(sum(min(h, n - 1) for h, n in zip(hits, prompt_lengths)) / max(total, 1), float(arr.mean()),
                  float(np.median(arr)), float(np.quantile(arr, 0.99)), tuple(hits))
