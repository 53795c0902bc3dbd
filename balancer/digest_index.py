"""The digest-fed prefix index: each replica's latest cache digest (protocol/digest.py).

Where the exact index (balancer/prefix_index.py) knows every block a replica holds from its KV
events, this one knows only a filter of the block hashes the replica held when it took its last
digest. The cached prefix of a chain on a replica is the chain's longest prefix whose hashes are
all in that filter: it may be over-counted by false positives (about rate**k for k extra blocks)
and is as stale as the digest (blocks evicted since still count, blocks stored since do not).

`match` has `PrefixIndex.match`'s shape (replica -> leading blocks, replicas with none absent),
so `balancer.router.Router` lays its answer over the event index's for the replicas that route
from digests (`overlay`), and no policy knows which index spoke.

A digest is used while younger than `max_age_s` (by the balancer's clock, from its arrival);
one for another block size than the balancer hashes with is refused (`stats.refused`).

Not thread-safe: use it from the balancer's event loop only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol.digest import CacheDigest


@dataclass(slots=True)
class DigestStats:
    received: int = 0  # digests accepted, all replicas
    refused: int = 0  # digests for another block size


class _Held:
    __slots__ = ("digest", "received_at", "wire_bytes")

    def __init__(self, digest: CacheDigest, received_at: float, wire_bytes: int) -> None:
        self.digest = digest
        self.received_at = received_at
        self.wire_bytes = wire_bytes


class DigestIndex:
    def __init__(self, block_size: int, max_age_s: float, clock: Callable[[], float]) -> None:
        if block_size <= 0 or max_age_s <= 0:
            raise ValueError("DigestIndex needs block_size > 0 and max_age_s > 0")
        self.block_size = block_size
        self.max_age_s = max_age_s
        self.clock = clock
        self._held: dict[str, _Held] = {}
        self.stats = DigestStats()

    def update(self, replica_id: str, digest: CacheDigest, wire_bytes: int = 0) -> bool:
        """Hold `digest` as the replica's latest; False (and nothing changes) if it is for
        another block size."""
        if digest.block_size != self.block_size:
            self.stats.refused += 1
            return False
        self._held[replica_id] = _Held(digest, self.clock(), wire_bytes)
        self.stats.received += 1
        return True

    def remove_replica(self, replica_id: str) -> None:
        self._held.pop(replica_id, None)

    def age_s(self, replica_id: str) -> float | None:
        """Seconds since the replica's latest digest arrived; None: none held."""
        held = self._held.get(replica_id)
        return None if held is None else self.clock() - held.received_at

    def fresh(self, replica_id: str) -> bool:
        age = self.age_s(replica_id)
        return age is not None and age <= self.max_age_s

    def latest(self, replica_id: str) -> CacheDigest | None:
        held = self._held.get(replica_id)
        return None if held is None else held.digest

    def wire_bytes(self, replica_id: str) -> int:
        held = self._held.get(replica_id)
        return 0 if held is None else held.wire_bytes

    def num_blocks(self, replica_id: str) -> int:
        """Blocks the replica held at its latest fresh digest (0: none)."""
        return self._held[replica_id].digest.num_blocks if self.fresh(replica_id) else 0

    def match(self, hashes: Sequence[int], use: Callable[[str], bool] = lambda rid: True) -> dict[str, int]:
        """For each replica with a fresh digest that `use` accepts: its leading blocks of
        `hashes` (0 included, so a caller can tell "digest says none" from "no digest").
        Does not modify the index."""
        if not hashes:
            return {}
        now = self.clock()
        out: dict[str, int] = {}
        for rid, held in self._held.items():
            if now - held.received_at <= self.max_age_s and use(rid):
                out[rid] = held.digest.prefix_len(hashes)
        return out

    def overlay(self, matched: dict[str, int], hashes: Sequence[int], use: Callable[[str], bool]) -> None:
        """Replace, in `matched` (an event-index answer), the entries of replicas that route from
        their digest (`use`) by the digest's answer."""
        for rid, n in self.match(hashes, use).items():
            if n:
                matched[rid] = n
            else:
                matched.pop(rid, None)
