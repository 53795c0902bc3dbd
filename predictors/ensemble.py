"""Ensemble: the members' predictions, weighted by how well each did recently in this context.

Each member m keeps an exponentially decayed mean absolute error e_m (half-life `half_life`
observations) of the prediction it would have made for each observed request, taken just before
that member learns from it. The ensemble predicts the weighted mean of the members' point
estimates (and of each quantile), with weights w_m ∝ (e_m + eps)^-power: scale-free (only the
ratio of errors matters); with power 4 a member half as accurate gets 1/16 of the weight.

Context: a member's accuracy depends on what its answer rests on (PrefixHistory with a prefix's
own history is far better than PrefixHistory falling back to the global median), so errors are
kept per context = the kinds of the members' sources (e.g. `prefix|regressor|global` vs
`global|regressor|global`), and a context's weights are used once it holds `min_context_mass`
(decayed) observations; before that, the weights over all requests. Until anything is observed
all weights are equal.

Memory bound: the members' bounds plus (members + 1) numbers for each of at most `max_contexts`
contexts (LRU) and for the overall record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from predictors.base import Features, Prediction, Predictor, check_length
from predictors.window import LruTable


@dataclass(frozen=True)
class EnsembleConfig:
    half_life: float = 200.0  # observations for a recorded error to lose half its weight
    power: float = 4.0  # w ∝ error^-power
    eps_tokens: float = 1.0  # added to errors so a member that is exactly right does not take everything
    min_context_mass: float = 20.0  # decayed observations before a context's own weights are used
    max_contexts: int = 64  # contexts held (LRU)

    def __post_init__(self) -> None:
        if not (self.half_life > 0 and math.isfinite(self.half_life)):
            raise ValueError(f"half_life must be a positive number of observations, got {self.half_life}")
        if not (self.power >= 0 and math.isfinite(self.power)):
            raise ValueError(f"power must be >= 0, got {self.power}")
        if not self.eps_tokens > 0:
            raise ValueError(f"eps_tokens must be positive, got {self.eps_tokens}")
        if not self.min_context_mass >= 0:
            raise ValueError(f"min_context_mass must be >= 0, got {self.min_context_mass}")
        if self.max_contexts < 1:
            raise ValueError(f"max_contexts must be at least 1, got {self.max_contexts}")


def _kind(source: str) -> str:
    return source.split(":", 1)[0]


class Ensemble(Predictor):
    name = "ensemble"

    def __init__(self, members: Sequence[Predictor], config: EnsembleConfig | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.config = config or EnsembleConfig()
        self.members = tuple(members)
        self._decay = 0.5 ** (1.0 / self.config.half_life)
        n = len(self.members)
        # [decayed sum of |error| per member..., decayed count]: err / count is a mean from the start
        self._overall = [0.0] * (n + 1)
        self._contexts: LruTable[list[float]] = LruTable(self.config.max_contexts)

    def _weights(self, record: list[float]) -> list[float]:
        c = self.config
        mass = record[-1]
        if not mass:
            return [1.0 / len(self.members)] * len(self.members)
        raw = [(e / mass + c.eps_tokens) ** -c.power for e in record[:-1]]
        total = sum(raw)
        return [r / total for r in raw]

    def weights(self, features: Features | None = None) -> list[float]:
        """The members' weights (sum to 1) for this request's context, or overall."""
        if features is not None:
            record = self._contexts.get(self._context([m.predict(features) for m in self.members]))
            if record is not None and record[-1] >= self.config.min_context_mass:
                return self._weights(record)
        return self._weights(self._overall)

    @staticmethod
    def _context(preds: Sequence[Prediction]) -> str:
        return "|".join(_kind(p.source) for p in preds)

    def _combine(self, features: Features, preds: list[Prediction]) -> Prediction:
        record = self._contexts.get(self._context(preds))
        w = self._weights(record if record is not None and record[-1] >= self.config.min_context_mass
                          else self._overall)

        def mix(attr: str) -> float:
            return sum(wi * getattr(p, attr) for wi, p in zip(w, preds))

        best = preds[max(range(len(w)), key=w.__getitem__)]
        p10, p50, p90 = sorted((mix("p10"), mix("p50"), mix("p90")))
        return Prediction(mix("tokens"), p10, p50, p90, f"ensemble:{best.source}").capped(features.max_tokens)

    def predict(self, features: Features) -> Prediction:
        return self._combine(features, [m.predict(features) for m in self.members])

    def predict_and_observe(self, features: Features, actual_output_tokens: int) -> Prediction:
        y = check_length(actual_output_tokens)
        # what each member would have said, before it learns from this request
        preds = [m.predict_and_observe(features, actual_output_tokens) for m in self.members]
        out = self._combine(features, preds)
        d = self._decay
        n = len(self.members)
        record = self._contexts.touch(self._context(preds), lambda: [0.0] * (n + 1))
        for rec in (record, self._overall):
            for i, p in enumerate(preds):
                rec[i] = d * rec[i] + abs(p.tokens - y)
            rec[-1] = d * rec[-1] + 1.0
        return out

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        self.predict_and_observe(features, actual_output_tokens)

    def memory_items(self) -> int:
        n = len(self.members) + 1
        return sum(m.memory_items() for m in self.members) + n * (1 + len(self._contexts))

    def max_memory_items(self) -> int:
        n = len(self.members) + 1
        return sum(m.max_memory_items() for m in self.members) + n * (1 + self.config.max_contexts)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "half_life": self.config.half_life, "power": self.config.power,
                "members": [m.describe() for m in self.members],
                "weights": {m.name: round(w, 4) for m, w in zip(self.members, self.weights())}}
