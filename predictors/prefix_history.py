"""PrefixHistory: predict from the output lengths of recent requests that shared the longest
already-seen prefix.

Requests that share a prefix (a system prompt, a few-shot template, a conversation so far) tend
to produce similar output lengths (shared/traces/README.md). Block hashes are chained, so the
hash of block d-1 names the whole first-d-blocks prefix: one integer per depth, no tree.

    observe(f, y):  for d in depths (1, 2, 4, ..., and the full chain) present in f:
                        table[f.block_hashes[d-1]].append(y)      (a ring of the last `ring`)
                    tenant[f.tenant].append(y); model[f.model].append(y); global.add(y)
    predict(f):     the deepest d whose key holds >= min_samples lengths and passes the gate
                    -> the median of its ring; else the back-off: the tenant's ring, else the
                    model's (each once it holds min_group_samples), else the global window,
                    else prior_tokens.

The gate: how far a handful of lengths can be trusted depends on the workload (in one trace a
prefix seen once predicts its repeats well; in another, outputs do not depend on the prompt and
the median of 2 samples is only noise). So PrefixHistory keeps, per evidence bucket (how many
lengths the key holds: 1, 2, 3-4, 5-8, 9-16, ...), the decayed absolute error a prefix median of
that much evidence had on observed requests, beside the error on the same requests of the level
it would back off to (the next shallower key holding lengths, or the tenant / model / global
back-off for the shallowest). A key answers while its bucket's error is no larger than its
parents' (and until the bucket has `gate_min_mass` observations, on the prior that shared
prefixes do share lengths); otherwise the walk goes on to the next shallower key.

Quantiles: from the answering ring when it holds >= quantile_samples lengths; otherwise the
spread (p10/p50 and p90/p50 ratios) of the next shallower level that has enough, applied around
the point estimate (a prefix seen once still gets an interval).

Memory bound: `max_keys` prefix keys (LRU; each key = a ring of <= `ring` uint32: with its int
key and OrderedDict slot ~260 bytes in CPython, so 32,768 full keys ~ 8 MiB, measured by
bench/bench_predictors.py), `max_groups` tenant/model keys with rings of `group_ring`, the global
window (2 × global_window numbers) and 3 numbers per evidence bucket. Keys are touched on observe
only, so a shared head (block 0 of a system prompt) stays while one-off tails age out.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from predictors.base import Features, Prediction, Predictor, check_length, constant, quantile_sorted
from predictors.window import LruTable, RollingWindow, new_ring, ring_add

DEFAULT_DEPTHS = tuple(2**i for i in range(13))  # 1 .. 4096 blocks: a 64k-token prompt at 16 tokens/block


@dataclass(frozen=True)
class PrefixHistoryConfig:
    depths: tuple[int, ...] = DEFAULT_DEPTHS  # prefix depths (blocks) keyed, besides the full chain
    full_chain: bool = True  # also key the whole chain (exact repeats of a prompt)
    max_keys: int = 32768  # prefix keys held (LRU); ~8 MiB with full rings
    ring: int = 16  # recent lengths kept per prefix key
    min_samples: int = 1  # a prefix key may answer once it holds this many lengths
    quantile_samples: int = 8  # fewer than this: borrow the interval's spread from a shallower level
    max_groups: int = 4096  # tenant and model keys held (LRU)
    group_ring: int = 64  # recent lengths kept per tenant / model
    min_group_samples: int = 8  # a tenant / model answers once it holds this many lengths
    global_window: int = 2048
    gate: bool = True  # False: the deepest key with min_samples always answers
    gate_half_life: float = 500.0  # gate updates for an error record to lose half its weight
    gate_min_mass: float = 10.0  # decayed updates before a bucket's record can close it
    prior_tokens: float = 128.0  # the answer before anything was observed

    def __post_init__(self) -> None:
        if not self.depths and not self.full_chain:
            raise ValueError("give at least one depth or full_chain=True")
        if any(d < 1 for d in self.depths) or list(self.depths) != sorted(set(self.depths)):
            raise ValueError(f"depths must be distinct positive block counts in ascending order, got {self.depths}")
        for name in ("max_keys", "ring", "min_samples", "quantile_samples", "max_groups", "group_ring",
                     "min_group_samples", "global_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_samples > self.ring:
            raise ValueError(f"min_samples ({self.min_samples}) cannot exceed ring ({self.ring})")
        if not (self.gate_half_life > 0 and math.isfinite(self.gate_half_life)):
            raise ValueError(f"gate_half_life must be a positive number, got {self.gate_half_life}")
        if not self.gate_min_mass >= 0:
            raise ValueError(f"gate_min_mass must be >= 0, got {self.gate_min_mass}")
        if not self.prior_tokens >= 0:
            raise ValueError(f"prior_tokens must be >= 0, got {self.prior_tokens}")


def prefix_depths(n_blocks: int, depths: tuple[int, ...], full_chain: bool) -> list[int]:
    """The depths (ascending) keyed for a chain of n_blocks blocks."""
    out = [d for d in depths if d <= n_blocks]
    if full_chain and n_blocks and (not out or out[-1] != n_blocks):
        out.append(n_blocks)
    return out


def evidence_bucket(n: int) -> int:
    """0 for 1 length, 1 for 2, 2 for 3-4, 3 for 5-8, 4 for 9-16, ..."""
    return (n - 1).bit_length()


class PrefixHistory(Predictor):
    name = "prefix_history"

    def __init__(self, config: PrefixHistoryConfig | None = None) -> None:
        c = self.config = config or PrefixHistoryConfig()
        self._prefixes: LruTable[array] = LruTable(c.max_keys)
        self._groups: LruTable[array] = LruTable(c.max_groups)
        self._global = RollingWindow(c.global_window)
        # per evidence bucket: [decayed |error| of the prefix median, of the back-off, decayed count]
        self._gate = [[0.0, 0.0, 0.0] for _ in range(evidence_bucket(c.ring) + 1)]
        self._decay = 0.5 ** (1.0 / c.gate_half_life)

    # -- reading

    def _prefix_levels(self, f: Features) -> Iterator[tuple[int, list[int]]]:
        """(depth, sorted lengths) of f's prefix keys holding >= min_samples, deepest first."""
        c = self.config
        bh = f.block_hashes
        for d in reversed(prefix_depths(len(bh), c.depths, c.full_chain)):
            ring = self._prefixes.get(bh[d - 1])
            if ring is not None and len(ring) >= c.min_samples:
                yield d, sorted(ring)

    def _backoff_levels(self, f: Features) -> Iterator[tuple[str, list]]:
        """(source, sorted lengths) of the back-off: tenant, model, global."""
        for kind, value in (("tenant", f.tenant), ("model", f.model)):
            if value is not None:
                ring = self._groups.get((kind, value))
                if ring is not None and len(ring) >= self.config.min_group_samples:
                    yield kind, sorted(ring)
        if len(self._global):
            yield "global", self._global.sorted_values

    def gate_open(self, n: int) -> bool:
        """Whether a prefix key holding n lengths may answer."""
        if not self.config.gate:
            return True
        e_prefix, e_backoff, mass = self._gate[evidence_bucket(n)]
        return mass < self.config.gate_min_mass or e_prefix <= e_backoff

    def predict(self, features: Features) -> Prediction:
        return self._answer(features, self._prefix_levels(features))

    def _answer(self, features: Features, levels: Iterable[tuple[int, list[int]]]) -> Prediction:
        """The prediction from f's prefix levels (deepest first), then its back-off."""
        source, xs, rest = None, None, []
        for d, ys in levels:
            if xs is None and self.gate_open(len(ys)):
                source, xs = f"prefix:{d}", ys
            elif xs is not None:
                rest.append(ys)
                if len(ys) >= self.config.quantile_samples:
                    break
        backoff = self._backoff_levels(features)
        if xs is None:
            first = next(backoff, None)
            if first is None:
                return constant(self.config.prior_tokens, "prior", features.max_tokens)
            source, xs = first
        point = quantile_sorted(xs, 0.5)
        spread = xs
        if len(xs) < self.config.quantile_samples:
            for ys in (*rest, *(ys for _, ys in backoff)):  # the first with enough lengths, else the last
                spread = ys
                if len(ys) >= self.config.quantile_samples:
                    break
        if spread is xs:
            p10, p90 = quantile_sorted(xs, 0.1), quantile_sorted(xs, 0.9)
        else:
            mid = quantile_sorted(spread, 0.5)
            lo, hi = quantile_sorted(spread, 0.1), quantile_sorted(spread, 0.9)
            # the other level's spread as ratios around this point (lengths >= 0; +1 avoids 0/0)
            p10 = min(point, (point + 1) * (lo + 1) / (mid + 1) - 1)
            p90 = max(point, (point + 1) * (hi + 1) / (mid + 1) - 1)
        return Prediction(point, max(0.0, p10), point, p90, source).capped(features.max_tokens)

    def history_depth(self, features: Features) -> int:
        """How many leading blocks of this request have a history (0 = none)."""
        c = self.config
        bh = features.block_hashes
        for d in reversed(prefix_depths(len(bh), c.depths, c.full_chain)):
            if self._prefixes.get(bh[d - 1]) is not None:
                return d
        return 0

    # -- learning

    def _update_gate(self, f: Features, y: float, levels: list[tuple[int, list[int]]]) -> None:
        """Each prefix level scored against the level it would back off to (the next shallower
        prefix key, or the back-off for the shallowest), in the bucket of its evidence."""
        first = next(self._backoff_levels(f), None)
        if not levels or first is None:
            return
        k = self._decay
        medians = [quantile_sorted(ys, 0.5) for _, ys in levels] + [quantile_sorted(first[1], 0.5)]
        for i, (_, ys) in enumerate(levels):
            g = self._gate[evidence_bucket(len(ys))]
            g[0] = k * g[0] + abs(medians[i] - y)
            g[1] = k * g[1] + abs(medians[i + 1] - y)
            g[2] = k * g[2] + 1.0

    def predict_and_observe(self, features: Features, actual_output_tokens: int) -> Prediction:
        y = check_length(actual_output_tokens)
        levels = list(self._prefix_levels(features))  # read once, for the answer and the gate
        out = self._answer(features, levels)
        self._learn(features, y, levels)
        return out

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        y = check_length(actual_output_tokens)
        self._learn(features, y, list(self._prefix_levels(features)) if self.config.gate else [])

    def _learn(self, features: Features, y: float, levels: list[tuple[int, list[int]]]) -> None:
        c = self.config
        if c.gate:
            self._update_gate(features, y, levels)
        bh = features.block_hashes
        for d in prefix_depths(len(bh), c.depths, c.full_chain):
            ring_add(self._prefixes.touch(bh[d - 1], new_ring), y, c.ring)
        for kind, value in (("tenant", features.tenant), ("model", features.model)):
            if value is not None:
                ring_add(self._groups.touch((kind, value), new_ring), y, c.group_ring)
        self._global.add(y)

    # -- memory

    def memory_items(self) -> int:
        """Keys plus stored lengths."""
        return (len(self._prefixes) + sum(len(r) for r in self._prefixes.values())
                + len(self._groups) + sum(len(r) for r in self._groups.values()) + 2 * len(self._global)
                + 3 * len(self._gate))

    def max_memory_items(self) -> int:
        c = self.config
        return (c.max_keys * (1 + c.ring) + c.max_groups * (1 + c.group_ring) + 2 * c.global_window
                + 3 * (evidence_bucket(c.ring) + 1))

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**super().describe(), "depths": list(c.depths), "full_chain": c.full_chain, "max_keys": c.max_keys,
                "ring": c.ring, "prefix_keys": len(self._prefixes),
                "gate_open": {f"n<={1 << b}": self.gate_open(1 << b) for b in range(len(self._gate))}}
