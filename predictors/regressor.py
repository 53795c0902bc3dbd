"""OnlineRegressor: a linear model of log(output length) over cheap hashed features, learned by
SGD one request at a time.

Features (hashing trick: every feature is an index into one weight vector of 2**dim_bits):
bias; log2 bucket of prompt_tokens (one-hot); log2 bucket of max_tokens, or "no max_tokens";
turn (one-hot, capped at 16); tenant; model; the chained block hash at each depth of
PrefixHistory's (1, 2, 4, ... blocks and the full chain); the text n-grams. Values are scaled so
the feature vector has unit L2 norm.

Target: three quantile heads (p10, p50, p90) of z = log(1 + output tokens), each the running
global quantile of z (a RollingWindow) plus a learned residual w_q · x. With zero weights the p50
head is exactly the global median, so the model starts at the baseline and only moves from it
where a feature earns it. Loss: pinball (quantile) loss, whose gradient is bounded by 1 whatever
the target, so one outlier cannot throw the weights (squared loss on log lengths would be pulled
by every long tail).

Step (AdaGrad, per coordinate, as in the hashed linear models of McMahan et al., "Ad Click
Prediction: a View from the Trenches", KDD 2013): w_i -= max(lr / sqrt(G_i), lr_floor) · g_i,
G_i = sum of g_i²; the floor keeps the model adapting after the step would otherwise have
decayed to nothing. Never diverges: the change one observation makes to a prediction is clipped
to max_step (log units), weights to ±weight_clip, predictions to [0, log(1 + max_output)].

Memory bound: 2 float64 arrays of 3 × 2**dim_bits (weights and AdaGrad sums; dim_bits 16 = 3 MB)
plus the global window (2 × global_window numbers). Fixed at construction.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any

import xxhash

from predictors.base import QUANTILES, Features, Prediction, Predictor, check_length
from predictors.prefix_history import DEFAULT_DEPTHS, prefix_depths
from predictors.window import RollingWindow

_U64 = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing constant (2**64 / golden ratio)
_BUCKETS = 33  # log2 buckets of a token count: 0 .. 32
_MAX_TURN = 16


@dataclass(frozen=True)
class OnlineRegressorConfig:
    dim_bits: int = 16  # 2**dim_bits weights per quantile head
    depths: tuple[int, ...] = DEFAULT_DEPTHS  # block-hash depths used as features (and the full chain)
    lr: float = 0.3  # AdaGrad base step (log-token units)
    lr_floor: float = 0.01  # smallest per-coordinate step, so the model keeps tracking drift
    max_step: float = 0.5  # most one observation may move a prediction (log-token units)
    weight_clip: float = 8.0  # |w_i| bound
    max_output_tokens: int = 1 << 20  # predictions are clipped to [0, this]
    global_window: int = 2048  # recent lengths behind the heads' base quantiles
    prior_tokens: float = 128.0  # the base before anything was observed

    def __post_init__(self) -> None:
        if not 4 <= self.dim_bits <= 26:
            raise ValueError(f"dim_bits must be in 4..26, got {self.dim_bits}")
        if any(d < 1 for d in self.depths) or list(self.depths) != sorted(set(self.depths)):
            raise ValueError(f"depths must be distinct positive block counts in ascending order, got {self.depths}")
        for name in ("lr", "max_step", "weight_clip"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")
        if not 0 <= self.lr_floor <= self.lr:
            raise ValueError(f"lr_floor must be in [0, lr], got {self.lr_floor}")
        if self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be at least 1, got {self.max_output_tokens}")
        if self.global_window < 1:
            raise ValueError(f"global_window must be at least 1, got {self.global_window}")
        if not self.prior_tokens >= 0:
            raise ValueError(f"prior_tokens must be >= 0, got {self.prior_tokens}")


def _bucket(n: int) -> int:
    """log2 bucket of a token count: 0 for 0, 1 for 1, 2 for 2-3, 3 for 4-7, ..."""
    return min(int(n).bit_length(), _BUCKETS - 1)


class OnlineRegressor(Predictor):
    name = "online_regressor"

    def __init__(self, config: OnlineRegressorConfig | None = None) -> None:
        c = self.config = config or OnlineRegressorConfig()
        self._shift = 64 - c.dim_bits
        dim = 1 << c.dim_bits
        nq = len(QUANTILES)
        # weights and AdaGrad sums, head-major per feature: [i * 3 + q]. Plain Python over the
        # ~10-20 active features beats numpy's per-call overhead at this size.
        self._w = array("d", bytes(8 * nq * dim))
        self._g2 = array("d", bytes(8 * nq * dim))
        self._global = RollingWindow(c.global_window)
        self._zmax = math.log1p(c.max_output_tokens)
        # fixed indices of the categorical features
        self._bias = self._index("bias")
        self._len = tuple(self._index(f"len:{b}") for b in range(_BUCKETS))
        self._mt = tuple(self._index(f"max_tokens:{b}") for b in range(_BUCKETS))
        self._mt_none = self._index("max_tokens:none")
        self._turn = tuple(self._index(f"turn:{t}") for t in range(_MAX_TURN + 1))

    def _index(self, key: str) -> int:
        return xxhash.xxh3_64_intdigest(key.encode()) >> self._shift

    def _features(self, f: Features) -> tuple[dict[int, float], float]:
        """f's feature vector as {index: count} (hash collisions add up) and 1 / its L2 norm."""
        c = self.config
        acc = {self._bias: 1.0}
        for i in (self._len[_bucket(f.prompt_tokens)],
                  self._mt_none if f.max_tokens is None else self._mt[_bucket(f.max_tokens)],
                  self._turn[min(f.turn, _MAX_TURN)]):
            acc[i] = acc.get(i, 0.0) + 1.0
        if f.tenant is not None:
            i = self._index(f"tenant:{f.tenant}")
            acc[i] = acc.get(i, 0.0) + 1.0
        if f.model is not None:
            i = self._index(f"model:{f.model}")
            acc[i] = acc.get(i, 0.0) + 1.0
        shift = self._shift
        bh = f.block_hashes
        for d in prefix_depths(len(bh), c.depths, True):
            i = ((bh[d - 1] * _MIX) & _U64) >> shift
            acc[i] = acc.get(i, 0.0) + 1.0
        for h in f.text_ngrams:
            i = ((h * _MIX) & _U64) >> shift
            acc[i] = acc.get(i, 0.0) + 1.0
        return acc, 1.0 / math.sqrt(sum(v * v for v in acc.values()))

    def _heads(self, x: dict[int, float], inv_norm: float) -> list[float]:
        """The three heads' predictions of z = log1p(tokens), unclipped: base + w_q · x."""
        w = self._w
        s0 = s1 = s2 = 0.0
        for i, v in x.items():
            j = 3 * i
            s0 += w[j] * v
            s1 += w[j + 1] * v
            s2 += w[j + 2] * v
        if len(self._global):
            base = [math.log1p(q) for q in self._global.quantiles()]
        else:
            base = [math.log1p(self.config.prior_tokens)] * 3
        return [base[0] + s0 * inv_norm, base[1] + s1 * inv_norm, base[2] + s2 * inv_norm]

    def _prediction(self, features: Features, heads: list[float]) -> Prediction:
        zmax, top = self._zmax, float(self.config.max_output_tokens)
        p10, p50, p90 = sorted(min(math.expm1(min(max(z, 0.0), zmax)), top) for z in heads)
        source = "regressor" if len(self._global) else "prior"
        return Prediction(p50, p10, p50, p90, source).capped(features.max_tokens)

    def predict(self, features: Features) -> Prediction:
        return self._prediction(features, self._heads(*self._features(features)))

    def predict_and_observe(self, features: Features, actual_output_tokens: int) -> Prediction:
        y = check_length(actual_output_tokens)
        x, inv_norm = self._features(features)
        heads = self._heads(x, inv_norm)
        out = self._prediction(features, heads)
        self._learn(x, inv_norm, heads, y)
        return out

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        y = check_length(actual_output_tokens)
        x, inv_norm = self._features(features)
        self._learn(x, inv_norm, self._heads(x, inv_norm), y)

    def _learn(self, x: dict[int, float], inv_norm: float, heads: list[float], y: float) -> None:
        """One pinball-loss AdaGrad step of each head towards z = log1p(y), given its prediction."""
        c = self.config
        z = math.log1p(min(y, c.max_output_tokens))
        w, g2 = self._w, self._g2
        lr, floor, clip, max_step = c.lr, c.lr_floor, c.weight_clip, c.max_step
        items = [(3 * i, v * inv_norm) for i, v in x.items()]  # (slot of head 0, normalised value)
        for q, (tau, zq) in enumerate(zip(QUANTILES, heads)):
            # d(pinball)/d(prediction): -tau when under-predicting, 1 - tau when over
            dpred = -tau if z > zq else (1.0 - tau if z < zq else 0.0)
            if not dpred:
                continue
            deltas = []
            moved = 0.0
            for j0, xv in items:
                j = j0 + q
                g = dpred * xv
                s = g2[j] + g * g
                g2[j] = s
                step = lr / math.sqrt(s)
                d = -(step if step > floor else floor) * g
                deltas.append((j, d))
                moved += d * xv
            scale = max_step / abs(moved) if abs(moved) > max_step else 1.0
            for j, d in deltas:
                nw = w[j] + d * scale
                w[j] = clip if nw > clip else (-clip if nw < -clip else nw)
        self._global.add(y)

    def memory_items(self) -> int:
        return len(self._w) + len(self._g2) + 2 * len(self._global)

    def max_memory_items(self) -> int:
        return 2 * len(QUANTILES) * (1 << self.config.dim_bits) + 2 * self.config.global_window

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**super().describe(), "dim_bits": c.dim_bits, "lr": c.lr, "lr_floor": c.lr_floor,
                "max_step": c.max_step, "weight_clip": c.weight_clip}
