"""Bounded structures the predictors keep their history in.

- `RollingWindow`: the last `capacity` values in a ring buffer plus the same values in a sorted
  list, so any quantile of the window is exact and O(1) to read; adding is O(log W) to find the
  place and O(W) memmove to insert/remove (W = 2048: about a microsecond). Chosen over the P²
  estimator because it is exact, forgets old values (P² never does) and its bound is plain:
  2 × capacity numbers.
- rings (`new_ring`, `ring_add`): a bare array('I') of the last `size` lengths of one key
  (16 lengths: 64 bytes + the array's 64-byte header); many thousands sit in an `LruTable`.
- `LruTable`: key -> value with at most `capacity` entries; `touch` marks a key recent, the least
  recently touched entry is dropped first. `get` does not reorder, so reading is side-effect free.
"""

from __future__ import annotations

import bisect
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from predictors.base import QUANTILES, quantile_sorted

V = TypeVar("V")

_U32_MAX = 0xFFFFFFFF


class RollingWindow:
    """Exact quantiles of the last `capacity` values."""

    __slots__ = ("capacity", "_ring", "_next", "_sorted")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._ring: list[float] = []
        self._next = 0  # slot the next value overwrites once the ring is full
        self._sorted: list[float] = []

    def add(self, x: float) -> None:
        if len(self._ring) < self.capacity:
            self._ring.append(x)
        else:
            old = self._ring[self._next]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._ring[self._next] = x
            self._next = (self._next + 1) % self.capacity
        bisect.insort(self._sorted, x)

    def __len__(self) -> int:
        return len(self._ring)

    def quantile(self, q: float) -> float:
        """The q-quantile of the window (ValueError when empty)."""
        if not self._sorted:
            raise ValueError("the window is empty")
        return quantile_sorted(self._sorted, q)

    def quantiles(self) -> tuple[float, ...]:
        return tuple(quantile_sorted(self._sorted, q) for q in QUANTILES)

    @property
    def sorted_values(self) -> list[float]:
        """The window's values, ascending (do not modify)."""
        return self._sorted


def new_ring() -> array:
    """An empty ring of recent lengths (uint32): 64 bytes + 4 per length, no per-value objects."""
    return array("I")


def ring_add(ring: array, x: float, size: int) -> None:
    """Append x to ring, keeping its last `size` values (oldest first)."""
    ring.append(min(int(x), _U32_MAX))
    if len(ring) > size:
        del ring[0]


class LruTable(Generic[V]):
    """At most `capacity` entries; the least recently touched is evicted first."""

    __slots__ = ("capacity", "_d")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._d: OrderedDict[object, V] = OrderedDict()

    def get(self, key: object) -> V | None:
        """The entry for key, or None; does not change the recency order."""
        return self._d.get(key)

    def touch(self, key: object, make: Callable[[], V]) -> V:
        """The entry for key (made with `make()` if absent), marked most recent."""
        d = self._d
        v = d.get(key)
        if v is None:
            v = d[key] = make()
            if len(d) > self.capacity:
                d.popitem(last=False)
        else:
            d.move_to_end(key)
        return v

    def __len__(self) -> int:
        return len(self._d)

    def values(self):
        return self._d.values()

    def items(self):
        return self._d.items()
