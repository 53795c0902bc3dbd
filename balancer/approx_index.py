"""The approximate prefix index, for replicas that publish no KV events.

It learns from the balancer's own routing decisions: when a prompt is sent to a replica, that
replica will soon hold the prompt's blocks (`record`). What it cannot see is eviction, so it
guesses: a block not routed to for `ttl_s` is taken as evicted, and a replica is assumed to keep
at most `capacity_per_replica` blocks, least recently routed first out (an LRU, as the engines'
own block pools are). `match` has the exact index's signature and semantics.

    table            : our_hash -> bitmask of replica slots believed to hold it
    replica.lru      : our_hash -> last time routed, oldest first (an OrderedDict)

A prompt's blocks are recorded tail first, so its head is the most recently used and is evicted
last, like vLLM's tail-first freeing: evicting the head first would leave a tail no lookup can
reach. The clock is a parameter (wall or virtual time); times passed to `record`/`match` must
not go backwards (an earlier one is treated as the latest seen).

Not thread-safe: use it from the balancer's event loop only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from balancer.prefix_index import match_chain


class _Replica:
    __slots__ = ("slot", "bit", "lru", "last_now")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.bit = 1 << slot
        # OrderedDict, not dict: popping a plain dict's oldest entry rescans the deleted slots
        # at its front, O(n) per pop under steady churn.
        self.lru: OrderedDict[int, float] = OrderedDict()
        self.last_now = float("-inf")


class ApproxIndex:
    def __init__(
        self,
        *,
        capacity_per_replica: int = 100_000,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_per_replica <= 0:
            raise ValueError(f"capacity_per_replica must be positive, got {capacity_per_replica}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.capacity_per_replica = capacity_per_replica
        self.ttl_s = ttl_s
        self.clock = clock
        self._table: dict[int, int] = {}
        self._replicas: dict[str, _Replica] = {}
        self._owners: list[str | None] = []
        self.evicted_capacity = 0
        self.evicted_ttl = 0

    def replicas(self) -> list[str]:
        return list(self._replicas)

    def record(self, replica_id: str, hashes: Sequence[int], now: float | None = None) -> None:
        """The prompt with chain `hashes` was routed to `replica_id` at `now` (default: clock)."""
        r = self._replica(replica_id)
        now = self._now(r, now)
        lru = r.lru
        table = self._table
        bit = r.bit
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                table[h] = table.get(h, 0) | bit
            lru[h] = now
        excess = len(lru) - self.capacity_per_replica
        if excess > 0:
            self.evicted_capacity += excess
            self._evict_oldest(r, excess)

    def match(self, hashes: Sequence[int], now: float | None = None) -> dict[str, int]:
        """Leading blocks each replica is believed to hold (see PrefixIndex.match)."""
        self.expire(now)
        if not hashes:
            return {}
        return match_chain(self._table.get, hashes, self._owners)

    def expire(self, now: float | None = None) -> None:
        """Forget every block not routed to within ttl_s of `now`."""
        now = self.clock() if now is None else now
        horizon = now - self.ttl_s
        table = self._table
        for r in self._replicas.values():
            lru = r.lru
            keep = ~r.bit
            while lru:
                h, ts = next(iter(lru.items()))
                if ts > horizon:
                    break
                lru.popitem(last=False)
                self.evicted_ttl += 1
                mask = table[h] & keep
                if mask:
                    table[h] = mask
                else:
                    del table[h]

    def clear_replica(self, replica_id: str) -> None:
        r = self._replicas.get(replica_id)
        if r is not None:
            self._evict_oldest(r, len(r.lru))

    def remove_replica(self, replica_id: str) -> None:
        r = self._replicas.pop(replica_id, None)
        if r is not None:
            self._evict_oldest(r, len(r.lru))
            self._owners[r.slot] = None

    def replica_block_hashes(self, replica_id: str) -> set[int]:
        r = self._replicas.get(replica_id)
        return set() if r is None else set(r.lru)

    def check_integrity(self) -> None:
        expected: dict[int, int] = {}
        for replica_id, r in self._replicas.items():
            if self._owners[r.slot] != replica_id:
                raise RuntimeError(f"replica {replica_id!r}: slot {r.slot} owned by {self._owners[r.slot]!r}")
            if len(r.lru) > self.capacity_per_replica:
                raise RuntimeError(f"replica {replica_id!r}: {len(r.lru)} blocks over capacity")
            times = list(r.lru.values())
            if any(a > b for a, b in zip(times, times[1:])):
                raise RuntimeError(f"replica {replica_id!r}: LRU not in time order")
            for h in r.lru:
                expected[h] = expected.get(h, 0) | r.bit
        if expected != self._table:
            raise RuntimeError("table masks disagree with the replicas' LRUs")

    # --- internals ------------------------------------------------------------------------

    def _now(self, r: _Replica, now: float | None) -> float:
        now = self.clock() if now is None else now
        if now < r.last_now:
            now = r.last_now
        r.last_now = now
        return now

    def _replica(self, replica_id: str) -> _Replica:
        r = self._replicas.get(replica_id)
        if r is None:
            try:
                slot = self._owners.index(None)
                self._owners[slot] = replica_id
            except ValueError:
                slot = len(self._owners)
                self._owners.append(replica_id)
            r = self._replicas[replica_id] = _Replica(slot)
        return r

    def _evict_oldest(self, r: _Replica, n: int) -> None:
        lru = r.lru
        table = self._table
        keep = ~r.bit
        for _ in range(min(n, len(lru))):
            h, _ts = lru.popitem(last=False)
            mask = table[h] & keep
            if mask:
                table[h] = mask
            else:
                del table[h]
