"""The one interface every output-length predictor implements.

The balancer fills a `Features` record from what it already has when it routes a request (token
count, the chain of block hashes, max_tokens, ...), asks `predict(features)` for a `Prediction`,
and calls `observe(features, actual_output_tokens)` with the same record when the request ends.
Predictors are online (they learn only from `observe`), deterministic (no random seed, no
PYTHONHASHSEED: string keys are hashed with xxh3), torch-free, and hold a bounded amount of
state: `memory_items()` counts what they hold and never exceeds `max_memory_items()`.

`predict` never changes a predictor's state, so it may be called for `explain` or twice for a
retried request.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

QUANTILES = (0.1, 0.5, 0.9)  # the quantiles every Prediction carries


@dataclass(frozen=True, slots=True)
class Features:
    """What a predictor may look at. Everything is cheap for the balancer to fill.

    block_hashes: chained 64-bit hashes of the prompt's full blocks, block 0 first; equal hash at
        depth d means an equal first d blocks (protocol.hashing). Empty when unknown.
    text_ngrams: optional hashed n-grams of the prompt text (`features.hash_ngrams`).
    """

    prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    max_tokens: int | None = None
    tenant: str | None = None
    model: str | None = None
    turn: int = 0
    text_ngrams: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must not be negative, got {self.prompt_tokens}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be None or >= 0, got {self.max_tokens}")
        if self.turn < 0:
            raise ValueError(f"turn must not be negative, got {self.turn}")


@dataclass(frozen=True, slots=True)
class Prediction:
    """A predicted output length in tokens: a point estimate and the p10 / p50 / p90 quantiles
    (p10 <= p50 <= p90). `source` says what answered (e.g. `prefix:8` = the history of the
    first 8 blocks, `tenant`, `global`, `prior`), for explain output and evaluation."""

    tokens: float
    p10: float
    p50: float
    p90: float
    source: str = ""

    def capped(self, max_tokens: int | None) -> Prediction:
        """The same prediction with every value at most max_tokens (a request never generates
        more than it allows)."""
        if max_tokens is None or self.p90 <= max_tokens and self.tokens <= max_tokens:
            return self
        m = float(max_tokens)
        return Prediction(min(self.tokens, m), min(self.p10, m), min(self.p50, m), min(self.p90, m), self.source)


def quantile_sorted(xs: Sequence[float], q: float) -> float:
    """The q-quantile of sorted, non-empty xs, interpolated linearly (numpy's default)."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    if lo + 1 >= len(xs):
        return float(xs[-1])
    frac = pos - lo
    return xs[lo] + (xs[lo + 1] - xs[lo]) * frac if frac else float(xs[lo])


def from_sorted(xs: Sequence[float], source: str, max_tokens: int | None = None) -> Prediction:
    """A Prediction whose point is the median of sorted, non-empty xs."""
    p10, p50, p90 = (quantile_sorted(xs, q) for q in QUANTILES)
    return Prediction(p50, p10, p50, p90, source).capped(max_tokens)


def constant(tokens: float, source: str, max_tokens: int | None = None) -> Prediction:
    return Prediction(tokens, tokens, tokens, tokens, source).capped(max_tokens)


def check_length(actual_output_tokens: int | float) -> float:
    """Validates an observed output length (a finite number >= 0)."""
    y = float(actual_output_tokens)
    if not (y >= 0 and math.isfinite(y)):
        raise ValueError(f"actual_output_tokens must be a finite number >= 0, got {actual_output_tokens!r}")
    return y


class Predictor(ABC):
    """Base class of all output-length predictors. Subclasses set `name`."""

    name: ClassVar[str] = ""

    @abstractmethod
    def predict(self, features: Features) -> Prediction:
        """The predicted output length of a request about to be routed. Does not change state."""

    @abstractmethod
    def observe(self, features: Features, actual_output_tokens: int) -> None:
        """A request ended having generated actual_output_tokens; `features` is what
        `predict` was given for it."""

    def predict_and_observe(self, features: Features, actual_output_tokens: int) -> Prediction:
        """What `predict` returns for features now, then `observe`: one call for wrappers that
        need both (an ensemble scoring its members), which a predictor may do cheaper."""
        p = self.predict(features)
        self.observe(features, actual_output_tokens)
        return p

    @abstractmethod
    def memory_items(self) -> int:
        """How many stored values (lengths, weights, table entries) the predictor holds now."""

    @abstractmethod
    def max_memory_items(self) -> int:
        """The bound memory_items() never exceeds (from the config alone)."""

    def describe(self) -> dict[str, Any]:
        """Settings and memory, for logs and the evaluation's JSON."""
        return {"name": self.name, "memory_items": self.memory_items(), "max_memory_items": self.max_memory_items()}


def deep_size(obj) -> int:
    """Bytes of everything reachable from obj (classes, modules and functions excluded): how the
    tests and the benchmark check that a predictor's memory stays within its bound."""
    import gc
    import sys
    import types

    seen, stack, total = set(), [obj], 0
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total
