"""BlockPool and FreeBlockQueue on tiny pools: exact block ids, ref counts, free-list and eviction order, events."""

from __future__ import annotations

import pytest

from protocol.events import AllBlocksCleared, BlockRemoved, BlockStored
from protocol.hashing import hash_blocks, root_hash
from replica.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock

BS = 4
ROOT = root_hash("tiny-model")


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue]


def chain(tokens: list[int], parent: int = ROOT) -> list[int]:
    return hash_blocks(tokens, BS, parent)


def cache_request(pool: BlockPool, tokens: list[int]) -> list[KVCacheBlock]:
    """Allocate and cache all full blocks of `tokens` (a request that prefilled them)."""
    blocks = pool.get_new_blocks(len(tokens) // BS)
    pool.cache_full_blocks(blocks, chain(tokens), tokens, None)
    return blocks


# --- FreeBlockQueue -----------------------------------------------------------------------


def test_free_queue_order_remove_append() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert [b.block_id for b in q] == [0, 1, 2, 3, 4] and q.num_free == 5

    assert q.popleft().block_id == 0
    q.remove(blocks[2])  # from the middle, O(1)
    q.remove(blocks[4])  # the last one
    assert [b.block_id for b in q] == [1, 3] and len(q) == 2
    assert blocks[2].prev_free is None and blocks[2].next_free is None

    q.append(blocks[4])
    q.append_n([blocks[0], blocks[2]])
    assert [b.block_id for b in q] == [1, 3, 4, 0, 2]
    assert [b.block_id for b in q.popleft_n(3)] == [1, 3, 4]
    assert [b.block_id for b in q] == [0, 2]
    assert [b.block_id for b in q.check_integrity()] == [0, 2]


def test_free_queue_misuse_raises() -> None:
    blocks = [KVCacheBlock(i) for i in range(2)]
    q = FreeBlockQueue(blocks)
    with pytest.raises(ValueError):
        q.append(blocks[0])  # already on the list
    q.popleft_n(2)
    with pytest.raises(ValueError):
        q.popleft()
    with pytest.raises(ValueError):
        q.remove(blocks[1])  # not on the list
    with pytest.raises(ValueError):
        q.popleft_n(1)
    assert q.num_free == 0 and list(q) == []


# --- allocation and freeing -----------------------------------------------------------------


def test_initial_state_and_allocation() -> None:
    pool = BlockPool(8, BS)
    assert free_ids(pool) == list(range(8))
    assert pool.num_free_blocks == 8 and pool.usage == 0.0

    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert free_ids(pool) == [3, 4, 5, 6, 7]
    assert pool.usage == 3 / 8
    pool.check_integrity()


def test_get_new_blocks_not_enough_changes_nothing() -> None:
    pool = BlockPool(4, BS)
    pool.get_new_blocks(3)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert free_ids(pool) == [3] and [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 0]
    pool.check_integrity()


def test_free_appends_in_given_order() -> None:
    pool = BlockPool(8, BS)
    blocks = pool.get_new_blocks(3)  # 0, 1, 2
    pool.free_blocks(reversed(blocks))  # tail first
    assert free_ids(pool) == [3, 4, 5, 6, 7, 2, 1, 0]
    with pytest.raises(ValueError):
        pool.free_blocks([blocks[0]])  # ref_cnt already 0
    pool.check_integrity()


def test_shared_block_freed_only_at_zero() -> None:
    pool = BlockPool(8, BS)
    [b] = pool.get_new_blocks(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and 0 not in free_ids(pool)
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and free_ids(pool)[-1] == 0
    pool.check_integrity()


# --- caching, hits and eviction -------------------------------------------------------------


def test_cache_full_blocks_event_and_lookup() -> None:
    pool = BlockPool(8, BS)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    h = chain(tokens)
    blocks = cache_request(pool, tokens)
    assert pool.take_events() == [BlockStored(block_hashes=(h[0], h[1]), parent_block_hash=None, token_ids=tuple(tokens), block_size=BS)]
    assert pool.take_events() == []  # drained
    assert dict(pool.cached_blocks()) == {h[0]: blocks[0], h[1]: blocks[1]}
    assert blocks[1].parent_hash == h[0] and blocks[0].parent_hash is None
    assert blocks[0].token_ids == (1, 2, 3, 4)

    assert pool.get_cached_block(h[0], [1, 2, 3, 4]) is blocks[0]
    assert pool.get_cached_block(h[1], [5, 6, 7, 8], parent_hash=h[0]) is blocks[1]
    assert pool.get_cached_block(h[1], [5, 6, 7, 8], parent_hash=None) is None  # wrong parent
    assert pool.get_cached_block(12345, [1, 2, 3, 4]) is None
    pool.check_integrity()

    # Extending the chain: the parent is the last hash of the earlier call.
    [b2] = pool.get_new_blocks(1)
    h2 = chain([9, 9, 9, 9], parent=h[1])[0]
    assert pool.cache_full_block(b2, h2, [9, 9, 9, 9], h[1])
    assert pool.take_events() == [BlockStored(block_hashes=(h2,), parent_block_hash=h[1], token_ids=(9, 9, 9, 9), block_size=BS)]


def test_forged_hash_is_not_a_hit() -> None:
    """A block registered under a hash that does not match its tokens (a simulated collision)."""
    pool = BlockPool(8, BS)
    [b] = pool.get_new_blocks(1)
    forged = chain([7, 7, 7, 7])[0]
    pool.cache_full_block(b, forged, [1, 1, 1, 1], None)
    assert pool.get_cached_block(forged, [7, 7, 7, 7]) is None
    assert pool.get_cached_block(forged, [1, 1, 1, 1]) is b


def test_duplicate_content_keeps_first_mapping_and_splits_event() -> None:
    pool = BlockPool(8, BS)
    tokens = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    h = chain(tokens)
    first = pool.get_new_blocks(2)  # 0, 1: blocks 0..1 of the chain, computed by request A
    pool.cache_full_blocks(first, h[:2], tokens[:8], None)
    pool.take_events()

    # Request B computed the same content concurrently, plus a third block: blocks 2, 3 are
    # duplicates (skipped, stay unhashed), block 4 is new and its event names h1 as parent.
    dup = pool.get_new_blocks(3)
    assert pool.cache_full_blocks(dup, h, tokens, None) == 1
    assert pool.take_events() == [BlockStored(block_hashes=(h[2],), parent_block_hash=h[1], token_ids=(3, 3, 3, 3), block_size=BS)]
    assert pool.cached_blocks()[h[0]] is first[0] and dup[0].block_hash is None and dup[1].block_hash is None
    assert dup[2].block_hash == h[2]
    pool.check_integrity()

    # A duplicate in the middle of a run splits the event in two.
    pool2 = BlockPool(8, BS)
    [mid] = pool2.get_new_blocks(1)
    pool2.cache_full_block(mid, h[1], tokens[4:8], h[0])
    pool2.take_events()
    blocks = pool2.get_new_blocks(3)
    assert pool2.cache_full_blocks(blocks, h, tokens, None) == 2
    assert pool2.take_events() == [
        BlockStored(block_hashes=(h[0],), parent_block_hash=None, token_ids=(1, 1, 1, 1), block_size=BS),
        BlockStored(block_hashes=(h[2],), parent_block_hash=h[1], token_ids=(3, 3, 3, 3), block_size=BS),
    ]
    pool2.check_integrity()


def test_lazy_eviction_in_lru_order() -> None:
    pool = BlockPool(4, BS)
    a_tokens, b_tokens = [1] * 8, [2] * 8
    ha, hb = chain(a_tokens), chain(b_tokens)
    a = cache_request(pool, a_tokens)  # blocks 0, 1
    b = cache_request(pool, b_tokens)  # blocks 2, 3
    pool.free_blocks(reversed(a))  # free list: 1, 0
    pool.free_blocks(reversed(b))  # free list: 1, 0, 3, 2
    pool.take_events()
    assert free_ids(pool) == [1, 0, 3, 2]
    assert len(pool.cached_blocks()) == 4  # freed blocks stay cached

    # Reviving A's head takes it out of the middle of the list; it is no longer evictable.
    pool.touch([a[0]])
    assert free_ids(pool) == [1, 3, 2] and a[0].ref_cnt == 1

    got = pool.get_new_blocks(2)
    assert [g.block_id for g in got] == [1, 3]
    assert pool.take_events() == [BlockRemoved(block_hashes=(ha[1],)), BlockRemoved(block_hashes=(hb[1],))]
    assert set(pool.cached_blocks()) == {ha[0], hb[0]}
    assert got[0].block_hash is None and got[0].token_ids is None and got[0].parent_hash is None
    pool.check_integrity()


def test_reset_prefix_cache() -> None:
    pool = BlockPool(4, BS)
    blocks = cache_request(pool, [5] * 8)
    pool.take_events()
    assert not pool.reset_prefix_cache()  # blocks in use
    assert len(pool.cached_blocks()) == 2 and pool.take_events() == []
    pool.free_blocks(reversed(blocks))
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]
    assert len(pool.cached_blocks()) == 0 and all(b.block_hash is None for b in pool.blocks)
    assert free_ids(pool) == [2, 3, 1, 0]  # order kept
    pool.check_integrity()


def test_caching_disabled_hashes_nothing() -> None:
    pool = BlockPool(4, BS, enable_caching=False)
    tokens = [1, 2, 3, 4]
    [b] = pool.get_new_blocks(1)
    assert pool.cache_full_blocks([b], chain(tokens), tokens, None) == 0
    assert b.block_hash is None and pool.get_cached_block(chain(tokens)[0], tokens) is None
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [] and pool.snapshot_events() == []
    pool.check_integrity()


def test_snapshot_rebuilds_index_parents_first() -> None:
    pool = BlockPool(16, BS)
    # A tree: shared head [1]*4, then two branches; one branch grows a second block.
    t1 = [1] * 4 + [2] * 4 + [3] * 4
    t2 = [1] * 4 + [4] * 4
    h1, h2 = chain(t1), chain(t2)
    a = cache_request(pool, t1)
    b_tail = pool.get_new_blocks(1)
    pool.touch([a[0]])
    pool.cache_full_blocks(b_tail, h2[1:], t2[4:], h2[0])
    t3 = [9] * 4
    cache_request(pool, t3)
    live = pool.take_events()

    snap = pool.snapshot_events()
    assert snap == [
        BlockStored(block_hashes=(h1[0],), parent_block_hash=None, token_ids=(1, 1, 1, 1), block_size=BS),
        BlockStored(block_hashes=(h1[1], h1[2]), parent_block_hash=h1[0], token_ids=tuple(t1[4:]), block_size=BS),
        BlockStored(block_hashes=(h2[1],), parent_block_hash=h1[0], token_ids=(4, 4, 4, 4), block_size=BS),
        BlockStored(block_hashes=(chain(t3)[0],), parent_block_hash=None, token_ids=tuple(t3), block_size=BS),
    ]

    def index(events: list) -> dict[int, tuple[int | None, tuple[int, ...]]]:
        out: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        for ev in events:
            parent = ev.parent_block_hash
            for i, h in enumerate(ev.block_hashes):
                assert parent is None or parent in out, "parent must come first"
                out[h] = (parent, ev.token_ids[i * BS : (i + 1) * BS])
                parent = h
        return out

    expected = {h: (b.parent_hash, b.token_ids) for h, b in pool.cached_blocks().items()}
    assert index(snap) == expected == index(live)
    assert pool.take_events() == []  # a snapshot emits nothing


def test_check_integrity_reports_corruption() -> None:
    pool = BlockPool(4, BS)
    blocks = cache_request(pool, [1] * 4)
    blocks[0].ref_cnt = 0  # off the free list yet unreferenced
    with pytest.raises(RuntimeError, match="ref_cnt 0"):
        pool.check_integrity()
    blocks[0].ref_cnt = 1
    blocks[0].block_hash = 42  # hash map and block disagree
    with pytest.raises(RuntimeError, match="not mapped"):
        pool.check_integrity()


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        BlockPool(0, BS)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


class _BlockByBlock(BlockPool):
    bulk = False  # evictions and registrations one block at a time: the oracle of the bulk paths


def test_bulk_evictions_and_registrations_equal_block_by_block():
    """A full pool evicts a block for nearly every one it hands out, and a prefill chunk
    registers hundreds of new blocks at once: both run in bulk. Driven through the KV cache
    manager by the same requests (shared prefixes, chunks, decodes, a duplicate computed
    twice), the bulk pool and the block-by-block one give the same events, blocks, hash map
    (in its order) and free list after every call."""
    import random

    from replica.kv_cache_manager import KVCacheManager

    root = root_hash("m")
    pools = []
    for cls in (BlockPool, _BlockByBlock):
        mgr = KVCacheManager(24, 4, root)
        mgr.pool = cls(24, 4)
        pools.append(mgr)
    rng = random.Random(3)
    prefixes = [[rng.randrange(1, 500) for _ in range(12)] for _ in range(3)]

    def state(mgr):
        pool = mgr.pool
        blocks = [(b.block_id, b.ref_cnt, b.block_hash, b.token_ids, b.parent_hash, b.lora) for b in pool.blocks]
        return (mgr.take_events(), blocks, [(h, b.block_id) for h, b in pool.cached_blocks().items()],
                [b.block_id for b in pool.free_block_queue], pool.cache_version)

    live: list[tuple[str, list[int], int]] = []  # (request, tokens, computed) of the admitted ones
    for i in range(150):
        if i % 3 == 0 or not live:  # a new request: its prefix hit, then its first chunk
            rid = f"q{i}"
            tokens = rng.choice(prefixes) + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 30))]
            admitted = []
            for mgr in pools:
                hit = mgr.get_computed_blocks(rid, tokens)
                chunk = min(len(tokens) - hit.num_tokens, 8)
                admitted.append(mgr.allocate_slots(rid, tokens, hit.num_tokens, chunk, hit) and hit.num_tokens + chunk)
            assert admitted[0] == admitted[1]
            if admitted[0]:
                live.append((rid, tokens, admitted[0]))
        else:  # a running request's next chunk (or decode), or its end
            j = i % len(live)
            rid, tokens, done = live[j]
            if done >= len(tokens) or i % 5 == 0:
                for mgr in pools:
                    mgr.free(rid)
                del live[j]
            else:
                n = min(len(tokens) - done, 8)
                ok = [mgr.allocate_slots(rid, tokens, done, n) for mgr in pools]
                assert ok[0] == ok[1]
                if ok[0]:
                    live[j] = (rid, tokens, done + n)
        for mgr in pools:
            mgr.check_integrity()
        assert state(pools[0]) == state(pools[1])
    # A block computed twice (two requests, same content, neither hit): the second stays unhashed.
    for mgr in pools:
        tokens = [7] * 9
        for rid in ("x", "y"):
            hit = mgr.get_computed_blocks(rid, tokens)
            assert mgr.allocate_slots(rid, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
    assert state(pools[0]) == state(pools[1])
