"""The exact prefix index: which replica holds which KV block, fed by the replicas' KV events.

Keys are *our* block hashes (protocol.hashing, design §3), recomputed from each event's
`token_ids`: the chain parent is our hash of the event's engine parent, or the root for a chain
start. Engine hashes are opaque ids, used only to find that parent and to apply removals. For a
kvfleet replica our hash equals the engine hash; for vLLM (sha256-based) it does not; nothing
here assumes either.

    tables[medium]  : our_hash -> bitmask of replica slots holding it      (one dict per medium)
    any             : our_hash -> bitmask of replica slots holding it in any medium
                      (only once some replica has published a medium other than GPU)
    replica.media[m]: engine_hash -> our_hash, for the blocks it holds      (one dict per replica)

`match(chain)` walks the chain once, AND-ing masks; a replica's bit drops out at its first
missing block, and the walk stops when no bit is left.

Tiers: a replica with a KV offload tier publishes its host (or disk) blocks under their own
medium ("CPU", "STORAGE": vLLM's, as its OffloadingConnector sends them), and a block may sit
in several media at once. Media are keyed by the tier they name (`protocol.events.
canonical_medium`, once per event: "CPU_PINNED" is "CPU", "Disk" / "DISK" / "NVME" are
"STORAGE", ...), so one table holds a tier's blocks whoever spelled it; a medium no alias names
keeps a table of its own. `match(chain)` is the device (GPU) prefix; `match_offloaded(chain,
device)` walks the `any` table once more and reports, per replica, the blocks right after its
device prefix that continue the chain in some tier: those its engine loads instead of
recomputing (the chain is device prefix first, then the lower tiers, as Dynamo's tiered lookup
and vLLM's scheduler, which asks the connector only past the device hit, do); `match_disk`,
of those, the blocks held on disk only. While no replica publishes a
non-GPU medium `any` does not exist and tiers cost nothing: no table, no second walk.
Memory per held block: one entry in the replica's engine map, plus one table entry shared by
the replicas holding the block.

The tables are `balancer._blocktable.BlockTable`s, for any fleet size (C: open addressing over
uint64 key/mask slots, 16 bytes for up to 64 replicas, masks widening by one 64-bit word per 64
more; `set_bit` / `clear_bit` store and remove one (block, replica) pair in one call;
`BlockTable.match` does the whole walk, prefetching the slots of the next hashes, so a
cold-cache lookup costs about one overlapped miss per block instead of ~3 serial ones). Only
where the extension is not built (`NATIVE_TABLE` is False) are they `DictTable`s, the same API
over a dict of Python ints with interned masks (a fleet has few distinct ones) walked by
`match_chain` (map/accumulate/takewhile in C, then bisection); the tests use it as the oracle
of the C table. Both give the same results.

Invariants (`check_integrity`):
- bit s is set in tables[m][h] iff replica with slot s maps at least one engine hash to h in m;
  `multi[m][h]` counts the extra engine hashes of one replica that map to the same h (e.g. a
  vLLM block salted with extra_keys we cannot see), so a removal clears the bit only when the
  last one goes;
- `any` (when it exists) is the OR of the media tables, entry by entry;
- no table entry has an empty mask; a replica holds at most `max_blocks_per_replica` blocks;
- every table is of one kind: a C BlockTable where the extension is built, else a DictTable.

Parent resolution for BlockStored, in order: the replica's engine map (any medium); a small
FIFO of recently removed blocks ("ghosts": the engine->our mapping is a function of content, so
it stays valid after removal, and vLLM may name a parent that was just evicted); and, when the
engine parent is an int, a *verified* identity: if H(parent, first block's tokens) equals the
event's first engine hash, the engine uses our hash function and our parent is that int (a
false match has probability 2**-64). Otherwise the event is skipped, counted in
`stats.unknown_parent`, and the replica is flagged for resync (`pop_resync_reason`).

Capacity policy: a real engine can never hold more blocks than its pool, so a replica whose
index entries reach `max_blocks_per_replica` has missed removals (or the bound is set below the
engine's pool size): further stores for it are dropped, counted in `stats.over_capacity`, and the
replica is flagged for resync. Set the bound at or above the largest pool (GPU + offload tiers).

Not thread-safe: use it from the balancer's event loop only.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat, takewhile
from operator import and_, neg

import xxhash

from protocol.events import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    KVEvent,
    canonical_medium,
)
from protocol.hashing import chain_hashes, root_hash, token_bytes

try:
    from balancer._blocktable import BlockTable as _BlockTable
except ImportError:  # extension not built (no C compiler at install time): DictTable
    _BlockTable = None

# True when new indexes keep their tables in C (reported by the benchmarks).
NATIVE_TABLE: bool = _BlockTable is not None

DEFAULT_MEDIUM = MEDIUM_GPU  # the device; also what a publisher that sends no medium (vLLM < 0.10) meant
_U64 = (1 << 64) - 1
_digest = xxhash.xxh3_64_intdigest
_MAX_INTERNED_MASKS = 65_536


@dataclass(slots=True)
class IndexStats:
    """Counters for metrics (cumulative, all replicas)."""

    blocks_stored: int = 0
    blocks_removed: int = 0
    duplicate_stores: int = 0  # a block stored again while held (at-least-once delivery)
    unknown_removals: int = 0  # removal of a block not held (never stored, or skipped)
    unknown_parent: int = 0  # BlockStored events skipped: parent not resolvable
    identity_parents: int = 0  # parents resolved by the verified-identity rule
    ghost_parents: int = 0  # parents resolved from recently removed blocks
    skipped_events: int = 0  # other block size, non-full-attention group, bad token_ids
    over_capacity: int = 0  # blocks dropped by the per-replica bound
    clears: int = 0  # AllBlocksCleared / clear_replica


class DictTable(dict):
    """`balancer._blocktable.BlockTable`'s API over a dict (our hash -> bitmask of replica
    slots): the fallback where the extension is not built, and the C table's oracle in tests.

    Masks are interned: one int object per distinct mask (a fleet has few), shared by the
    entries, which saves ~32 bytes per entry and a cache miss per block in `match`.
    """

    __slots__ = ("_masks",)

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[int, int] = {}

    def set_bit(self, key: int, slot: int) -> bool:
        """Set bit `slot` in `key`'s mask; True if it was clear."""
        mask = self.get(key, 0)
        bit = 1 << slot
        if mask & bit:
            return False
        self[key] = self._share(mask | bit)
        return True

    def clear_bit(self, key: int, slot: int) -> bool:
        """Clear bit `slot` in `key`'s mask, deleting an emptied key; True if it was set."""
        mask = self.get(key, 0)
        bit = 1 << slot
        if not mask & bit:
            return False
        mask ^= bit
        if mask:
            self[key] = self._share(mask)
        else:
            del self[key]
        return True

    def match(self, hashes: Sequence[int], owners: Sequence[str | None]) -> dict[str, int]:
        return match_chain(self.get, hashes, owners)

    def _share(self, mask: int) -> int:
        shared = self._masks.get(mask)
        if shared is not None:
            return shared
        if len(self._masks) >= _MAX_INTERNED_MASKS:
            self._masks.clear()  # sharing is only an optimisation: start afresh
        self._masks[mask] = mask
        return mask


_Table = DictTable  # for annotations: a table of either kind (a BlockTable has DictTable's API)


class _Medium:
    __slots__ = ("emap", "multi")

    def __init__(self) -> None:
        self.emap: dict[EngineHash, int] = {}
        self.multi: dict[int, int] = {}


class _Replica:
    __slots__ = ("replica_id", "slot", "media", "num_blocks", "ghosts", "ghost_order", "resync_reason")

    def __init__(self, replica_id: str, slot: int) -> None:
        self.replica_id = replica_id
        self.slot = slot
        self.media: dict[str, _Medium] = {}
        self.num_blocks = 0
        self.ghosts: dict[EngineHash, int] = {}
        self.ghost_order: deque[EngineHash] = deque()
        self.resync_reason: str | None = None


class PrefixIndex:
    # Runs of removals, and stores of blocks none of which is held yet, in bulk (same result);
    # False: block by block (the tests' oracle for the bulk paths).
    bulk: bool = True

    def __init__(
        self,
        block_size: int,
        model: str,
        salt: str | None = None,
        *,
        max_blocks_per_replica: int = 4_000_000,
        ghost_capacity: int = 4096,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_blocks_per_replica <= 0 or ghost_capacity < 0:
            raise ValueError("max_blocks_per_replica must be positive and ghost_capacity >= 0")
        self.block_size = block_size
        self.model = model
        self.max_blocks_per_replica = max_blocks_per_replica
        self.ghost_capacity = ghost_capacity
        self.salt = salt
        self.root = root_hash(model, salt)
        # Events with a LoRA adapter are indexed under root_hash(model, salt, lora_name): a
        # request for that adapter looks up prompt_hashes(tokens, bs, model, lora_name=...), so
        # two adapters (or an adapter and the base model) never match each other's blocks.
        self._roots: dict[str | None, int] = {None: self.root}
        # C tables where the extension is built, whatever the fleet size (module docstring).
        self._table_type = DictTable if _BlockTable is None else _BlockTable
        self._tables: dict[str, _Table] = {DEFAULT_MEDIUM: self._table_type()}
        self._any: _Table | None = None  # every medium together, built with the first non-GPU one
        self._replicas: dict[str, _Replica] = {}
        self._owners: list[str | None] = []  # slot -> replica id
        self.stats = IndexStats()

    # --- replicas -----------------------------------------------------------------------------

    def replicas(self) -> list[str]:
        return list(self._replicas)

    def num_blocks(self, replica_id: str) -> int:
        r = self._replicas.get(replica_id)
        return 0 if r is None else r.num_blocks

    def add_replica(self, replica_id: str) -> None:
        self._replica(replica_id)

    def remove_replica(self, replica_id: str) -> None:
        """Forget the replica and free its slot. Unknown ids: no-op."""
        r = self._replicas.get(replica_id)
        if r is None:
            return
        self._clear(r)
        del self._replicas[replica_id]
        self._owners[r.slot] = None

    def clear_replica(self, replica_id: str) -> None:
        """Drop every block the replica holds (it stays registered)."""
        r = self._replicas.get(replica_id)
        if r is not None:
            self._clear(r)
            self.stats.clears += 1

    def pop_resync_reason(self, replica_id: str) -> str | None:
        """Why the index thinks it lost track of the replica since the last call, or None."""
        r = self._replicas.get(replica_id)
        if r is None:
            return None
        reason, r.resync_reason = r.resync_reason, None
        return reason

    def _replica(self, replica_id: str) -> _Replica:
        r = self._replicas.get(replica_id)
        if r is None:
            try:
                slot = self._owners.index(None)  # lowest free slot keeps the masks small
                self._owners[slot] = replica_id
            except ValueError:
                slot = len(self._owners)
                self._owners.append(replica_id)
            r = self._replicas[replica_id] = _Replica(replica_id, slot)
        return r

    # --- events -------------------------------------------------------------------------------

    def apply(self, replica_id: str, event: KVEvent) -> None:
        r = self._replicas.get(replica_id) or self._replica(replica_id)
        if type(event) is BlockRemoved:
            self._remove(r, event)  # type: ignore[arg-type]
        else:
            self._apply_other(r, event)

    def _apply_other(self, r: _Replica, event: KVEvent) -> None:
        """`apply` for anything but a BlockRemoved (TypeError for what is not a KV event)."""
        kind = type(event)
        if kind is BlockStored:
            self._store(r, event)  # type: ignore[arg-type]
        elif kind is AllBlocksCleared:
            self._clear(r)
            self.stats.clears += 1
        else:
            raise TypeError(f"not a KV event: {event!r}")

    def apply_many(self, replica_id: str, events: Iterable[KVEvent]) -> None:
        """`apply` each event in order. A run of BlockRemoved events of one medium (a full
        cache evicts one block per event) is applied in one pass, with the same result."""
        if not self.bulk:
            for event in events:
                self.apply(replica_id, event)
            return
        r = self._replicas.get(replica_id) or self._replica(replica_id)
        run: list[EngineHash] = []  # hashes of the pending run of removals
        run_medium: str | None = None
        for event in events:
            if type(event) is BlockRemoved:
                if run and event.medium != run_medium:
                    self._remove_hashes(r, run_medium, run)
                    run = []
                run_medium = event.medium  # type: ignore[union-attr]
                run.extend(event.block_hashes)  # type: ignore[union-attr]
                continue
            if run:
                self._remove_hashes(r, run_medium, run)
                run = []
            self._apply_other(r, event)
        if run:
            self._remove_hashes(r, run_medium, run)

    def load_snapshot(self, replica_id: str, events: Iterable[BlockStored]) -> None:
        """Replace the replica's entries with a snapshot, in whatever order its events come.

        Events whose parent is not known yet are retried after the others, until no pass makes
        progress; what is left then counts as unknown_parent.
        """
        r = self._replica(replica_id)
        self._clear(r)
        pending = list(events)
        while pending:
            deferred = [ev for ev in pending if not self._store(r, ev, defer=True)]
            if len(deferred) == len(pending):
                for ev in deferred:
                    self._store(r, ev)
                break
            pending = deferred

    def _root(self, lora_name: str | None) -> int:
        root = self._roots.get(lora_name)
        if root is None:
            root = self._roots[lora_name] = root_hash(self.model, self.salt, lora_name)
        return root

    def _parent_fallback(self, r: _Replica, ev: BlockStored, first_block: bytes) -> int | None:
        """A parent not held by the replica: a ghost, or a verified identity (module docstring)."""
        parent = ev.parent_block_hash
        ours = r.ghosts.get(parent)  # type: ignore[arg-type]
        if ours is not None:
            self.stats.ghost_parents += 1
            return ours
        if type(parent) is int and 0 <= parent <= _U64:
            if _digest(parent.to_bytes(8, "little") + first_block) == ev.block_hashes[0]:
                self.stats.identity_parents += 1
                return parent
        return None

    def _store(self, r: _Replica, ev: BlockStored, defer: bool = False) -> bool:
        """Index the event's blocks. False only when `defer` and the parent is unknown."""
        engine_ids = ev.block_hashes
        n = len(engine_ids)
        if n == 0:
            return True
        bs = self.block_size
        kind = ev.kv_cache_spec_kind
        if ev.block_size != bs or len(ev.token_ids) != n * bs or (kind is not None and kind != "full_attention"):
            self.stats.skipped_events += 1
            return True
        if ev.lora_name is None and ev.lora_id:  # an adapter's blocks, but not which adapter by name:
            self.stats.skipped_events += 1  # indexed as the base model's, they would match its requests
            return True
        try:
            raw = token_bytes(ev.token_ids)
        except (ValueError, TypeError):  # a token id outside uint32
            self.stats.skipped_events += 1
            return True
        step = 4 * bs
        parent = ev.parent_block_hash
        if parent is None:
            parent = self._root(ev.lora_name)
        else:
            engine_parent = parent
            parent = None
            for medium_map in r.media.values():
                parent = medium_map.emap.get(engine_parent)
                if parent is not None:
                    break
            if parent is None:
                parent = self._parent_fallback(r, ev, raw[:step])
        if parent is None:
            if defer:
                return False
            self.stats.unknown_parent += 1
            r.resync_reason = r.resync_reason or "unknown_parent"
            return True
        medium = canonical_medium(ev.medium)
        m = r.media.get(medium)
        if m is None:
            m = r.media[medium] = _Medium()
        table = self._tables.get(medium)
        if table is None:
            table = self._tables[medium] = self._table_type()
            if self._any is None and medium != DEFAULT_MEDIUM:
                self._build_any()
        any_set = None if self._any is None else self._any.set_bit
        emap = m.emap
        set_bit = table.set_bit
        slot = r.slot
        room = self.max_blocks_per_replica - r.num_blocks
        stored = 0
        # Our chain over the event's token buffer, in one call (C where the extension is built).
        ours = chain_hashes(raw, bs, parent, n)
        if self.bulk and n <= room and emap.keys().isdisjoint(engine_ids) and len(set(engine_ids)) == n:
            # None of the ids held yet and room for all (nearly every event): the loop below
            # would store every block; the same, with the engine map filled in one call.
            if list(engine_ids) == ours:  # a kvfleet replica: engine ids are our hashes
                emap.update(zip(ours, ours))  # one int object per block, key and value
            else:
                emap.update((oh if eh == oh else eh, oh) for eh, oh in zip(engine_ids, ours))
            multi = m.multi
            for oh in ours:
                if not set_bit(oh, slot):  # the replica already holds oh under another engine id
                    multi[oh] = multi.get(oh, 1) + 1
                elif any_set is not None:
                    any_set(oh, slot)
            r.num_blocks += n
            self.stats.blocks_stored += n
            return True
        for eh, oh in zip(engine_ids, ours):
            held = emap.get(eh)
            if held is not None:
                if held == oh:
                    self.stats.duplicate_stores += 1
                    continue
                self._drop(r, m, table, eh)  # same engine id, other content: the newer wins
                room += 1
            if stored >= room:
                self.stats.over_capacity += 1
                r.resync_reason = r.resync_reason or "over_capacity"
                continue
            emap[oh if eh == oh else eh] = oh  # share one int object when the ids coincide
            if not set_bit(oh, slot):  # the replica already holds oh under another engine id
                m.multi[oh] = m.multi.get(oh, 1) + 1
            elif any_set is not None:
                any_set(oh, slot)  # False when another medium of the replica holds it already
            stored += 1
        r.num_blocks += stored
        self.stats.blocks_stored += stored
        return True

    def _drop(self, r: _Replica, m: _Medium, table: _Table, eh: EngineHash) -> bool:
        oh = m.emap.pop(eh, None)
        if oh is None:
            return False
        r.num_blocks -= 1
        if self.ghost_capacity:
            if eh not in r.ghosts:
                r.ghost_order.append(eh)
                if len(r.ghost_order) > self.ghost_capacity:
                    r.ghosts.pop(r.ghost_order.popleft(), None)
            r.ghosts[eh] = oh
        multi = m.multi
        if multi:
            c = multi.get(oh)
            if c is not None:
                if c > 2:
                    multi[oh] = c - 1
                else:
                    del multi[oh]
                return True
        table.clear_bit(oh, r.slot)
        if self._any is not None:
            self._drop_any(r, m, oh)
        return True

    def _drop_any(self, r: _Replica, m: _Medium, oh: int) -> None:
        """`oh` left medium `m` of `r`: clear its `any` bit unless another medium still holds it."""
        slot = r.slot
        for medium, other in r.media.items():
            if other is not m and self._tables[medium].get(oh, 0) >> slot & 1:
                return
        self._any.clear_bit(oh, slot)  # type: ignore[union-attr]

    def _build_any(self) -> None:
        """The `any` table from the media tables (once, when the first lower tier appears)."""
        union = self._table_type()
        set_bit = union.set_bit
        for table in self._tables.values():
            for oh, mask in table.items():
                while mask:
                    low = mask & -mask
                    set_bit(oh, low.bit_length() - 1)
                    mask ^= low
        self._any = union

    def _remove(self, r: _Replica, ev: BlockRemoved) -> None:
        self._remove_hashes(r, ev.medium, ev.block_hashes)

    def _remove_hashes(self, r: _Replica, medium: str | None, hashes: Sequence[EngineHash]) -> None:
        """Drop the blocks `hashes` (engine ids) of `medium` from `r`: BlockRemoved events."""
        medium = canonical_medium(medium)
        m = r.media.get(medium)
        if m is None:
            self.stats.unknown_removals += len(hashes)
            return
        table = self._tables[medium]
        total = len(hashes)
        removed = 0
        if m.multi or self._any is not None or not self.bulk:
            for eh in hashes:
                if self._drop(r, m, table, eh):
                    removed += 1
        else:  # `_drop` of each, in bulk for the common case: no engine id shares a block, no lower tiers
            ours = list(map(m.emap.pop, hashes, repeat(None)))
            if None in ours:  # ids not held: unknown removals
                held = [(eh, oh) for eh, oh in zip(hashes, ours) if oh is not None]
                hashes, ours = [eh for eh, _ in held], [oh for _, oh in held]
            removed = len(ours)
            capacity = self.ghost_capacity
            if capacity:  # the removed ids join the ghosts (a FIFO of `capacity`), oldest first
                ghosts, order = r.ghosts, r.ghost_order
                if ghosts.keys().isdisjoint(hashes):
                    order.extend(hashes)
                    ghosts.update(zip(hashes, ours))
                    for _ in range(len(order) - capacity):
                        ghosts.pop(order.popleft(), None)
                else:
                    for eh, oh in zip(hashes, ours):
                        if eh not in ghosts:
                            order.append(eh)
                            if len(order) > capacity:
                                ghosts.pop(order.popleft(), None)
                        ghosts[eh] = oh
            clear_bit, slot = table.clear_bit, r.slot
            for oh in ours:
                clear_bit(oh, slot)
            r.num_blocks -= removed
        self.stats.blocks_removed += removed
        self.stats.unknown_removals += total - removed

    def _clear(self, r: _Replica) -> None:
        slot = r.slot
        any_clear = None if self._any is None else self._any.clear_bit
        for medium, m in r.media.items():
            clear_bit = self._tables[medium].clear_bit
            for oh in m.emap.values():
                clear_bit(oh, slot)  # False for a block cleared already through another engine id
                if any_clear is not None:
                    any_clear(oh, slot)
        r.media.clear()
        r.num_blocks = 0
        r.ghosts.clear()
        r.ghost_order.clear()

    # --- lookups ------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int], medium: str = DEFAULT_MEDIUM) -> dict[str, int]:
        """For each replica holding the chain's first block: how many leading blocks it holds
        in `medium` (the device by default; any spelling of a tier, protocol.events.canonical_medium).

        One pass over `hashes` (our chain hashes, e.g. protocol.hashing.prompt_hashes), which
        stops as soon as no replica is left. Replicas holding no leading block are absent.
        Does not modify the index.
        """
        if medium is not DEFAULT_MEDIUM:
            medium = canonical_medium(medium)
        table = self._tables.get(medium)
        if not table or not hashes:
            return {}
        return table.match(hashes, self._owners)

    def match_offloaded(self, hashes: Sequence[int], device: Mapping[str, int]) -> dict[str, int]:
        """For each replica: how many blocks right after its device prefix (`device[r]`, what
        `match(hashes)` returned) continue the chain in any of its media: the lower-tier hit
        (host, disk) its engine loads instead of recomputing. Replicas with none are absent.

        {} at once while no replica has published a non-GPU medium. One more walk otherwise.
        A block past the device prefix counts as a lower-tier one even where the device holds
        it too (after a gap in the device prefix): the engine stops its device match at the gap.
        Does not modify the index."""
        union = self._any
        if union is None or not hashes:
            return {}
        out: dict[str, int] = {}
        get = device.get
        for rid, n in union.match(hashes, self._owners).items():
            extra = n - get(rid, 0)
            if extra > 0:
                out[rid] = extra
        return out

    def match_disk(self, hashes: Sequence[int], device: Mapping[str, int],
                   offloaded: Mapping[str, int]) -> dict[str, int]:
        """Of each replica's lower-tier hit (`offloaded[r]` blocks after its device prefix
        `device[r]`: what `match_offloaded` returned), the blocks its host tier ("CPU") does not
        hold but its disk tier ("STORAGE", or a medium read as one) does: those its engine loads
        from disk (a block in both comes from the host, the highest tier holding it, as
        replica/kv_offload.py looks up). Replicas with none are absent; {} at once while no
        replica has published a disk block.
        A block in a third medium ends the count (priced as host). Does not modify the index."""
        disk = self._tables.get(MEDIUM_DISK)
        if not disk or not offloaded:
            return {}
        host = self._tables.get(MEDIUM_CPU)
        owners = self._owners
        out: dict[str, int] = {}
        for rid, n in offloaded.items():
            pos = device.get(rid, 0)
            end = pos + n
            on_disk = 0
            while pos < end:  # alternate runs of host and disk blocks, each one C walk
                if host:
                    pos += host.match(hashes[pos:end], owners).get(rid, 0)
                    if pos >= end:
                        break
                run = disk.match(hashes[pos:end], owners).get(rid, 0)
                if not run:
                    break
                on_disk += run
                pos += run
            if on_disk:
                out[rid] = on_disk
        return out

    def replica_block_hashes(self, replica_id: str, medium: str = DEFAULT_MEDIUM) -> set[int]:
        """Our hashes of every block the replica holds in `medium` (a copy; for tests)."""
        medium = canonical_medium(medium)
        r = self._replicas.get(replica_id)
        if r is None or medium not in r.media:
            return set()
        return set(r.media[medium].emap.values())

    @property
    def native_tables(self) -> bool:
        """Whether the tables are C BlockTables (else DictTables; module docstring)."""
        return self._table_type is not DictTable

    def num_entries(self, medium: str = DEFAULT_MEDIUM) -> int:
        """Distinct blocks indexed in `medium` (any spelling), over all replicas."""
        return len(self._tables.get(canonical_medium(medium), ()))

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant (module docstring)."""
        expected: dict[str, dict[int, int]] = {medium: {} for medium in self._tables}
        for replica_id, r in self._replicas.items():
            if self._owners[r.slot] != replica_id:
                raise RuntimeError(f"replica {replica_id!r}: slot {r.slot} owned by {self._owners[r.slot]!r}")
            total = 0
            for medium, m in r.media.items():
                counts: dict[int, int] = {}
                for oh in m.emap.values():
                    counts[oh] = counts.get(oh, 0) + 1
                for oh, c in counts.items():
                    if m.multi.get(oh, 1) != c:
                        raise RuntimeError(f"replica {replica_id!r}: {c} engine ids map to {oh:#x}, multi says {m.multi.get(oh, 1)}")
                    exp = expected.setdefault(medium, {})
                    exp[oh] = exp.get(oh, 0) | 1 << r.slot
                if set(m.multi) - set(counts):
                    raise RuntimeError(f"replica {replica_id!r}: multi counts for blocks it does not hold")
                total += len(m.emap)
            if total != r.num_blocks:
                raise RuntimeError(f"replica {replica_id!r}: num_blocks {r.num_blocks} but holds {total}")
            if total > self.max_blocks_per_replica:
                raise RuntimeError(f"replica {replica_id!r}: {total} blocks over the bound")
        if self._any is not None:
            union: dict[int, int] = {}
            for exp in expected.values():
                for oh, mask in exp.items():
                    union[oh] = union.get(oh, 0) | mask
            if type(self._any) is not self._table_type or self._any != union:
                bad = next((h for h in set(self._any) | set(union) if self._any.get(h) != union.get(h)), None)
                raise RuntimeError(f"any-medium table: {bad!r} has mask {self._any.get(bad)!r}, expected {union.get(bad)!r}")
        elif any(medium != DEFAULT_MEDIUM for medium in self._tables):
            raise RuntimeError("a non-GPU medium is indexed but there is no any-medium table")
        for medium, table in self._tables.items():
            if type(table) is not self._table_type:
                raise RuntimeError(f"{medium} table is a {type(table).__name__}, not a {self._table_type.__name__}")
            exp = expected.get(medium, {})
            if table != exp:
                bad = next(h for h in set(table) | set(exp) if table.get(h) != exp.get(h))
                raise RuntimeError(f"{medium} table: {bad:#x} has mask {table.get(bad)!r}, expected {exp.get(bad)!r}")


def match_chain(get: Callable[[int, int], int], hashes: Sequence[int], owners: Sequence[str | None]) -> dict[str, int]:
    """Leading blocks held per replica, from `get(hash, 0) -> slot bitmask`.

    acc[i] = mask(h_0) & ... & mask(h_i): the replicas holding all of the first i+1 blocks. The
    walk runs in C (map -> accumulate -> takewhile) and stops at the first empty acc. As sets of
    bits the acc values only shrink, so as ints they never increase: the few points where they
    drop (one per distinct prefix length) are found by bisection.
    """
    acc = list(takewhile(bool, accumulate(map(get, hashes, repeat(0)), and_)))
    out: dict[str, int] = {}
    n = len(acc)
    j = 0
    while j < n:
        v = acc[j]
        j = bisect_right(acc, -v, j, n, key=neg)  # first index whose acc is below v
        lost = v & ~acc[j] if j < n else v
        while lost:
            low = lost & -lost
            out[owners[low.bit_length() - 1]] = j  # type: ignore[index]
            lost ^= low
    return out
