"""Ensemble: the members' predictions, weighted by how well each did recently.

Each member m keeps an exponentially decayed mean absolute error e_m (half-life `half_life`
observations) of the prediction it would have made for each observed request, taken just before
that member learns from it. The ensemble predicts the weighted mean of the members' point
estimates (and of each quantile), with weights w_m ∝ (e_m + eps)^-power: scale-free (only the
ratio of errors matters), and with power 4 a member half as accurate gets 1/16 of the weight.
Until a member has an error on record all weights are equal.

Memory bound: the members' bounds plus two numbers per member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from predictors.base import Features, Prediction, Predictor, check_length


@dataclass(frozen=True)
class EnsembleConfig:
    half_life: float = 200.0  # observations for a member's recorded error to lose half its weight
    power: float = 4.0  # w ∝ error^-power
    eps_tokens: float = 1.0  # added to errors so a member that is exactly right does not take everything

    def __post_init__(self) -> None:
        if not (self.half_life > 0 and math.isfinite(self.half_life)):
            raise ValueError(f"half_life must be a positive number of observations, got {self.half_life}")
        if not (self.power >= 0 and math.isfinite(self.power)):
            raise ValueError(f"power must be >= 0, got {self.power}")
        if not self.eps_tokens > 0:
            raise ValueError(f"eps_tokens must be positive, got {self.eps_tokens}")


class Ensemble(Predictor):
    name = "ensemble"

    def __init__(self, members: Sequence[Predictor], config: EnsembleConfig | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.config = config or EnsembleConfig()
        self.members = tuple(members)
        self._decay = 0.5 ** (1.0 / self.config.half_life)
        self._err = [0.0] * len(self.members)  # decayed sum of |error|
        self._mass = [0.0] * len(self.members)  # decayed count, so err / mass is a mean from the start

    def weights(self) -> list[float]:
        """The members' current weights (sum to 1)."""
        c = self.config
        if not all(self._mass):
            return [1.0 / len(self.members)] * len(self.members)
        raw = [(e / m + c.eps_tokens) ** -c.power for e, m in zip(self._err, self._mass)]
        total = sum(raw)
        return [r / total for r in raw]

    def predict(self, features: Features) -> Prediction:
        preds = [m.predict(features) for m in self.members]
        w = self.weights()

        def mix(attr: str) -> float:
            return sum(wi * getattr(p, attr) for wi, p in zip(w, preds))

        best = preds[max(range(len(w)), key=w.__getitem__)]
        p10, p50, p90 = sorted((mix("p10"), mix("p50"), mix("p90")))
        return Prediction(mix("tokens"), p10, p50, p90, f"ensemble:{best.source}").capped(features.max_tokens)

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        y = check_length(actual_output_tokens)
        d = self._decay
        for i, m in enumerate(self.members):
            self._err[i] = d * self._err[i] + abs(m.predict(features).tokens - y)
            self._mass[i] = d * self._mass[i] + 1.0
            m.observe(features, actual_output_tokens)

    def memory_items(self) -> int:
        return sum(m.memory_items() for m in self.members) + 2 * len(self.members)

    def max_memory_items(self) -> int:
        return sum(m.max_memory_items() for m in self.members) + 2 * len(self.members)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "half_life": self.config.half_life, "power": self.config.power,
                "members": [m.describe() for m in self.members],
                "weights": {m.name: round(w, 4) for m, w in zip(self.members, self.weights())}}
