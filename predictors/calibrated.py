"""Calibrated: a predictor whose p10 / p90 are corrected online so that, over recent requests,
about 10 % of outputs fall below p10 and 10 % above p90.

A predictor's interval is only as honest as its history: a ring of 3 lengths gives a p10-p90
that is too narrow, a wide back-off level one that is too wide. Each side keeps an offset in
log(1 + tokens) units, per source kind of the prediction (`prefix`, `tenant`, `global`, ...,
since each is off in its own way), and moves it after every observation:

    offset_lo += step * (1[y < p10'] - 0.1)        p10' = expm1(log1p(p10) - offset_lo)
    offset_hi += step * (1[y > p90'] - 0.1)        p90' = expm1(log1p(p90) + offset_hi)

which settles where each side misses 10 % of the time (stochastic approximation of a quantile,
as in adaptive conformal inference: Gibbs & Candès, "Adaptive Conformal Inference Under
Distribution Shift", NeurIPS 2021). Offsets are clipped to ±max_offset; p10' <= point <= p90'
is kept. The point estimate is the inner predictor's, untouched, so MAE is unchanged.

Memory bound: the inner predictor's plus 2 numbers for each of at most `max_kinds` source kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from predictors.base import Features, Prediction, Predictor, check_length
from predictors.window import LruTable


@dataclass(frozen=True)
class CalibrationConfig:
    step: float = 0.05  # log units per observation
    max_offset: float = 3.0  # |offset| bound, log units (a factor of e**3 = 20)
    max_kinds: int = 64
    miss: float = 0.1  # target share below p10 (and above p90)

    def __post_init__(self) -> None:
        if not (self.step > 0 and math.isfinite(self.step)):
            raise ValueError(f"step must be a positive number, got {self.step}")
        if not (self.max_offset > 0 and math.isfinite(self.max_offset)):
            raise ValueError(f"max_offset must be a positive number, got {self.max_offset}")
        if self.max_kinds < 1:
            raise ValueError(f"max_kinds must be at least 1, got {self.max_kinds}")
        if not 0 < self.miss < 0.5:
            raise ValueError(f"miss must be in (0, 0.5), got {self.miss}")


def _kind(source: str) -> str:
    return source.removeprefix("ensemble:").split(":", 1)[0]


class Calibrated(Predictor):
    def __init__(self, inner: Predictor, config: CalibrationConfig | None = None) -> None:
        self.inner = inner
        self.name = inner.name  # it is the same predictor, with honest intervals
        self.config = config or CalibrationConfig()
        self._offsets: LruTable[list[float]] = LruTable(self.config.max_kinds)

    def _adjust(self, p: Prediction) -> Prediction:
        off = self._offsets.get(_kind(p.source))
        if off is None:
            return p
        lo = math.expm1(max(0.0, math.log1p(p.p10) - off[0]))
        hi = math.expm1(math.log1p(p.p90) + off[1])
        return Prediction(p.tokens, min(lo, p.tokens, p.p50), p.p50, max(hi, p.tokens, p.p50), p.source)

    def predict(self, features: Features) -> Prediction:
        return self._adjust(self.inner.predict(features)).capped(features.max_tokens)

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        y = check_length(actual_output_tokens)
        c = self.config
        raw = self.inner.predict_and_observe(features, actual_output_tokens)
        p = self._adjust(raw).capped(features.max_tokens)
        off = self._offsets.touch(_kind(raw.source), lambda: [0.0, 0.0])
        off[0] = min(c.max_offset, max(-c.max_offset, off[0] + c.step * ((y < p.p10) - c.miss)))
        off[1] = min(c.max_offset, max(-c.max_offset, off[1] + c.step * ((y > p.p90) - c.miss)))

    def memory_items(self) -> int:
        return self.inner.memory_items() + 2 * len(self._offsets)

    def max_memory_items(self) -> int:
        return self.inner.max_memory_items() + 2 * self.config.max_kinds

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "calibration": {k: [round(v, 3) for v in off]
                                                         for k, off in self._offsets.items()}}
