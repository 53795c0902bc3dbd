"""Baselines every other predictor is judged against.

- `GlobalMedian`: the median (and p10 / p90) of the last `window` observed output lengths,
  whatever the request. Memory: one RollingWindow, 2 × window numbers.
- `MaxTokensCap`: the request's own max_tokens (what a balancer that knows nothing else must
  assume: the request may run that long), falling back to the global median without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from predictors.base import Features, Prediction, Predictor, check_length, constant, from_sorted, quantile_sorted
from predictors.window import RollingWindow


@dataclass(frozen=True)
class GlobalMedianConfig:
    window: int = 2048  # recent output lengths kept
    prior_tokens: float = 128.0  # the answer before anything was observed

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if not self.prior_tokens >= 0:
            raise ValueError(f"prior_tokens must be >= 0, got {self.prior_tokens}")


class GlobalMedian(Predictor):
    name = "global_median"

    def __init__(self, config: GlobalMedianConfig | None = None) -> None:
        self.config = config or GlobalMedianConfig()
        self._window = RollingWindow(self.config.window)

    def predict(self, features: Features) -> Prediction:
        if not len(self._window):
            return constant(self.config.prior_tokens, "prior", features.max_tokens)
        return from_sorted(self._window.sorted_values, "global", features.max_tokens)

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        self._window.add(check_length(actual_output_tokens))

    def recent_sorted(self) -> list[float]:
        """The window's lengths, ascending (do not modify)."""
        return self._window.sorted_values

    def memory_items(self) -> int:
        return 2 * len(self._window)

    def max_memory_items(self) -> int:
        return 2 * self.config.window

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "window": self.config.window}


class MaxTokensCap(Predictor):
    """Predicts max_tokens when the request sets it; the quantiles are the global ones capped at
    max_tokens, except p90 = max_tokens. Without max_tokens: exactly GlobalMedian."""

    name = "max_tokens"

    def __init__(self, config: GlobalMedianConfig | None = None) -> None:
        self._median = GlobalMedian(config)

    def predict(self, features: Features) -> Prediction:
        base = self._median.predict(features)
        m = features.max_tokens
        if m is None:
            return base
        values = self._median.recent_sorted()
        p10 = min(quantile_sorted(values, 0.1), m) if values else float(m)
        return Prediction(float(m), p10, float(m), float(m), "max_tokens")

    def observe(self, features: Features, actual_output_tokens: int) -> None:
        self._median.observe(features, actual_output_tokens)

    def memory_items(self) -> int:
        return self._median.memory_items()

    def max_memory_items(self) -> int:
        return self._median.max_memory_items()
