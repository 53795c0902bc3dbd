"""KVCacheManager on tiny pools (block_size 4): exact block ids, ref counts, eviction order and events,
then a hypothesis state machine that checks integrity, free-list order and the event stream every step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import replica.kv_cache_manager as kvm
from protocol.events import AllBlocksCleared, BlockRemoved, BlockStored
from protocol.hashing import hash_blocks, root_hash
from replica.kv_cache_manager import ComputedBlocks, KVCacheManager

BS = 4
ROOT = root_hash("tiny-model")


def make(num_blocks: int = 8, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, ROOT, enable_caching)


def chain(tokens: list[int]) -> list[int]:
    return hash_blocks(tokens, BS, ROOT)


def admit(mgr: KVCacheManager, req: str, tokens: list[int]) -> ComputedBlocks:
    """A scheduler admitting a request whole (prefill without chunking)."""
    hit = mgr.get_computed_blocks(req, tokens)
    assert mgr.allocate_slots(req, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
    return hit


def free_ids(mgr: KVCacheManager) -> list[int]:
    return [b.block_id for b in mgr.pool.free_block_queue]


def ref_cnts(mgr: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in mgr.pool.blocks]


def state_of(mgr: KVCacheManager, reqs: list[str]) -> tuple:
    """Everything observable about the manager (events aside), to compare before/after."""
    blocks = tuple((b.block_id, b.ref_cnt, b.block_hash, b.token_ids, b.parent_hash) for b in mgr.pool.blocks)
    cached = {h: b.block_id for h, b in mgr.pool.cached_blocks().items()}
    return blocks, free_ids(mgr), cached, {r: mgr.block_ids(r) for r in reqs}


# --- one request ------------------------------------------------------------------------------


def test_prefill_then_decode_blocks_and_events() -> None:
    mgr = make()
    tokens = list(range(1, 11))  # 10 tokens: two full blocks and a partial one
    h = chain(tokens)
    assert admit(mgr, "a", tokens) == ComputedBlocks([], 0)
    assert mgr.block_ids("a") == [0, 1, 2]
    assert ref_cnts(mgr) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert mgr.take_events() == [BlockStored(block_hashes=(h[0], h[1]), parent_block_hash=None, token_ids=tuple(range(1, 9)), block_size=BS)]

    tokens.append(11)  # decode: the block fills up, no new block yet
    assert mgr.allocate_slots("a", tokens, 10, 1)
    assert mgr.block_ids("a") == [0, 1, 2] and mgr.take_events() == []
    tokens.append(12)
    assert mgr.allocate_slots("a", tokens, 11, 1)
    h2 = chain(tokens)[2]
    assert mgr.take_events() == [BlockStored(block_hashes=(h2,), parent_block_hash=h[1], token_ids=(9, 10, 11, 12), block_size=BS)]
    assert mgr.block_hashes("a") == [h[0], h[1], h2]
    tokens.append(13)
    assert mgr.allocate_slots("a", tokens, 12, 1)
    assert mgr.block_ids("a") == [0, 1, 2, 3] and mgr.num_free_blocks == 4 and mgr.usage == 0.5
    mgr.check_integrity()

    mgr.free("a")
    assert free_ids(mgr) == [4, 5, 6, 7, 3, 2, 1, 0]  # tail first
    assert mgr.block_ids("a") == [] and ref_cnts(mgr) == [0] * 8
    assert len(mgr.pool.cached_blocks()) == 3  # still cached after free
    mgr.check_integrity()


def test_chunked_prefill_caches_only_blocks_full_within_the_chunk() -> None:
    mgr = make()
    tokens = [3] * 12
    h = chain(tokens)
    hit = mgr.get_computed_blocks("a", tokens)
    assert mgr.allocate_slots("a", tokens, 0, 6, hit)  # first chunk: 6 tokens
    assert mgr.block_ids("a") == [0, 1]
    assert mgr.take_events() == [BlockStored(block_hashes=(h[0],), parent_block_hash=None, token_ids=(3, 3, 3, 3), block_size=BS)]
    assert mgr.allocate_slots("a", tokens, 6, 6)
    assert mgr.block_ids("a") == [0, 1, 2]
    assert mgr.take_events() == [BlockStored(block_hashes=(h[1], h[2]), parent_block_hash=h[0], token_ids=(3,) * 8, block_size=BS)]
    mgr.check_integrity()


# --- sharing, hits and the cap ---------------------------------------------------------------


def test_shared_prefix_ref_counts_and_tail_first_eviction() -> None:
    mgr = make()
    ta = [1] * 8 + [2, 2]
    tb = [1] * 8 + [3] * 5
    ha, hb = chain(ta), chain(tb)
    admit(mgr, "a", ta)  # blocks 0, 1 (cached), 2 (partial)
    mgr.take_events()
    hit = admit(mgr, "b", tb)
    assert [b.block_id for b in hit.blocks] == [0, 1] and hit.num_tokens == 8
    assert mgr.block_ids("b") == [0, 1, 3, 4]
    assert ref_cnts(mgr) == [2, 2, 1, 1, 1, 0, 0, 0]
    assert mgr.take_events() == [BlockStored(block_hashes=(hb[2],), parent_block_hash=ha[1], token_ids=(3, 3, 3, 3), block_size=BS)]
    mgr.check_integrity()

    mgr.free("a")
    assert ref_cnts(mgr) == [1, 1, 0, 1, 1, 0, 0, 0] and free_ids(mgr) == [5, 6, 7, 2]
    mgr.free("b")
    assert free_ids(mgr) == [5, 6, 7, 2, 4, 3, 1, 0]

    # C needs 6 fresh blocks: they come off the head in LRU order; only block 3 (b's private
    # tail) still carried a hash, so it is the only eviction; the shared head survives.
    tc = [7] * 24
    assert admit(mgr, "c", tc).num_tokens == 0
    assert mgr.block_ids("c") == [5, 6, 7, 2, 4, 3]
    events = mgr.take_events()
    assert events[0] == BlockRemoved(block_hashes=(hb[2],))
    assert events[1:] == [BlockStored(block_hashes=tuple(chain(tc)), parent_block_hash=None, token_ids=tuple(tc), block_size=BS)]
    assert set(mgr.pool.cached_blocks()) == {ha[0], ha[1], *chain(tc)}

    # With c done, a new request with a's prompt revives the surviving head from the free list
    # and takes one fresh block from the head, evicting the hash of c's last block.
    mgr.free("c")
    assert free_ids(mgr) == [1, 0, 3, 4, 2, 7, 6, 5]
    hit = admit(mgr, "d", ta)
    assert [b.block_id for b in hit.blocks] == [0, 1]
    assert mgr.block_ids("d") == [0, 1, 3] and ref_cnts(mgr) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert mgr.take_events() == [BlockRemoved(block_hashes=(chain(tc)[5],))]
    assert free_ids(mgr) == [4, 2, 7, 6, 5]
    mgr.check_integrity()


def test_eviction_order_across_requests_is_lru() -> None:
    mgr = make(6)
    t1, t2 = [1] * 8, [2] * 8
    h1, h2 = chain(t1), chain(t2)
    # Prompts of exactly 8 tokens: block 1 is allocated and cached too (only the hit is capped).
    admit(mgr, "r1", t1 + [0])  # blocks 0, 1, 2
    admit(mgr, "r2", t2 + [0])  # blocks 3, 4, 5
    mgr.free("r1")
    mgr.free("r2")
    mgr.take_events()
    assert free_ids(mgr) == [2, 1, 0, 5, 4, 3]

    admit(mgr, "r3", [9] * 3)  # pops block 2: unhashed partial, no eviction
    assert mgr.take_events() == []
    admit(mgr, "r4", [8] * 3)  # pops block 1: r1's tail
    assert mgr.take_events() == [BlockRemoved(block_hashes=(h1[1],))]
    admit(mgr, "r5", [6] * 3 + [5] * 6)  # pops 0, 5, 4: r1's head, r2's partial, r2's tail
    events = mgr.take_events()
    assert [e for e in events if isinstance(e, BlockRemoved)] == [BlockRemoved(block_hashes=(h1[0],)), BlockRemoved(block_hashes=(h2[1],))]
    assert set(mgr.pool.cached_blocks()) == {h2[0], *chain([6] * 3 + [5] * 6)}
    mgr.check_integrity()


def test_hit_capped_to_leave_one_token() -> None:
    mgr = make()
    admit(mgr, "a", [1] * 8)
    mgr.free("a")
    hit = mgr.get_computed_blocks("b", [1] * 8)  # both blocks cached, but one token must remain
    assert [b.block_id for b in hit.blocks] == [0] and hit.num_tokens == 4
    assert mgr.get_computed_blocks("c", [1] * 9).num_tokens == 8
    assert mgr.get_computed_blocks("d", [1] * 4).num_tokens == 0
    assert mgr.get_computed_blocks("e", []).num_tokens == 0
    # Read-only: no ref count, free-list or event changed.
    assert ref_cnts(mgr) == [0] * 8 and free_ids(mgr) == [2, 3, 4, 5, 6, 7, 1, 0]
    mgr.take_events()
    assert mgr.allocate_slots("b", [1] * 8, 4, 4, hit)
    assert mgr.block_ids("b") == [0, 2]
    # Block 2 recomputes h1's content, but h1 stays mapped to (free) block 1: no event.
    assert mgr.take_events() == [] and mgr.pool.blocks[2].block_hash is None
    mgr.check_integrity()


def test_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block hashes to 42: only the token comparison tells blocks apart."""
    monkeypatch.setattr(kvm, "hash_blocks", lambda toks, bs, parent: [42] * (len(toks) // bs))
    mgr = make()
    admit(mgr, "a", [1, 1, 1, 1, 0])
    hit = mgr.get_computed_blocks("b", [2, 2, 2, 2, 0])
    assert hit.num_tokens == 0
    assert mgr.allocate_slots("b", [2, 2, 2, 2, 0], 0, 5, hit)
    assert mgr.pool.cached_blocks()[42].token_ids == (1, 1, 1, 1)  # first mapping kept
    assert mgr.get_computed_blocks("c", [1, 1, 1, 1, 0]).num_tokens == 4
    mgr.check_integrity()


def test_preempted_request_hits_its_own_blocks() -> None:
    mgr = make()
    tokens = [4] * 10
    admit(mgr, "a", tokens)
    tokens += [5, 5]
    assert mgr.allocate_slots("a", tokens, 10, 2)  # block 2 full now, cached
    mgr.free("a")  # preempted
    assert mgr.block_hashes("a") == []  # forgotten
    hit = admit(mgr, "a", tokens)  # re-admitted with prompt + generated tokens
    assert [b.block_id for b in hit.blocks] == [0, 1]  # 12 tokens: capped at 2 of 3 blocks
    assert mgr.block_ids("a") == [0, 1, 3]  # blocks 3.. were at the head of the free list
    mgr.check_integrity()


# --- failures ------------------------------------------------------------------------------


def test_failed_allocation_changes_nothing() -> None:
    mgr = make(4)
    admit(mgr, "a", [1] * 8)  # blocks 0, 1 cached
    mgr.free("a")
    mgr.take_events()
    assert free_ids(mgr) == [2, 3, 1, 0]

    # 17 tokens: 1 hit (block 0, free) + 4 new = 5 blocks. 4 blocks are free, but block 0 is
    # the hit itself and cannot also be evicted for it: only 3 are available.
    tokens = [1] * 4 + [5] * 13
    hit = mgr.get_computed_blocks("b", tokens)
    assert [b.block_id for b in hit.blocks] == [0]
    before = state_of(mgr, ["a", "b"])
    assert not mgr.allocate_slots("b", tokens, 4, 13, hit)
    assert state_of(mgr, ["a", "b"]) == before and mgr.take_events() == []
    mgr.check_integrity()

    # One token fewer fits exactly: 1 hit + 3 new, evicting block 1's hash.
    tokens = tokens[:16]
    hit = mgr.get_computed_blocks("c", tokens)
    assert mgr.allocate_slots("c", tokens, 4, 12, hit)
    assert mgr.block_ids("c") == [0, 2, 3, 1] and mgr.num_free_blocks == 0
    assert mgr.take_events()[0] == BlockRemoved(block_hashes=(chain([1] * 8)[1],))

    # A decode step that needs a block in a full pool fails and changes nothing either.
    tokens.append(6)
    before = state_of(mgr, ["c"])
    assert not mgr.allocate_slots("c", tokens, 16, 1)
    assert state_of(mgr, ["c"]) == before and mgr.take_events() == []
    mgr.check_integrity()


def test_misuse_raises() -> None:
    mgr = make()
    with pytest.raises(ValueError):
        mgr.allocate_slots("a", [1, 2], 0, 3)  # fewer tokens than slots
    with pytest.raises(ValueError):
        mgr.allocate_slots("a", [1] * 8, 4, 4)  # computed tokens without blocks
    admit(mgr, "a", [1] * 9)
    mgr.free("a")
    hit = mgr.get_computed_blocks("b", [1] * 9)
    with pytest.raises(ValueError):
        mgr.allocate_slots("b", [1] * 9, 0, 9, hit)  # num_computed_tokens != hit.num_tokens
    admit(mgr, "c", [2] * 32)  # takes every block, evicting b's hits
    with pytest.raises(ValueError, match="stale"):
        mgr.allocate_slots("b", [1] * 9, 8, 1, hit)
    assert mgr.block_ids("b") == []
    mgr.check_integrity()


# --- cache-wide operations -----------------------------------------------------------------


def test_reset_prefix_cache() -> None:
    mgr = make()
    admit(mgr, "a", [1] * 9)
    mgr.take_events()
    assert not mgr.reset_prefix_cache()
    assert mgr.take_events() == []
    mgr.free("a")
    assert mgr.reset_prefix_cache()
    assert mgr.take_events() == [AllBlocksCleared()]
    assert mgr.get_computed_blocks("b", [1] * 9).num_tokens == 0
    mgr.check_integrity()


def test_snapshot_rebuilds_same_index() -> None:
    mgr = make(16)
    admit(mgr, "a", [1] * 8 + [2] * 4 + [0])
    admit(mgr, "b", [1] * 8 + [3] * 8 + [0])
    admit(mgr, "c", [4] * 5)
    mgr.free("a")
    admit(mgr, "d", [9] * 36)  # 9 blocks: the 7 never used, a's partial tail, then a's block 2
    assert BlockRemoved(block_hashes=(chain([1] * 8 + [2] * 4)[2],)) in mgr.take_events()
    index: dict[int, tuple[int, ...]] = {}
    for ev in mgr.snapshot_events():
        assert ev.parent_block_hash is None or ev.parent_block_hash in index
        # Tokens re-hash to the same chain: a subscriber using its own hash gets the same tree.
        parent = ROOT if ev.parent_block_hash is None else ev.parent_block_hash
        assert hash_blocks(ev.token_ids, BS, parent) == list(ev.block_hashes)
        for i, h in enumerate(ev.block_hashes):
            index[h] = ev.token_ids[i * BS : (i + 1) * BS]
    assert index == {h: b.token_ids for h, b in mgr.pool.cached_blocks().items()}


def test_caching_disabled() -> None:
    mgr = make(enable_caching=False)
    admit(mgr, "a", [1] * 9)
    mgr.free("a")
    assert admit(mgr, "b", [1] * 9).num_tokens == 0
    assert mgr.block_ids("b") == [3, 4, 5]
    assert mgr.take_events() == [] and mgr.snapshot_events() == [] and mgr.block_hashes("b") == []
    mgr.check_integrity()


def test_numpy_tokens_and_int_events() -> None:
    mgr = make()
    tokens = np.arange(1, 10, dtype=np.int64)
    admit(mgr, "a", tokens)  # type: ignore[arg-type]
    [ev] = mgr.take_events()
    assert ev.token_ids == tuple(range(1, 9)) and all(type(t) is int for t in ev.token_ids)
    mgr.free("a")
    assert mgr.get_computed_blocks("b", np.arange(1, 10)).num_tokens == 8  # type: ignore[arg-type]


def test_hashes_each_token_once(monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[int] = []

    def counting(toks, bs, parent):  # type: ignore[no-untyped-def]
        hashed.append(len(toks))
        return hash_blocks(toks, bs, parent)

    monkeypatch.setattr(kvm, "hash_blocks", counting)
    mgr = make(16)
    tokens = [1] * 18
    admit(mgr, "a", tokens)  # 4 full blocks hashed once, in get_computed_blocks
    for step in range(14):  # decode up to 32 tokens
        tokens.append(step)
        assert mgr.allocate_slots("a", tokens, len(tokens) - 1, 1)
    assert hashed == [16, 4, 4, 4, 4]
    assert mgr.block_hashes("a") == chain(tokens)


# --- property test -------------------------------------------------------------------------

PREFIXES = [(), (5, 5, 5, 5), (5, 5, 5, 5, 6, 6), (7,) * 9]
NUM_BLOCKS = 10


class KVCacheMachine(RuleBasedStateMachine):
    """Random admissions, chunked prefill, decode, finish, preemption and resets.

    Reference models kept beside the manager and compared after every step:
    - `index`: the hash map implied by replaying the event stream;
    - `refs` / `free_order`: ref counts and the LRU free list (tail-first freeing, pops from head);
    - `written`: for each block, the token prefix whose KV it holds, so that every hit is
      checked to carry exactly the requesting prompt's prefix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mgr = KVCacheManager(NUM_BLOCKS, BS, ROOT)
        self.waiting: dict[str, list[int]] = {}
        self.running: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.next_id = 0
        self.index: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.refs = [0] * NUM_BLOCKS
        self.free_order = list(range(NUM_BLOCKS))
        self.written: dict[int, tuple[int, ...]] = {}

    # --- models ---------------------------------------------------------------------------

    def drain(self) -> None:
        for ev in self.mgr.take_events():
            if isinstance(ev, BlockStored):
                parent = ROOT if ev.parent_block_hash is None else ev.parent_block_hash
                assert hash_blocks(ev.token_ids, BS, parent) == list(ev.block_hashes)
                p = ev.parent_block_hash
                for i, h in enumerate(ev.block_hashes):
                    assert h not in self.index, "stored twice without a removal"
                    self.index[h] = (p, ev.token_ids[i * BS : (i + 1) * BS])
                    p = h
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    del self.index[h]
            else:
                assert isinstance(ev, AllBlocksCleared)
                self.index.clear()

    def expected_hit(self, tokens: list[int]) -> int:
        parent: int | None = None
        n = 0
        for i, h in enumerate(chain(tokens)[: max(len(tokens) - 1, 0) // BS]):
            if self.index.get(h) != (parent, tuple(tokens[i * BS : (i + 1) * BS])):
                break
            parent, n = h, n + 1
        return n

    def model_free(self, req: str) -> None:
        for b in reversed(self.mgr.block_ids(req)):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_order.append(b)
        self.mgr.free(req)

    def allocate(self, req: str, tokens: list[int], computed: int, n: int, hit: ComputedBlocks | None) -> bool:
        self.drain()
        reqs = list(self.running) + [req]
        old_ids = self.mgr.block_ids(req)
        before = state_of(self.mgr, reqs)
        if not self.mgr.allocate_slots(req, tokens, computed, n, hit):
            assert state_of(self.mgr, reqs) == before
            assert self.mgr.take_events() == []
            return False
        ids = self.mgr.block_ids(req)
        hit_ids = [b.block_id for b in hit.blocks] if hit is not None else []
        assert ids[: len(old_ids)] == old_ids and ids[len(old_ids) : len(old_ids) + len(hit_ids)] == hit_ids
        for b in hit_ids:
            if self.refs[b] == 0:
                self.free_order.remove(b)
            self.refs[b] += 1
        new = ids[len(old_ids) + len(hit_ids) :]
        assert new == self.free_order[: len(new)], "new blocks must come off the LRU head"
        del self.free_order[: len(new)]
        for b in new:
            self.refs[b] = 1
            self.written.pop(b, None)
        for i in range(computed // BS, (computed + n) // BS):
            self.written[ids[i]] = tuple(tokens[: (i + 1) * BS])
        return True

    # --- rules ----------------------------------------------------------------------------

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 2), max_size=16))
    def add_request(self, prefix: tuple[int, ...], tail: list[int]) -> None:
        tokens = list(prefix) + tail
        if tokens:
            self.waiting[f"r{self.next_id}"] = tokens
            self.next_id += 1

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), chunk=st.integers(1, 16))
    def admit(self, data: st.DataObject, chunk: int) -> None:
        req = data.draw(st.sampled_from(sorted(self.waiting)))
        tokens = self.waiting[req]
        self.drain()
        hit = self.mgr.get_computed_blocks(req, tokens)
        assert len(hit.blocks) == self.expected_hit(tokens) and hit.num_tokens == BS * len(hit.blocks)
        for i, b in enumerate(hit.blocks):
            assert self.written[b.block_id] == tuple(tokens[: (i + 1) * BS]), "hit on a block holding another prefix"
        n = min(chunk, len(tokens) - hit.num_tokens)
        if self.allocate(req, tokens, hit.num_tokens, n, hit):
            del self.waiting[req]
            self.running[req] = tokens
            self.computed[req] = hit.num_tokens + n

    @precondition(lambda self: self.running)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 2))
    def step(self, data: st.DataObject, chunk: int, token: int) -> None:
        """A prefill chunk, or a decode step (append the sampled token, allocate 1 slot)."""
        req = data.draw(st.sampled_from(sorted(self.running)))
        tokens, computed = self.running[req], self.computed[req]
        if computed == len(tokens):
            tokens.append(token)
            n = 1
        else:
            n = min(chunk, len(tokens) - computed)
        if self.allocate(req, tokens, computed, n, None):
            self.computed[req] = computed + n
        else:  # out of blocks: preempt this request
            self.model_free(req)
            del self.running[req], self.computed[req]
            self.waiting[req] = tokens

    @precondition(lambda self: self.running)
    @rule(data=st.data(), requeue=st.booleans())
    def finish_or_preempt(self, data: st.DataObject, requeue: bool) -> None:
        req = data.draw(st.sampled_from(sorted(self.running)))
        self.model_free(req)
        tokens = self.running.pop(req)
        del self.computed[req]
        if requeue:
            self.waiting[req] = tokens

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def abort_waiting(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(sorted(self.waiting)))
        del self.waiting[req]
        self.mgr.free(req)  # forgets remembered hashes; holds no blocks

    @rule(roll=st.integers(0, 7))
    def reset(self, roll: int) -> None:
        if roll != 5:  # rare (hypothesis favours 0 and 7): a reset wipes the cache the rules build
            return
        self.drain()
        ok = self.mgr.reset_prefix_cache()
        assert ok == all(r == 0 for r in self.refs)
        if not ok:
            assert self.mgr.take_events() == []

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def integrity(self) -> None:
        self.mgr.check_integrity()
        assert [b.ref_cnt for b in self.mgr.pool.blocks] == self.refs
        assert free_ids(self.mgr) == self.free_order
        assert self.mgr.num_free_blocks == len(self.free_order)

    @invariant()
    def events_replay_to_the_hash_map(self) -> None:
        self.drain()
        actual = {h: (b.parent_hash, b.token_ids) for h, b in self.mgr.pool.cached_blocks().items()}
        assert self.index == actual
        snap: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        for ev in self.mgr.snapshot_events():
            p = ev.parent_block_hash
            for i, h in enumerate(ev.block_hashes):
                snap[h] = (p, ev.token_ids[i * BS : (i + 1) * BS])
                p = h
        assert snap == actual


KVCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestKVCacheMachine = KVCacheMachine.TestCase


# --- the KV hand-over's hold (replica/kv_transfer.py) -----------------------------------------


def test_a_kept_request_holds_its_blocks_until_released() -> None:
    mgr = make()
    tokens = list(range(1, 11))
    h = chain(tokens)
    mgr.keep_on_free("p")
    admit(mgr, "p", tokens)
    mgr.free("p")  # finished: held for the pull, not on the free list, still cached
    assert mgr.kept_blocks("p") == [(0, h[0]), (1, h[1]), (2, None)]
    assert ref_cnts(mgr)[:3] == [1, 1, 1] and free_ids(mgr) == [3, 4, 5, 6, 7]
    mgr.check_integrity()
    admit(mgr, "q", tokens)  # another request shares the held prefix
    assert mgr.block_ids("q")[:2] == [0, 1] and ref_cnts(mgr)[:2] == [2, 2]
    mgr.check_integrity()
    assert mgr.release_kept("p") and mgr.kept_blocks("p") is None and not mgr.release_kept("p")
    mgr.free("q")
    assert ref_cnts(mgr) == [0] * 8 and set(mgr.pool.cached_blocks()) == set(h)
    mgr.check_integrity()


def test_a_released_hold_lets_a_later_free_release_at_once() -> None:
    mgr = make()
    mgr.keep_on_free("p")
    admit(mgr, "p", list(range(1, 11)))
    assert not mgr.release_kept("p")  # the prefill never finished (its client left): nothing held yet
    mgr.free("p")
    assert mgr.kept_blocks("p") is None and ref_cnts(mgr) == [0] * 8
    mgr.check_integrity()


def test_a_waiting_requests_repeated_lookup_equals_a_fresh_one_after_evictions():
    """A request waiting for blocks is looked up every step, and a lookup reuses the hits its
    last one confirmed (`last_walk`) while they stay cached: once they are evicted, or evicted
    and their hash registered again elsewhere, it must answer what a first lookup answers."""
    mgr = make(num_blocks=8)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # 3 full blocks + 1 token
    admit(mgr, "a", a)
    mgr.free("a")
    waiting = a[:12] + [50, 51, 52, 53, 54]

    def fresh(tokens: list[int]) -> list[int]:
        hit = mgr.get_computed_blocks("fresh", tokens)
        mgr.free("fresh")  # forget the probe (it holds nothing)
        mgr._requests.pop("fresh", None)
        return [b.block_id for b in hit.blocks]

    first = mgr.get_computed_blocks("w", waiting)
    assert first.num_tokens == 12 and [b.block_id for b in first.blocks] == fresh(waiting)
    # Evict everything (another request takes all 8 blocks), then cache a's first block again
    # in another block, under the same hash: the walk must not keep the evicted second block.
    admit(mgr, "b", list(range(100, 132)))
    mgr.free("b")
    admit(mgr, "c", a[:4] + [7, 7, 7])
    mgr.free("c")
    again = mgr.get_computed_blocks("w", waiting)
    assert again.num_tokens == 4
    assert [b.block_id for b in again.blocks] == fresh(waiting)
    assert again.blocks[0].block_hash == chain(a)[0]
    # The rest cached again: the lookup goes on from the block it kept.
    admit(mgr, "d", a)
    mgr.free("d")
    third = mgr.get_computed_blocks("w", waiting)
    assert third.num_tokens == 12 and [b.block_id for b in third.blocks] == fresh(waiting)
    assert third.blocks[0] is again.blocks[0]
    mgr.check_integrity()
