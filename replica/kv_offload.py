"""KV offload tiers below the device pool: a host-memory tier and an optional local-disk tier.

Bookkeeping only, like the block pool: hashes, slots, LRU order, pins, events and the list of
copies to make. The bytes are moved by whoever runs the step (`replica.kv_offload_store` for the
torch engine; the simulated executor only prices them).

    device pool (GPU)  ──evict──▶  host tier (CPU)  ──evict──▶  disk tier (Disk)  ──evict──▶ gone
          ▲                            │                            │
          └──────── load (a prefix hit in a lower tier) ────────────┘

- Spill on eviction: when the device pool evicts a cached block (lazily, as it reuses it), the
  block is stored in the host tier first, unless the host tier holds it already (then it is only
  touched). A host-tier eviction spills the same way into the disk tier, if there is one.
- Each tier has its own capacity (slots) and LRU order; a lookup hit touches a block (most
  recently used), a load keeps the lower copy (as vLLM's LRU offloading manager: a load only
  references the block, it does not move it).
- A prefix lookup walks the device pool first; from the first block the device misses it goes
  on in the tiers, block by block (host before disk), and stops at the first block no tier holds.
  A hit is confirmed by token ids and parent hash, as in the device pool.
- Pins: blocks about to be loaded are pinned while the same allocation may evict (its new device
  blocks may spill into a full host tier), so they cannot be evicted before their load is queued.

Copies are queued as `Transfer`s in the order they are decided, and must be applied in that
order before the step's forward pass: a slot can be the source of one copy and the destination
of a later one in the same step (evicted, then reused), and order alone keeps that right.

Events follow vLLM's OffloadingConnector (vllm/distributed/kv_transfer/kv_connector/v1/
offloading/scheduler.py, `take_events`; the LRU manager vllm/v1/kv_offload/lru_manager.py):
`BlockStored(medium="CPU")` when a block enters the host tier, `BlockRemoved(medium="CPU")` when
the host tier evicts it, and the same with medium "STORAGE" for the disk tier (protocol.events'
media, vLLM's: vllm/v1/kv_offload/base.py `Medium`, whose STORAGE is its disk-backed file-system
tier; Dynamo's and llm-d's routers know both, and neither knew the "Disk" kvfleet sent before:
Dynamo matches media case-sensitively and some versions index an unknown one as the device). The
device copy is published
separately, as vLLM's GPU block pool does: `BlockRemoved(medium="GPU")` when the device pool
evicts it, `BlockStored(medium="GPU")` again when it is loaded back. A spill appends the tier's
BlockStored before the device pool's BlockRemoved, so a subscriber never sees the block held
nowhere. One deliberate difference: vLLM sends a tier's BlockStored with `token_ids=[]` and no
parent; ours carry the block's tokens and parent hash, as device events do, so a router that
re-hashes tokens (ours, llm-d's) indexes it, also from a snapshot after a resync; a router that
reads only `block_hashes` and `medium` sees what vLLM sends.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from protocol.events import MEDIUM_CPU, MEDIUM_DISK, MEDIUM_GPU, BlockRemoved, BlockStored, KVEvent


def check_disk_path(path: str | None) -> str:
    """The disk tier's file as given: named, in a directory that exists (else a ValueError that
    says what to do). The replica's flags are checked with it at start, the store before it
    creates the file."""
    if not path:
        raise ValueError("a disk KV tier needs a file: give --kv-offload-disk-path FILE")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--kv-offload-disk-path {path}: directory {directory} does not exist; "
                         "create it or name a file in an existing one")
    return path

# The media are protocol.events' ("GPU", "CPU", "STORAGE"; the engine's modules import them
# from here). The device pool is "GPU" whatever the device, as in vLLM.
TIER_MEDIA = (MEDIUM_CPU, MEDIUM_DISK)  # the order of the tiers below the device pool


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One tier below the device pool: its medium ("CPU" or "Disk") and capacity in blocks."""

    medium: str
    num_blocks: int

    def __post_init__(self) -> None:
        if self.medium not in TIER_MEDIA:
            raise ValueError(f"an offload tier's medium is one of {TIER_MEDIA}, got {self.medium!r}")
        if self.num_blocks < 1:
            raise ValueError(f"an offload tier needs at least 1 block, got {self.num_blocks}")


def tier_specs(host_blocks: int, disk_blocks: int) -> tuple[TierSpec, ...]:
    """The tiers for `host_kv_blocks` / `disk_kv_blocks` (0 = no such tier). A disk tier sits
    below the host tier, so it needs one."""
    if host_blocks < 0 or disk_blocks < 0:
        raise ValueError(f"offload tier sizes must be >= 0 blocks, got host={host_blocks} disk={disk_blocks}")
    if disk_blocks and not host_blocks:
        raise ValueError("a disk KV tier needs a host tier above it: give --kv-offload-host-blocks too")
    specs = []
    if host_blocks:
        specs.append(TierSpec(MEDIUM_CPU, host_blocks))
    if disk_blocks:
        specs.append(TierSpec(MEDIUM_DISK, disk_blocks))
    return tuple(specs)


@dataclass(slots=True, eq=False)
class TierBlock:
    """A block held in a tier: its slot there, its content's identity, and its pins."""

    medium: str
    slot: int
    block_hash: int
    token_ids: tuple[int, ...]
    parent_hash: int | None
    lora: tuple[int, str] | None
    pins: int = 0


class Transfer(NamedTuple):
    """Copy one block from (src_medium, src) to (dst_medium, dst): device block ids for "GPU",
    slots for a tier."""

    src_medium: str
    src: int
    dst_medium: str
    dst: int

    @property
    def transfer_type(self) -> str:
        """vLLM's `transfer_type` label of vllm:kv_offload_total_bytes: "GPU_to_CPU", "CPU_to_GPU"."""
        return f"{self.src_medium}_to_{self.dst_medium}"


@dataclass(slots=True)
class TierStats:
    """Totals since start, per tier (exported as kvfleet_replica_kv_offload_*)."""

    stored_blocks: int = 0  # blocks that entered the tier
    evicted_blocks: int = 0  # blocks the tier dropped (spilled further down or gone)
    loaded_blocks: int = 0  # blocks loaded from the tier into the device pool (prefix hits)
    skipped_stores: int = 0  # stores refused: every block of a full tier pinned


class OffloadTier:
    """One tier: `num_blocks` slots, a hash map, LRU order (oldest first), pins.

    Invariants (`check_integrity`): every held block has a distinct slot in [0, num_blocks);
    free slots and held slots partition the range; pins are never negative.
    """

    __slots__ = ("medium", "num_blocks", "_blocks", "_free", "_emit", "_transfers", "lower", "stats", "block_size")

    def __init__(self, spec: TierSpec, block_size: int, emit: Callable[[KVEvent], None],
                 transfers: list[Transfer], lower: OffloadTier | None = None) -> None:
        self.medium = spec.medium
        self.num_blocks = spec.num_blocks
        self.block_size = block_size
        self._blocks: OrderedDict[int, TierBlock] = OrderedDict()  # hash -> block, LRU first
        self._free = list(range(spec.num_blocks - 1, -1, -1))  # pop() hands out slot 0 first
        self._emit = emit
        self._transfers = transfers
        self.lower = lower
        self.stats = TierStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def get(self, block_hash: int, token_ids: Sequence[int], parent_hash: int | None) -> TierBlock | None:
        """The held block for `block_hash` if its tokens and parent match; changes nothing."""
        block = self._blocks.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids) or block.parent_hash != parent_hash:
            return None
        return block

    def touch(self, blocks: Iterable[TierBlock]) -> None:
        """Make the blocks the most recently used, in the order given."""
        for block in blocks:
            if self._blocks.get(block.block_hash) is block:
                self._blocks.move_to_end(block.block_hash)

    def store(self, block_hash: int, token_ids: tuple[int, ...], parent_hash: int | None,
              lora: tuple[int, str] | None, src_medium: str, src: int) -> bool:
        """Take a copy of a block that is leaving `src_medium` (slot/block id `src`).

        Already held: touched only (no copy, no event). Else a slot is freed if needed by
        evicting the least recently used unpinned block (spilled into `lower` first), the copy
        is queued and a BlockStored(medium) appended. False when nothing was stored.
        """
        held = self._blocks.get(block_hash)
        if held is not None:
            self._blocks.move_to_end(block_hash)
            return False
        if not self._free and not self._evict_one():
            self.stats.skipped_stores += 1
            return False
        slot = self._free.pop()
        self._blocks[block_hash] = TierBlock(self.medium, slot, block_hash, token_ids, parent_hash, lora)
        self._transfers.append(Transfer(src_medium, src, self.medium, slot))
        self.stats.stored_blocks += 1
        lora_id, lora_name = lora if lora is not None else (None, None)
        self._emit(BlockStored(block_hashes=(block_hash,), parent_block_hash=parent_hash, token_ids=token_ids,
                               block_size=self.block_size, lora_id=lora_id, medium=self.medium, lora_name=lora_name))
        return True

    def _evict_one(self) -> bool:
        for block_hash, block in self._blocks.items():  # LRU first
            if block.pins == 0:
                break
        else:
            return False
        if self.lower is not None:  # queued before this slot's new copy: order keeps the data
            self.lower.store(block_hash, block.token_ids, block.parent_hash, block.lora, self.medium, block.slot)
        del self._blocks[block_hash]
        self._free.append(block.slot)
        self.stats.evicted_blocks += 1
        self._emit(BlockRemoved(block_hashes=(block_hash,), medium=self.medium))
        return True

    def clear(self) -> None:
        """Forget every block (a prefix-cache reset; the caller emits AllBlocksCleared)."""
        self._blocks.clear()
        self._free = list(range(self.num_blocks - 1, -1, -1))

    def held(self) -> list[TierBlock]:
        """The held blocks, least recently used first (a copy)."""
        return list(self._blocks.values())

    def check_integrity(self) -> None:
        slots = [b.slot for b in self._blocks.values()]
        if len(set(slots)) != len(slots):
            raise RuntimeError(f"{self.medium} tier: two blocks share a slot")
        if sorted(slots + self._free) != list(range(self.num_blocks)):
            raise RuntimeError(f"{self.medium} tier: held and free slots do not partition 0..{self.num_blocks - 1}")
        for block_hash, block in self._blocks.items():
            if block.block_hash != block_hash or block.medium != self.medium:
                raise RuntimeError(f"{self.medium} tier: {block_hash:#x} maps to a block of another hash or tier")
            if block.pins < 0:
                raise RuntimeError(f"{self.medium} tier: block {block_hash:#x} has {block.pins} pins")
            if len(block.token_ids) != self.block_size:
                raise RuntimeError(f"{self.medium} tier: block {block_hash:#x} holds {len(block.token_ids)} tokens")


@dataclass(slots=True)
class TransferTotals:
    """Bytes and seconds moved per vLLM `transfer_type`, as whoever applies the copies reports."""

    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)

    def add(self, transfer_type: str, num_blocks: int, num_bytes: int, seconds: float) -> None:
        self.blocks[transfer_type] = self.blocks.get(transfer_type, 0) + num_blocks
        self.bytes[transfer_type] = self.bytes.get(transfer_type, 0) + num_bytes
        self.seconds[transfer_type] = self.seconds.get(transfer_type, 0.0) + seconds


class OffloadTiers:
    """The chain of tiers below one device pool (host first), their pending copies and events.

    `emit` appends an event to the device pool's list (BlockPool.emit), so device and tier events
    reach subscribers in the order they happened.
    """

    __slots__ = ("tiers", "block_size", "_transfers", "version", "totals")

    def __init__(self, specs: Sequence[TierSpec], block_size: int, emit: Callable[[KVEvent], None]) -> None:
        if not specs:
            raise ValueError("OffloadTiers needs at least one tier")
        media = [s.medium for s in specs]
        if len(set(media)) != len(media) or list(media) != [m for m in TIER_MEDIA if m in media]:
            raise ValueError(f"offload tiers must be distinct and in the order {TIER_MEDIA}, got {media}")
        self.block_size = block_size
        self._transfers: list[Transfer] = []
        lower: OffloadTier | None = None
        tiers: list[OffloadTier] = []
        for spec in reversed(specs):
            lower = OffloadTier(spec, block_size, self._emit_and_bump(emit), self._transfers, lower)
            tiers.append(lower)
        self.tiers: tuple[OffloadTier, ...] = tuple(reversed(tiers))
        # Bumped whenever a tier's content changes: part of the manager's lookup memo key.
        self.version = 0
        self.totals = TransferTotals()

    def _emit_and_bump(self, emit: Callable[[KVEvent], None]) -> Callable[[KVEvent], None]:
        def out(event: KVEvent) -> None:
            self.version += 1
            emit(event)
        return out

    def tier(self, medium: str) -> OffloadTier | None:
        for t in self.tiers:
            if t.medium == medium:
                return t
        return None

    def spill(self, device_block_id: int, block_hash: int, token_ids: tuple[int, ...], parent_hash: int | None,
              lora: tuple[int, str] | None) -> None:
        """A cached device block is being evicted: keep a copy in the top tier."""
        self.tiers[0].store(block_hash, token_ids, parent_hash, lora, MEDIUM_GPU, device_block_id)

    def lookup(self, hashes: Sequence[int], token_ids: Sequence[int], start: int, stop: int,
               parent: int | None, lora: tuple[int, str] | None) -> list[TierBlock]:
        """Blocks start..stop-1 of a chain from the tiers, consecutive from `start`, each from the
        highest tier holding it; `parent` is block start-1's hash (None at the chain's start).
        Changes nothing."""
        bs = self.block_size
        out: list[TierBlock] = []
        for i in range(start, stop):
            tokens = token_ids[i * bs : (i + 1) * bs]
            found = None
            for t in self.tiers:
                found = t.get(hashes[i], tokens, parent)
                if found is not None:
                    break
            if found is None or found.lora != lora:
                break
            out.append(found)
            parent = hashes[i]
        return out

    def is_held(self, block: TierBlock) -> bool:
        t = self.tier(block.medium)
        return t is not None and t._blocks.get(block.block_hash) is block

    def pin(self, blocks: Iterable[TierBlock]) -> None:
        for b in blocks:
            b.pins += 1

    def unpin(self, blocks: Iterable[TierBlock]) -> None:
        for b in blocks:
            if b.pins <= 0:
                raise ValueError(f"tier block {b.block_hash:#x} unpinned more often than pinned")
            b.pins -= 1

    def load(self, blocks: Sequence[TierBlock], device_block_ids: Sequence[int]) -> None:
        """Queue the copies of `blocks` into the device blocks given, and touch them."""
        for b, dst in zip(blocks, device_block_ids, strict=True):
            self._transfers.append(Transfer(b.medium, b.slot, MEDIUM_GPU, dst))
            t = self.tier(b.medium)
            assert t is not None
            t.stats.loaded_blocks += 1
            t.touch((b,))

    def take_transfers(self) -> list[Transfer]:
        """The queued copies, in the order they must be applied, and clear them."""
        out = self._transfers[:]
        self._transfers.clear()  # the tiers hold this list object: clear in place
        return out

    @property
    def loaded_blocks_total(self) -> int:
        """Blocks loaded from any tier into the device pool since start."""
        return sum(t.stats.loaded_blocks for t in self.tiers)

    @property
    def num_pending_transfers(self) -> int:
        return len(self._transfers)

    def clear(self) -> None:
        for t in self.tiers:
            t.clear()
        self._transfers.clear()
        self.version += 1

    def snapshot_events(self) -> list[BlockStored]:
        """Every tier's blocks as BlockStored events with their medium (least recently used
        first), for a subscriber resyncing; parents resolve by the device pool's snapshot, which
        comes first, or by the parent hash itself (kvfleet's engine hashes are the chain hashes)."""
        events: list[BlockStored] = []
        for t in self.tiers:
            for b in t.held():
                lora_id, lora_name = b.lora if b.lora is not None else (None, None)
                events.append(BlockStored(block_hashes=(b.block_hash,), parent_block_hash=b.parent_hash,
                                          token_ids=b.token_ids, block_size=self.block_size, lora_id=lora_id,
                                          medium=t.medium, lora_name=lora_name))
        return events

    def check_integrity(self) -> None:
        for t in self.tiers:
            t.check_integrity()
