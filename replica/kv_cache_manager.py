"""Per-request KV block bookkeeping on top of the `BlockPool` (after vLLM v1's `kv_cache_manager.py`).

The scheduler speaks in token counts; this module turns them into block ids. Per step, for a
request being admitted:

    hit = mgr.get_computed_blocks(req_id, tokens)           # read-only: longest cached prefix
    ok  = mgr.allocate_slots(req_id, tokens, hit.num_tokens, n, hit)   # touch hit, pop new blocks
    ...                                                      # model runner fills the slots
    mgr.allocate_slots(req_id, tokens, num_computed, 1)      # each decode step
    mgr.free(req_id)                                         # finished or preempted

A request's blocks, in token order (block_size 4; `tokens` grows append-only during decode):

    tokens   | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .  |
    blocks   |  block 5    |  block 2    |  block 9    |
    hashes   |  h0         |  h1         |  (partial: not hashed yet)
              └ hit (shared, ref_cnt 2) ┘└ new, cached when full ┘

Invariants (checked by `check_integrity`):
- Each block's ref_cnt equals the number of live requests whose block list holds it; no request
  holds a block twice.
- A request's hash list is its chain `h_i = hash_block(h_{i-1}, tokens[i*bs:(i+1)*bs])` from
  `hash_root`, extended only when a new full block appears (never recomputed per step).
- Every block of a request that carries a hash carries the request's own hash for its position.

Blocks become cached as soon as they are full within the tokens a step allocates for (vLLM v1
caches at allocation time: the KV is written in the same forward pass that may first read it).
Freeing is tail first, so a request's private tail is evicted before the prefix it shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from protocol.events import BlockStored, KVEvent
from protocol.hashing import hash_blocks
from replica.block_pool import BlockPool, KVCacheBlock
from replica.kv_offload import OffloadTiers, TierBlock, TierSpec, Transfer
from replica.lora import LoraTag


_PROBE = "\x00kv-probe"  # the request id `cached_prefix_tokens` looks up under (no client id has a NUL)

class ComputedBlocks(NamedTuple):
    """The cached prefix found for a request: its device blocks (not yet referenced), then the
    blocks found in offload tiers after them (to be loaded), and the token count of both."""

    blocks: list[KVCacheBlock]
    num_tokens: int
    tier_blocks: tuple[TierBlock, ...] = ()
    num_tier_tokens: int = 0  # of num_tokens, those in tier_blocks (vLLM's "external" hits)


@dataclass(slots=True)
class _RequestState:
    blocks: list[KVCacheBlock] = field(default_factory=list)
    # Chain hashes of the request's full blocks seen so far (index i <-> tokens[i*bs:(i+1)*bs]).
    hashes: list[int] = field(default_factory=list)
    # Leading blocks already offered to the pool's hash map (hits count as offered).
    num_cached: int = 0
    # The last get_computed_blocks answer, with the pool's cache_version and the token count it
    # was made at: a request waiting for free blocks is looked up every step, and its answer
    # cannot change until a hash enters or leaves the pool (or the request grows).
    last_lookup: tuple[int, int, "ComputedBlocks"] | None = None
    # The request's LoRA adapter: its chain starts at the adapter's root, its blocks are tagged
    # with it; None: the manager's `hash_root` (the base model).
    lora: LoraTag | None = None
    # The blocks the last lookup found, with the `token_ids` tuple each carried then: a block
    # whose tuple is still the same object has not been evicted since (eviction clears it, and
    # each registration makes a new one), so it is still the cached block for its hash with the
    # same tokens, parent and adapter, and the next lookup need not confirm it again.
    last_walk: tuple[list[KVCacheBlock], list[tuple[int, ...] | None]] | None = None


class KVCacheManager:
    """Maps requests to blocks of one `BlockPool`, with prefix caching from `hash_root`."""

    __slots__ = ("pool", "hash_root", "enable_caching", "_requests", "offload", "_keep", "_kept")

    def __init__(self, num_blocks: int, block_size: int, hash_root: int, enable_caching: bool = True,
                 tiers: Sequence[TierSpec] = ()) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.hash_root = hash_root
        self.enable_caching = enable_caching
        self._requests: dict[str, _RequestState] = {}
        # Offload tiers below the pool (replica/kv_offload.py); None: evicted blocks are gone.
        # Without prefix caching nothing is ever cached, so there is nothing to offload.
        self.offload: OffloadTiers | None = None
        if tiers and enable_caching:
            self.offload = OffloadTiers(tiers, block_size, self.pool.emit)
            self.pool.on_evict = self._spill
        # Prefill/decode hand-over (replica/kv_transfer.py): requests whose blocks `free` holds
        # instead of releasing (vLLM's connectors "delay_free_blocks"), and those held blocks,
        # each request's in token order, until `release_kept`.
        self._keep: set[str] = set()
        self._kept: dict[str, list[KVCacheBlock]] = {}

    def _spill(self, block: KVCacheBlock) -> None:
        assert self.offload is not None and block.block_hash is not None and block.token_ids is not None
        self.offload.spill(block.block_id, block.block_hash, block.token_ids, block.parent_hash, block.lora)

    def _version(self) -> int:
        """Changes whenever a prefix lookup's answer may: a hash entered or left the pool or a tier."""
        if self.offload is None:
            return self.pool.cache_version
        return self.pool.cache_version + (self.offload.version << 40)

    # --- properties -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    # --- the scheduler's calls --------------------------------------------------------------

    def _state(self, req_id: str, lora: LoraTag | None) -> _RequestState:
        state = self._requests.get(req_id)
        if state is None:
            state = _RequestState(lora=lora)
        elif state.lora != lora:
            raise ValueError(f"request {req_id!r} changed its LoRA adapter")
        return state

    def get_computed_blocks(self, req_id: str, token_ids: Sequence[int], lora: LoraTag | None = None) -> ComputedBlocks:
        """The longest cached prefix of `token_ids`, in whole blocks.

        Each hit is confirmed by token ids and parent hash. At least one token is always left to
        compute (the last position's logits must come out of the model), so a prompt that is an
        exact multiple of block_size hits at most all but its last block. Does not change ref
        counts, the free list or events; remembers the request's block hashes. Under adapter
        `lora` the chain starts at the adapter's root, so it never hits another adapter's (or
        the base model's) blocks.
        """
        if not self.enable_caching:
            return ComputedBlocks([], 0)
        bs = self.block_size
        state = self._requests[req_id] = self._state(req_id, lora)
        memo = state.last_lookup
        version = self._version()
        if memo is not None and memo[0] == version and memo[1] == len(token_ids):
            return memo[2]
        hashes = self._extend_hashes(state, token_ids, len(token_ids) // bs)
        tag = None if lora is None else (lora.lora_id, lora.name)
        max_hit = max(len(token_ids) - 1, 0) // bs
        # Each hit is confirmed by its tokens, its parent and its adapter (another adapter's KV
        # never matches, even on a hash collision). A request's tokens only grow, so the hits
        # confirmed by its last lookup and not evicted since hold still (`last_walk`): the walk
        # goes on from the first one that was evicted.
        blocks: list[KVCacheBlock] = []
        tokens: list[tuple[int, ...] | None] = []
        walk = state.last_walk
        if walk is not None:
            prev, prev_tokens = walk
            n = min(len(prev), max_hit)
            i = 0
            while i < n and prev[i].token_ids is prev_tokens[i]:
                i += 1
            blocks, tokens = prev[:i], prev_tokens[:i]
        found = self.pool.cached_chain(hashes, token_ids, len(blocks), max_hit,
                                       hashes[len(blocks) - 1] if blocks else None, tag)
        if found:
            blocks += found
            tokens += [b.token_ids for b in found]
        state.last_walk = (blocks.copy(), tokens)  # its own list: the caller gets `blocks`
        parent = hashes[len(blocks) - 1] if blocks else None
        tier_blocks: tuple[TierBlock, ...] = ()
        if self.offload is not None and len(blocks) < max_hit:
            tier_blocks = tuple(self.offload.lookup(hashes, token_ids, len(blocks), max_hit, parent, tag))
        computed = ComputedBlocks(blocks, (len(blocks) + len(tier_blocks)) * bs, tier_blocks, len(tier_blocks) * bs)
        state.last_lookup = (version, len(token_ids), computed)
        return computed

    def cached_prefix_tokens(self, token_ids: Sequence[int], lora: LoraTag | None = None) -> int:
        """Leading tokens of `token_ids` that a request's lookup (`get_computed_blocks`) finds
        cached now — in the device pool, then the offload tiers, on `lora`'s chain — in whole
        blocks, at most all but the last token. Changes nothing (no request is remembered): the
        KV hand-over asks it which blocks need not travel."""
        if not self.enable_caching:
            return 0
        try:
            return self.get_computed_blocks(_PROBE, token_ids, lora).num_tokens
        finally:
            self._requests.pop(_PROBE, None)

    def allocate_slots(
        self,
        req_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed: ComputedBlocks | None = None,
        lora: LoraTag | None = None,
    ) -> bool:
        """Make `req_id` own blocks for its first `num_computed_tokens + num_new_tokens` tokens.

        On the request's first call `new_computed` (from `get_computed_blocks`, with
        `num_computed_tokens == new_computed.num_tokens`) is referenced first. Returns False and
        changes nothing if too few blocks are free; a free cached block counts as free, except
        the ones in `new_computed`, which this call revives rather than evicts. Blocks found in
        an offload tier get new device blocks, and their copies are queued (`take_transfers`):
        they must be applied before the step runs. Then every block that is full within those
        tokens is registered in the prefix cache (BlockStored events).
        `token_ids` must hold at least that many tokens. Raises ValueError on misuse.
        """
        pool = self.pool
        bs = pool.block_size
        total = num_computed_tokens + num_new_tokens
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(f"negative token count: computed={num_computed_tokens} new={num_new_tokens}")
        if len(token_ids) < total:
            raise ValueError(f"token_ids holds {len(token_ids)} tokens, allocating for {total}")
        state = self._state(req_id, lora)  # registered below, once the call succeeds

        hit: list[KVCacheBlock] = []
        loaded: tuple[TierBlock, ...] = ()
        if new_computed is not None and (new_computed.blocks or new_computed.tier_blocks):
            if state.blocks:
                raise ValueError(f"request {req_id!r} already holds blocks; new_computed is for its first call")
            if num_computed_tokens != new_computed.num_tokens:
                raise ValueError(f"num_computed_tokens={num_computed_tokens} != new_computed.num_tokens={new_computed.num_tokens}")
            hit = new_computed.blocks
            loaded = new_computed.tier_blocks
            # A hit evicted since get_computed_blocks would hand over someone else's KV (it cannot
            # be when no hash has left the pool since that lookup: the memo's version says so).
            memo = state.last_lookup
            fresh = memo is not None and memo[2] is new_computed and memo[0] == self._version()
            if not fresh and (len(state.hashes) < len(hit) + len(loaded)
                              or any(b.block_hash != h for b, h in zip(hit, state.hashes))
                              or any(not self.offload.is_held(b) or b.block_hash != state.hashes[len(hit) + i]
                                     for i, b in enumerate(loaded))):  # type: ignore[union-attr]
                raise ValueError(f"request {req_id!r}: stale ComputedBlocks (a hit block was evicted or reused)")
        num_held = len(state.blocks) + len(hit)
        if num_computed_tokens > (num_held + len(loaded)) * bs:
            raise ValueError(f"request {req_id!r}: {num_computed_tokens} computed tokens but only {num_held} blocks")

        num_needed = -(-total // bs) - num_held
        if num_needed > 0:
            # Free hits are about to be revived, so they cannot be evicted to make room. (Counted
            # only when it decides: a request waiting for blocks is tried every step.)
            free = self.pool.num_free_blocks
            if num_needed > free:
                return False
            if num_needed > free - len(hit) and num_needed > free - [b.ref_cnt for b in hit].count(0):
                return False
        self._requests[req_id] = state
        if hit:
            self.pool.touch(hit)
            state.blocks.extend(hit)
            state.num_cached = len(hit)
        if num_needed > 0:
            if loaded:
                # The new blocks' evictions may spill into a full tier: keep the blocks to load.
                assert self.offload is not None
                self.offload.pin(loaded)
                try:
                    new = self.pool.get_new_blocks(num_needed)
                finally:
                    self.offload.unpin(loaded)
                # Queued after the spills those evictions made: applied in order, each device
                # block is copied out before it is loaded into.
                self.offload.load(loaded, [b.block_id for b in new[: len(loaded)]])
            else:
                new = self.pool.get_new_blocks(num_needed)
            state.blocks.extend(new)

        num_full = total // bs
        if self.enable_caching and num_full > state.num_cached:
            start = state.num_cached
            hashes = self._extend_hashes(state, token_ids, num_full)
            self.pool.cache_full_blocks(
                state.blocks[start:num_full],
                hashes[start:num_full],
                token_ids[start * bs : num_full * bs],
                hashes[start - 1] if start else None,
                None if state.lora is None else (state.lora.lora_id, state.lora.name),
            )
            state.num_cached = num_full
        return True

    def free(self, req_id: str) -> None:
        """Release the request's blocks, tail first, and forget the request. Unknown ids: no-op.
        A request marked with `keep_on_free` keeps its blocks referenced (readable, never
        evicted) until `release_kept`; a second free (after a preemption) replaces the hold."""
        state = self._requests.pop(req_id, None)
        if state is None:
            return
        if req_id in self._keep:
            self.release_kept(req_id, forget=False)
            self._kept[req_id] = state.blocks
            return
        self.pool.free_blocks(reversed(state.blocks))

    def keep_on_free(self, req_id: str) -> None:
        """Hold `req_id`'s blocks when it is freed, for a decode replica to pull."""
        self._keep.add(req_id)

    def kept_blocks(self, req_id: str) -> list[tuple[int, int | None]] | None:
        """(block id, chain hash or None) of the blocks held for `req_id`, in token order; None
        when nothing is held for it."""
        blocks = self._kept.get(req_id)
        return None if blocks is None else [(b.block_id, b.block_hash) for b in blocks]

    def release_kept(self, req_id: str, forget: bool = True) -> bool:
        """Release the blocks held for `req_id` (they stay cached, as any freed block); with
        `forget`, a later free of that id releases at once. False when nothing was held."""
        if forget:
            self._keep.discard(req_id)
        blocks = self._kept.pop(req_id, None)
        if blocks is None:
            return False
        self.pool.free_blocks(reversed(blocks))
        return True

    def block_ids(self, req_id: str) -> list[int]:
        """The request's block ids in token order ([] for a request holding none)."""
        state = self._requests.get(req_id)
        return [] if state is None else [b.block_id for b in state.blocks]

    def block_hashes(self, req_id: str) -> list[int]:
        """The chain hashes computed so far for the request's full blocks (a copy)."""
        state = self._requests.get(req_id)
        return [] if state is None else list(state.hashes)

    # --- cache-wide -------------------------------------------------------------------------

    def take_events(self) -> list[KVEvent]:
        """The pool's and the offload tiers' events, in the order they happened."""
        return self.pool.take_events()

    def take_transfers(self) -> list[Transfer]:
        """The copies between the pool and the tiers queued since the last call, in the order they
        must be applied (before the next forward pass); [] without tiers."""
        return [] if self.offload is None else self.offload.take_transfers()

    def reset_prefix_cache(self) -> bool:
        """Drop the whole prefix cache, offload tiers included (one AllBlocksCleared covers all
        media); False (nothing changed) while any request holds blocks."""
        if not self.pool.reset_prefix_cache():
            return False
        if self.offload is not None:
            self.offload.clear()
        return True

    def snapshot_events(self) -> list[BlockStored]:
        """The pool's blocks, then every tier's (medium set), as BlockStored events."""
        events = self.pool.snapshot_events()
        if self.offload is not None:
            events.extend(self.offload.snapshot_events())
        return events

    def digest_hashes(self, limit: int) -> list[int]:
        return self.pool.digest_hashes(limit)

    def check_integrity(self) -> None:
        """Pool invariants plus: ref_cnt == number of requests holding the block, hashes agree;
        the offload tiers' own invariants."""
        self.pool.check_integrity()
        if self.offload is not None:
            self.offload.check_integrity()
        holders: Counter[int] = Counter()
        for req_id, state in self._requests.items():
            ids = [b.block_id for b in state.blocks]
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"request {req_id!r} holds a block twice: {ids}")
            holders.update(ids)
            if state.num_cached > len(state.blocks) or state.num_cached > len(state.hashes):
                raise RuntimeError(
                    f"request {req_id!r}: num_cached={state.num_cached} beyond {len(state.blocks)} blocks / {len(state.hashes)} hashes"
                )
            for i, block in enumerate(state.blocks):
                if block.block_hash is not None and (i >= len(state.hashes) or block.block_hash != state.hashes[i]):
                    raise RuntimeError(f"request {req_id!r}: block {block.block_id} at position {i} carries a foreign hash")
        for blocks in self._kept.values():
            holders.update(b.block_id for b in blocks)
        for block in self.pool.blocks:
            if block.ref_cnt != holders[block.block_id]:
                raise RuntimeError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {holders[block.block_id]} request(s)"
                )

    # --- internals --------------------------------------------------------------------------

    def _extend_hashes(self, state: _RequestState, token_ids: Sequence[int], num_blocks: int) -> list[int]:
        """Hash only the full blocks not hashed yet, chaining from the last known hash."""
        hashes = state.hashes
        have = len(hashes)
        if have < num_blocks:
            bs = self.block_size
            parent = hashes[-1] if have else (self.hash_root if state.lora is None else state.lora.root)
            hashes.extend(hash_blocks(token_ids[have * bs : num_blocks * bs], bs, parent))
        return hashes
