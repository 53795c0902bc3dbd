"""PrefixIndex over the C BlockTables against PrefixIndex over DictTables, its pure-Python
oracle: the same random stream of stores, removals, clears, replica removals and lookups, over
fleets of 1..200 replica slots (so C masks of one to four 64-bit words), must give the same
answers, statistics and integrity after every step. Skipped where the extension is not built."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import prefix_index
from balancer.prefix_index import PrefixIndex
from protocol.events import AllBlocksCleared, BlockRemoved, BlockStored
from protocol.hashing import hash_blocks, root_hash

pytest.importorskip("balancer._blocktable", reason="C extension not built")

BS = 4
MODEL = "oracle-model"
ROOT = root_hash(MODEL)
MEDIA = ("GPU", "CPU")


def _toks(n_blocks: int, start: int) -> list[int]:
    return list(range(start, start + n_blocks * BS))


# Chains that share heads of 2 and 5 blocks, and one unrelated.
PREFIXES = [_toks(8, 1), _toks(8, 1)[: 2 * BS] + _toks(6, 300), _toks(8, 1)[: 5 * BS] + _toks(3, 600), _toks(8, 900)]
OURS = [hash_blocks(p, BS, ROOT) for p in PREFIXES]


def _engine_id(ident: bool, c: int, i: int) -> int:
    """Our hash (a kvfleet replica) or an unrelated uint64 (vLLM's sha256-based ids)."""
    if ident:
        return OURS[c][i]
    return int.from_bytes(hashlib.sha256(repr((c, i)).encode()).digest()[:8], "big")


def _pair(**kw) -> tuple[PrefixIndex, PrefixIndex]:
    """Two indexes of one configuration: over C tables, and on the fallback path (DictTable)."""
    saved = prefix_index._BlockTable
    c_idx = PrefixIndex(BS, MODEL, **kw)
    prefix_index._BlockTable = None  # read by PrefixIndex() at construction
    try:
        return c_idx, PrefixIndex(BS, MODEL, **kw)
    finally:
        prefix_index._BlockTable = saved


@st.composite
def fleet_and_stream(draw):
    """A fleet of n replicas (added in a random order, which gives their slots) and a stream
    of operations on a few of them, mostly the highest slots, where the C masks are widest. A
    replica's engine ids are ours (kvfleet) or unrelated (vLLM), for all its events."""
    n = draw(st.one_of(st.integers(1, 200), st.sampled_from([1, 64, 65, 128, 129, 200])))
    order = draw(st.permutations(range(n)))
    slot = st.one_of(st.integers(max(0, n - 4), n - 1), st.integers(0, n - 1))
    name = slot.map(order.__getitem__)  # the replica that order gives that slot
    active = draw(st.lists(st.tuples(name, st.booleans()), min_size=1, max_size=5,
                           unique_by=lambda a: a[0]))
    replica = st.sampled_from(active)
    # Chain 0 and the GPU most of the time, so that removals and matches meet stored blocks.
    chain = st.one_of(st.just(0), st.integers(0, len(PREFIXES) - 1))
    medium = st.sampled_from(("GPU", "GPU", "GPU", "CPU"))
    store = st.tuples(st.just("store"), replica, chain, st.integers(0, 7), st.integers(1, 8), medium)
    whole = st.tuples(st.just("store"), replica, chain, st.just(0), st.just(8), medium)
    remove = st.tuples(st.just("remove"), replica, chain, st.integers(0, 7), medium)
    op = st.one_of(store, whole, whole, remove, remove,  # repeated: drawn more often
                   st.tuples(st.just("clear"), replica),
                   st.tuples(st.just("drop_replica"), replica),
                   st.tuples(st.just("match"), chain, st.integers(0, 8), medium))
    return n, order, draw(st.lists(op, min_size=10, max_size=60))


def _event(op: tuple):
    kind = op[0]
    if kind == "store":
        _, (_, ident), c, start, n, medium = op
        end = min(start + n, len(OURS[c]))
        if end <= start:
            return None
        return BlockStored(tuple(_engine_id(ident, c, i) for i in range(start, end)),
                           None if start == 0 else _engine_id(ident, c, start - 1),
                           tuple(PREFIXES[c][start * BS : end * BS]), BS, medium=medium)
    if kind == "remove":
        _, (_, ident), c, i, medium = op
        return BlockRemoved((_engine_id(ident, c, i),), medium=medium)
    return AllBlocksCleared()


def _same(c_idx: PrefixIndex, d_idx: PrefixIndex) -> None:
    c_idx.check_integrity()
    d_idx.check_integrity()
    assert c_idx.stats == d_idx.stats
    assert c_idx.replicas() == d_idx.replicas()
    for medium in MEDIA:
        assert c_idx.num_entries(medium) == d_idx.num_entries(medium)
        for chain in OURS:
            got, expected = c_idx.match(chain, medium), d_idx.match(chain, medium)
            assert list(got.items()) == list(expected.items())  # same answers, same order


@settings(max_examples=150, deadline=None)
@given(fleet_and_stream())
def test_c_tables_answer_as_the_dict_oracle(case) -> None:
    _, order, stream = case
    # A small bound and ghost list, so that over_capacity and ghost parents occur too.
    c_idx, d_idx = _pair(max_blocks_per_replica=40, ghost_capacity=8)
    assert c_idx.native_tables and not d_idx.native_tables
    for r in order:
        c_idx.add_replica(f"r{r}")
        d_idx.add_replica(f"r{r}")
    for op in stream:
        if op[0] == "match":
            _, c, k, medium = op
            assert list(c_idx.match(OURS[c][:k], medium).items()) == list(d_idx.match(OURS[c][:k], medium).items())
            continue
        rid = f"r{op[1][0]}"
        if op[0] == "drop_replica":
            c_idx.remove_replica(rid)
            d_idx.remove_replica(rid)
        else:
            ev = _event(op)
            if ev is None:
                continue
            c_idx.apply(rid, ev)
            d_idx.apply(rid, ev)
        _same(c_idx, d_idx)
    _same(c_idx, d_idx)


def test_a_200_replica_fleet_matches_the_oracle() -> None:
    """Every replica of 200 holds a different prefix length of one chain (so the walk drops a
    replica at every block, across all four mask words), then half of them are cleared."""
    tokens = _toks(200, 1)
    ours = hash_blocks(tokens, BS, ROOT)
    c_idx, d_idx = _pair()
    for r in range(200):
        ev = BlockStored(tuple(ours[: r + 1]), None, tuple(tokens[: (r + 1) * BS]), BS)
        c_idx.apply(f"r{r}", ev)
        d_idx.apply(f"r{r}", ev)
    assert c_idx.match(ours) == {f"r{r}": r + 1 for r in range(200)}
    for r in range(0, 200, 2):
        c_idx.clear_replica(f"r{r}")
        d_idx.clear_replica(f"r{r}")
    assert c_idx.match(ours) == {f"r{r}": r + 1 for r in range(1, 200, 2)}
    _same(c_idx, d_idx)
