"""The KV block pool: fixed-size blocks, ref counts, an LRU free list, and the prefix-cache index.

Shaped after vLLM v1's `vllm/v1/core/block_pool.py` and `kv_cache_utils.py`. It knows nothing of
tensors or requests: block ids, ref counts, hashes and token ids only.

Layout of the free list (an intrusive doubly linked list threaded through the blocks themselves,
so removing a block from the middle is O(1) and allocates nothing):

    head sentinel                                                         tail sentinel
    ┌────┐  next  ┌──────────┐      ┌──────────┐      ┌──────────┐  next  ┌────┐
    │ -1 │ ─────▶ │ block 7  │ ───▶ │ block 3  │ ───▶ │ block 5  │ ─────▶ │ -1 │
    │    │ ◀───── │ hash h2  │ ◀─── │ no hash  │ ◀─── │ hash h0  │ ◀───── │    │
    └────┘  prev  └──────────┘      └──────────┘      └──────────┘  prev  └────┘
                  ▲ evicted first                      ▲ evicted last
                    (popleft)                            (freed most recently: append)

Invariants (checked by `check_integrity`):
- A block is on the free list iff its ref_cnt is 0; ref counts are never negative.
  `prev_free` / `next_free` are None exactly for blocks off the list.
- The hash map holds `block_hash -> block` for every block whose `block_hash` is set, and
  nothing else: a cached block keeps its hash while free (it can still be hit and revived by
  `touch`) and loses it only when it is popped for reuse (lazy eviction) or on a reset.
- One block per hash. When the same content is computed twice concurrently, the first block
  registered keeps the hash; the other stays an unhashed private block.
- A cached block holds exactly `block_size` tokens and remembers its parent's hash (None for the
  first block of a chain, whose parent is the owner's root hash).

Eviction order: the free list is LRU. Freed blocks are appended at the tail in the order the
caller gives them; callers free a request's blocks tail first, so the end of a prompt is evicted
before the prefix it shares with others. New blocks are popped from the head.

Events: while caching is enabled, every change of the hash map appends a `BlockStored`,
`BlockRemoved` or `AllBlocksCleared` record to a pending list that `take_events()` drains. The
pool knows nothing of ZMQ. Replaying the event stream in order yields exactly the hash map (the
events of medium "GPU"; `emit` appends an offload tier's events, medium "CPU" / "STORAGE", to the
same list, and `on_evict` is told of each eviction first, so a spilled block's tier BlockStored
precedes its device BlockRemoved: replica/kv_offload.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

# `get_cached_block(..., parent_hash=_ANY_PARENT)`: do not compare the parent. An immutable marker.
_ANY_PARENT: object = object()


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One KV block. Compared by identity; the free-list links are left out of repr."""

    block_id: int
    ref_cnt: int = 0
    # Chain hash of the block's content and its whole prefix; None while not in the prefix cache.
    block_hash: int | None = None
    # The block's tokens, kept to confirm a hash hit (a collision can never serve wrong KV).
    token_ids: tuple[int, ...] | None = None
    # The previous block's hash; None for a chain's first block (parent = the root hash).
    parent_hash: int | None = None
    # (lora_id, lora_name) of the adapter whose KV this is; None: the base model's.
    lora: tuple[int, str] | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Free blocks in eviction order, as an intrusive doubly linked list with sentinels.

    Every operation is O(1) per block; `remove` takes a block out of the middle (a cached free
    block revived by a hit). The sentinels mean no operation branches on an empty list's ends.
    """

    __slots__ = ("num_free", "_head", "_tail")

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        self.append_n(blocks)

    def popleft(self) -> KVCacheBlock:
        """Remove and return the block to evict next (the head)."""
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        assert block is not None
        self._unlink(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Remove and return the first `n` blocks, in eviction order (`popleft` n times, the
        list relinked once: the block pool's allocation path)."""
        if n > self.num_free:
            raise ValueError(f"asked for {n} free blocks, only {self.num_free} free")
        if n <= 0:
            return []
        head = self._head
        out = [None] * n
        block = head.next_free
        for i in range(n):
            out[i] = block
            nxt = block.next_free
            block.prev_free = block.next_free = None
            block = nxt
        head.next_free = block  # the tail sentinel when the list is emptied
        block.prev_free = head
        self.num_free -= n
        return out  # type: ignore[return-value]

    def remove(self, block: KVCacheBlock) -> None:
        """Take `block` out of the list wherever it is. O(1)."""
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"block {block.block_id} is not on the free list")
        self._unlink(block)

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the tail: it will be evicted after every block already on the list."""
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already on the free list")
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Append `blocks` in the order given."""
        for block in blocks:
            self.append(block)

    def _unlink(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def __len__(self) -> int:
        return self.num_free

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Blocks from head (evicted first) to tail. O(n): for tests and integrity checks."""
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def __reversed__(self) -> Iterator[KVCacheBlock]:
        """Blocks from tail (evicted last) to head; lazy, so a caller may stop early."""
        block = self._tail.prev_free
        while block is not None and block is not self._head:
            yield block
            block = block.prev_free

    def check_integrity(self) -> list[KVCacheBlock]:
        """Validate the links and the count; return the blocks in order."""
        out: list[KVCacheBlock] = []
        prev = self._head
        block = self._head.next_free
        while block is not self._tail:
            if block is None:
                raise RuntimeError("free list: broken next link (None before the tail sentinel)")
            if block.prev_free is not prev:
                raise RuntimeError(f"free list: block {block.block_id} prev link does not point back")
            out.append(block)
            if len(out) > self.num_free:
                raise RuntimeError(f"free list: longer than num_free={self.num_free} (or a cycle)")
            prev, block = block, block.next_free
        if self._tail.prev_free is not prev:
            raise RuntimeError("free list: tail sentinel prev link is wrong")
        if len(out) != self.num_free:
            raise RuntimeError(f"free list: {len(out)} blocks linked, num_free={self.num_free}")
        return out


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens, with an optional prefix cache.

    Blocks 0..N-1 start free in id order. See the module docstring for invariants and eviction.
    """

    __slots__ = ("num_blocks", "block_size", "enable_caching", "blocks", "free_block_queue", "_cached", "cache_version",
                 "_events", "on_evict")
    # Evictions and registrations of new blocks in bulk (same result); False: block by block
    # (the tests' oracle for the bulk paths).
    bulk: bool = True

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 on_evict: Callable[[KVCacheBlock], None] | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self._cached: dict[int, KVCacheBlock] = {}
        # Bumped whenever a hash enters or leaves `_cached`: a prefix lookup made at the same
        # version gives the same blocks (the KV cache manager memoises a waiting request's).
        self.cache_version = 0
        self._events: list[KVEvent] = []
        # Called with a cached block about to lose its hash to reuse (before its BlockRemoved):
        # the KV cache manager spills it into an offload tier (replica/kv_offload.py).
        self.on_evict = on_evict

    # --- lookup -----------------------------------------------------------------------------

    def get_cached_block(
        self, block_hash: int, token_ids: Sequence[int], parent_hash: int | None | object = _ANY_PARENT
    ) -> KVCacheBlock | None:
        """The cached block for `block_hash`, if its tokens (and parent, when given) match.

        Does not change ref counts or the free list. A block found here may be free: `touch` it
        before anything else allocates, or it may be evicted.
        """
        if not self.enable_caching:
            return None
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        if parent_hash is not _ANY_PARENT and block.parent_hash != parent_hash:
            return None
        return block

    def cached_chain(self, block_hashes: Sequence[int], token_ids: Sequence[int], start: int, stop: int,
                     parent_hash: int | None, lora: tuple[int, str] | None = None) -> list[KVCacheBlock]:
        """The cached blocks continuing a chain from block `start` (whose parent is
        `parent_hash`): for i = start, start + 1, ... < stop, the block `get_cached_block(
        block_hashes[i], token_ids[i*bs:(i+1)*bs], parent_hash=<hash i-1>)` finds, tagged with
        adapter `lora`, until the first block it does not. One loop for a whole prompt (the
        prefix lookup of every waiting request, every step). Changes nothing."""
        if not self.enable_caching:
            return []
        get = self._cached.get
        bs = self.block_size
        out: list[KVCacheBlock] = []
        parent = parent_hash
        for i in range(start, stop):
            block_hash = block_hashes[i]
            block = get(block_hash)
            if (block is None or block.parent_hash != parent or block.lora != lora
                    or block.token_ids != tuple(token_ids[i * bs : (i + 1) * bs])):
                break
            out.append(block)
            parent = block_hash
        return out

    def cached_blocks(self) -> Mapping[int, KVCacheBlock]:
        """Read-only view of the hash map (hash -> block)."""
        return MappingProxyType(self._cached)

    # --- allocation -------------------------------------------------------------------------

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pop `n` blocks from the head of the free list, each with ref_cnt 1.

        A popped block that still carries a hash is evicted now: it leaves the hash map and a
        `BlockRemoved` event is appended. Raises ValueError (and changes nothing) if fewer than
        `n` blocks are free.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        blocks = self.free_block_queue.popleft_n(n)
        if self.on_evict is not None or not self.bulk:
            for block in blocks:
                if block.block_hash is not None:
                    self._evict(block)
                block.ref_cnt = 1
            return blocks
        # `_evict` for each cached block (no spill hook), in bulk: a full cache evicts a block
        # for nearly every one popped. One BlockRemoved per block, in the order popped.
        hashes = [b.block_hash for b in blocks]
        if hashes.count(None) != n:
            cached = self._cached
            for block, block_hash in zip(blocks, hashes):
                if block_hash is not None:
                    del cached[block_hash]
                    block.block_hash = block.token_ids = block.parent_hash = block.lora = None
            evicted = [BlockRemoved((h,)) for h in hashes if h is not None]
            self.cache_version += len(evicted)
            self._events.extend(evicted)
        for block in blocks:
            block.ref_cnt = 1
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block; a free (cached) block is taken off the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference to each block; blocks reaching 0 go to the free-list tail in order.

        Pass a request's blocks tail first, so its tail is evicted before its (shared) head.
        """
        queue = self.free_block_queue
        tail = queue._tail
        for block in ordered_blocks:
            ref_cnt = block.ref_cnt
            if ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed with ref_cnt {ref_cnt}")
            block.ref_cnt = ref_cnt - 1
            if ref_cnt == 1:  # FreeBlockQueue.append, inlined
                if block.prev_free is not None or block.next_free is not None:
                    raise ValueError(f"block {block.block_id} is already on the free list")
                last = tail.prev_free
                last.next_free = block  # type: ignore[union-attr]
                block.prev_free = last
                block.next_free = tail
                tail.prev_free = block
                queue.num_free += 1

    # --- caching ----------------------------------------------------------------------------

    def cache_full_block(
        self, block: KVCacheBlock, block_hash: int, token_ids: Sequence[int], parent_hash: int | None
    ) -> bool:
        """Register one full block; True if it entered the hash map (see `cache_full_blocks`)."""
        return self.cache_full_blocks([block], [block_hash], token_ids, parent_hash) == 1

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        parent_hash: int | None,
        lora: tuple[int, str] | None = None,
    ) -> int:
        """Register consecutive newly filled blocks of one chain in the prefix cache.

        `blocks[i]` gets `block_hashes[i]` and tokens `token_ids[i*bs:(i+1)*bs]`;
        `parent_hash` is the hash of the block before `blocks[0]`, None if `blocks[0]` starts
        the chain. Blocks must be in use (ref_cnt > 0).

        A hash already mapped to another block (the same content computed twice) keeps its
        mapping; that block is skipped and stays unhashed. A block already cached under the same
        hash is skipped too. One `BlockStored` event covers the newly registered blocks; if a
        skipped block splits them, one event per run, each with its true parent. Returns the
        number of blocks registered. `lora` = (lora_id, lora_name) tags the blocks and their
        events with the chain's adapter (vLLM's BlockStored `lora_id` / `lora_name`).
        """
        bs = self.block_size
        if len(block_hashes) != len(blocks):
            raise ValueError(f"{len(blocks)} blocks but {len(block_hashes)} hashes")
        if len(token_ids) != len(blocks) * bs:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) * bs} tokens, got {len(token_ids)}")
        if not self.enable_caching:
            return 0
        flat = tuple(map(int, token_ids))  # plain ints (numpy scalars would not serialize)
        cached = self._cached
        n = len(blocks)
        if (self.bulk and n and min([b.ref_cnt for b in blocks]) > 0 and [b.block_hash for b in blocks].count(None) == n
                and cached.keys().isdisjoint(block_hashes) and len(set(block_hashes)) == n):
            # Every block new, under a hash not mapped yet (a prefill's chunk, nearly always): the
            # loop below would register them all as one run; the same, in bulk. (An unhashed
            # block has no parent or adapter: check_integrity.)
            parents = [parent_hash, *block_hashes[:-1]]
            for block, block_hash, parent, start in zip(blocks, block_hashes, parents, range(0, n * bs, bs)):
                block.block_hash = block_hash
                block.token_ids = flat[start : start + bs]
                block.parent_hash = parent
            if lora is not None:
                for block in blocks:
                    block.lora = lora
            cached.update(zip(block_hashes, blocks))
            self.cache_version += n
            self._emit_stored(block_hashes, parent_hash, flat, lora)
            return n
        num_cached = 0
        run_hashes: list[int] = []
        run_start = 0  # the first block of the run of newly registered blocks
        run_parent: int | None = None
        parent = parent_hash
        # Block by block (a long prefill registers hundreds per call): a block already cached
        # or a hash already mapped is skipped; an uncached one takes the hash, its tokens and parent.
        for i, block in enumerate(blocks):
            block_hash = block_hashes[i]
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} is not in use and cannot be cached")
            if block.block_hash is None and block_hash not in cached:
                block.block_hash = block_hash
                block.token_ids = flat[i * bs : (i + 1) * bs]
                block.parent_hash = parent
                block.lora = lora
                cached[block_hash] = block
                self.cache_version += 1
                if not run_hashes:
                    run_parent = parent
                    run_start = i
                run_hashes.append(block_hash)
                num_cached += 1
            else:
                if block.block_hash is not None and block.block_hash != block_hash:
                    raise ValueError(f"block {block.block_id} is already cached under another hash")
                if run_hashes:
                    self._emit_stored(run_hashes, run_parent, flat[run_start * bs : i * bs], lora)
                    run_hashes = []
            parent = block_hash
        if run_hashes:
            self._emit_stored(run_hashes, run_parent, flat[run_start * bs : len(blocks) * bs], lora)
        return num_cached

    def _emit_stored(self, hashes: list[int], parent: int | None, tokens: list[int],
                     lora: tuple[int, str] | None = None) -> None:
        lora_id, lora_name = lora if lora is not None else (None, None)
        self._events.append(
            BlockStored(block_hashes=tuple(hashes), parent_block_hash=parent, token_ids=tuple(tokens),
                        block_size=self.block_size, lora_id=lora_id, lora_name=lora_name)
        )

    def _evict(self, block: KVCacheBlock) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        if self.on_evict is not None:
            self.on_evict(block)
        del self._cached[block_hash]
        self.cache_version += 1
        block.block_hash = block.token_ids = block.parent_hash = block.lora = None
        self._events.append(BlockRemoved(block_hashes=(block_hash,)))

    def reset_prefix_cache(self) -> bool:
        """Drop every hash, only when no block is in use. Emits one `AllBlocksCleared`.

        Returns False (and changes nothing) while any block has ref_cnt > 0. The free-list
        order is kept.
        """
        if self.free_block_queue.num_free != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = block.token_ids = block.parent_hash = block.lora = None
        self._cached.clear()
        self.cache_version += 1
        if self.enable_caching:
            self._events.append(AllBlocksCleared())
        return True

    # --- state and events -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref_cnt > 0). Free cached blocks count as unused."""
        return 1.0 - self.free_block_queue.num_free / self.num_blocks

    def emit(self, event: KVEvent) -> None:
        """Append an event of another tier of this cache (an offload tier), so every event of
        the replica stays in the order it happened."""
        self._events.append(event)

    def take_events(self) -> list[KVEvent]:
        """Return the pending events, oldest first, and clear them."""
        events, self._events = self._events, []
        return events

    def digest_hashes(self, limit: int) -> list[int]:
        """The cached block hashes for a digest (protocol/digest.py), at most `limit` of them.

        All of them when they fit; otherwise the ones this pool will keep longest: blocks in use
        first, then free cached blocks from the free list's tail (evicted last) towards its head.
        Does not change the pool.
        """
        if len(self._cached) <= limit:
            return list(self._cached)
        out = [h for h, b in self._cached.items() if b.ref_cnt > 0][:limit]
        for block in reversed(self.free_block_queue):
            if len(out) >= limit:
                break
            if block.block_hash is not None:
                out.append(block.block_hash)
        return out

    def snapshot_events(self) -> list[BlockStored]:
        """The whole prefix cache as `BlockStored` events, each parent before its children.

        Applying them to an empty index rebuilds this pool's hash map exactly. Linear chains are
        merged into one event; a branch point ends an event and each child starts one. A block
        whose parent is no longer cached (possible when a duplicate's twin was evicted) starts
        an event with that parent hash, as the live event did. Does not touch pending events.
        """
        children: dict[int, list[KVCacheBlock]] = {}
        roots: list[KVCacheBlock] = []
        for block in self._cached.values():
            if block.parent_hash is not None and block.parent_hash in self._cached:
                children.setdefault(block.parent_hash, []).append(block)
            else:
                roots.append(block)
        # Every block reachable from a root has a finite parent chain, so the walk terminates.
        events: list[BlockStored] = []
        stack = list(reversed(roots))
        while stack:
            block = stack.pop()
            run = [block]
            kids = children.get(block.block_hash, [])  # type: ignore[arg-type]
            while len(kids) == 1:
                run.append(kids[0])
                kids = children.get(kids[0].block_hash, [])  # type: ignore[arg-type]
            tokens: list[int] = []
            for b in run:
                tokens.extend(b.token_ids or ())
            lora_id, lora_name = block.lora if block.lora is not None else (None, None)
            events.append(
                BlockStored(
                    block_hashes=tuple(b.block_hash for b in run),  # type: ignore[misc]
                    parent_block_hash=block.parent_hash,
                    token_ids=tuple(tokens),
                    block_size=self.block_size,
                    lora_id=lora_id,
                    lora_name=lora_name,
                )
            )
            stack.extend(reversed(kids))
        return events

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant (see the module docstring)."""
        on_list = self.free_block_queue.check_integrity()
        on_list_ids = {b.block_id for b in on_list}
        if len(on_list_ids) != len(on_list):
            raise RuntimeError("free list: a block appears twice")
        for block in self.blocks:
            bid = block.block_id
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {bid}: negative ref_cnt {block.ref_cnt}")
            if (block.ref_cnt == 0) != (bid in on_list_ids):
                raise RuntimeError(f"block {bid}: ref_cnt {block.ref_cnt} but on free list = {bid in on_list_ids}")
            if bid not in on_list_ids and (block.prev_free is not None or block.next_free is not None):
                raise RuntimeError(f"block {bid}: off the free list but has free-list links")
            if block.block_hash is None:
                if block.token_ids is not None or block.parent_hash is not None or block.lora is not None:
                    raise RuntimeError(f"block {bid}: no hash but token_ids/parent_hash/lora set")
            else:
                if not self.enable_caching:
                    raise RuntimeError(f"block {bid}: hashed while caching is disabled")
                if self._cached.get(block.block_hash) is not block:
                    raise RuntimeError(f"block {bid}: hash {block.block_hash:#x} not mapped to it")
                if block.token_ids is None or len(block.token_ids) != self.block_size:
                    raise RuntimeError(f"block {bid}: cached with token_ids {block.token_ids!r}")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash:
                raise RuntimeError(f"hash map: {block_hash:#x} -> block {block.block_id} whose hash is {block.block_hash!r}")
            if not 0 <= block.block_id < self.num_blocks or self.blocks[block.block_id] is not block:
                raise RuntimeError(f"hash map: {block_hash:#x} -> a block not in this pool")
