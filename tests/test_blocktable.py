"""balancer._blocktable.BlockTable (the C table of the prefix index) against its oracle
prefix_index.DictTable (a dict): a stateful model under inserts, overwrites, deletions, set_bit /
clear_bit over 1..200 replica slots (so masks widening from one 64-bit word to four), growth and
shrinking, with keys at the edges of the uint64 range and keys that share a home slot; `match`
against the pure-Python match_chain. The prefix index over either table is compared in
test_prefix_index_oracle.py."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from balancer import prefix_index
from balancer.prefix_index import DictTable, match_chain

_bt = pytest.importorskip("balancer._blocktable", reason="C extension not built")
BlockTable = _bt.BlockTable

U64 = 2**64 - 1
_INV = pow(_bt.MULTIPLIER, -1, 2**64)


def colliding(top: int, low: int) -> int:
    """A key whose product with the multiplier has the given top 3 bits: every such key has the
    same home slot in an 8-slot table and lands in the same eighth of any larger one."""
    return (((top & 7) << 61) | low) * _INV % 2**64


keys = st.one_of(
    st.sampled_from([0, 1, U64, U64 - 1, 2**63, 2**32, 2**30, 2**60]),
    st.integers(0, U64),
    st.builds(colliding, st.integers(0, 7), st.integers(0, 40)),
    st.builds(lambda hi: (hi << 40) | 0xABC, st.integers(0, 2**24 - 1)),  # same low 40 bits
)
masks = st.one_of(st.integers(1, U64), st.sampled_from([1, 2, 3, 2**63, U64]))
wide_masks = st.one_of(masks, st.integers(1, 2**200 - 1), st.sampled_from([2**64, 2**199, 2**128 - 1]))
replica_slots = st.one_of(st.integers(0, 3), st.integers(0, 199), st.sampled_from([63, 64, 127, 128, 199]))
OWNERS = [f"replica-{s}" for s in range(200)]


class TableVsDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = BlockTable()
        self.d = DictTable()
        self.held: list[int] = []  # keys stored so far, for set_bit/match to hit

    @rule(k=keys, v=wide_masks)
    def put(self, k: int, v: int) -> None:
        self.t[k] = v
        self.d[k] = v
        self.held.append(k)

    def _pick(self, k: int, reuse: int) -> int:
        """A key stored before (3 times in 4, when there is one), else the new key `k`."""
        return self.held[reuse % len(self.held)] if self.held and reuse % 4 else k

    @rule(k=keys, slot=replica_slots, reuse=st.integers(0, 2**16))
    def set_bit(self, k: int, slot: int, reuse: int) -> None:
        k = self._pick(k, reuse)
        assert self.t.set_bit(k, slot) == self.d.set_bit(k, slot)
        self.held.append(k)

    @rule(k=keys, slot=replica_slots, reuse=st.integers(0, 2**16))
    def clear_bit(self, k: int, slot: int, reuse: int) -> None:
        k = self._pick(k, reuse)
        assert self.t.clear_bit(k, slot) == self.d.clear_bit(k, slot)

    @rule(picks=st.lists(st.integers(0, 2**16), max_size=30), extra=st.lists(keys, max_size=3))
    def match(self, picks: list[int], extra: list[int]) -> None:
        chain = [self.held[p % len(self.held)] for p in picks] if self.held else []
        chain += extra
        got = self.t.match(chain, OWNERS)
        expected = self.d.match(chain, OWNERS)
        assert got == expected and list(got) == list(expected)

    @rule(k=keys)
    def delete(self, k: int) -> None:
        if k in self.d:
            del self.t[k]
            del self.d[k]
        else:
            with pytest.raises(KeyError):
                del self.t[k]

    @rule(k=keys)
    def lookup(self, k: int) -> None:
        assert self.t.get(k) == self.d.get(k)
        assert self.t.get(k, 0) == self.d.get(k, 0)
        assert (k in self.t) == (k in self.d)
        if k in self.d:
            assert self.t[k] == self.d[k]
        else:
            with pytest.raises(KeyError):
                self.t[k]

    @rule(seed=st.integers(0, 2**32), n=st.integers(1, 300), colliding_keys=st.booleans())
    def bulk_insert(self, seed: int, n: int, colliding_keys: bool) -> None:
        """Enough keys to grow the table several times."""
        rng = random.Random(seed)
        for _ in range(n):
            k = colliding(rng.randrange(8), rng.randrange(2**20)) if colliding_keys else rng.getrandbits(64)
            v = rng.randrange(1, 2**64)
            self.t[k] = v
            self.d[k] = v

    @rule(seed=st.integers(0, 2**32), fraction=st.sampled_from([0.5, 0.9, 1.0]))
    def bulk_delete(self, seed: int, fraction: float) -> None:
        """Many deletions: long backward shifts, then shrinking."""
        victims = list(self.d)
        random.Random(seed).shuffle(victims)
        for k in victims[: int(len(victims) * fraction)]:
            del self.t[k]
            del self.d[k]

    @rule()
    def clear(self) -> None:
        self.t.clear()
        self.d.clear()
        self.held.clear()

    @invariant()
    def same_contents(self) -> None:
        t, d = self.t, self.d
        assert len(t) == len(d)
        assert bool(t) == bool(d)
        assert t == d and not (t != d)
        assert sorted(t) == sorted(d)
        assert sorted(t.items()) == sorted(d.items())
        assert sorted(t.keys()) == sorted(d) and sorted(t.values()) == sorted(d.values())
        assert all(t.get(k) == v for k, v in d.items())
        cap = t.capacity
        assert cap >= 8 and cap & (cap - 1) == 0 and len(t) * 10 <= cap * 7
        assert all(v.bit_length() <= t.slots for v in d.values())


TestTableVsDict = TableVsDict.TestCase
TestTableVsDict.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_edge_keys_and_rejected_values() -> None:
    t = BlockTable()
    t[0] = 1
    t[U64] = U64
    assert t[0] == 1 and t[U64] == U64 and len(t) == 2 and t == {0: 1, U64: U64}
    for bad_key in (-1, 2**64, 2**90, -(2**70)):
        assert bad_key not in t and t.get(bad_key, "no") == "no"
        with pytest.raises(OverflowError):
            t[bad_key] = 1
        with pytest.raises(KeyError):
            del t[bad_key]
    assert "x" not in t and t.get("x") is None and t.get(1.0) is None
    with pytest.raises(TypeError):
        t["x"] = 1
    with pytest.raises(ValueError, match="nonzero"):
        t[5] = 0
    with pytest.raises(OverflowError, match="negative"):
        t[5] = -1
    with pytest.raises(OverflowError, match="below 2"):
        t[5] = 2**_bt.MAX_SLOTS  # a slot beyond the limit
    with pytest.raises(TypeError):
        t[5] = 1.0
    with pytest.raises(TypeError):
        t.get()
    assert t.slots == 64 and len(t) == 2
    t[5] = 2**64  # slot 64: the masks widen to two words, the entries stay
    assert t.slots == 128 and t[5] == 2**64 and t == {0: 1, U64: U64, 5: 2**64}
    del t[5]
    assert t == {0: 1, U64: U64}
    assert t != {0: 1, U64: 3} and t != {0: 1} and t != {0: 1, U64: U64, 7: 1} and t != {0: 1, "x": 2}
    other = BlockTable()
    other[U64] = U64
    other[0] = 1
    assert t == other
    other[0] = 2
    assert t != other
    with pytest.raises(TypeError):
        hash(t)


def test_iteration_fails_when_keys_are_added_or_removed() -> None:
    t = BlockTable()
    for k in range(1, 20):
        t[k] = k
    it = iter(t)
    next(it)
    t[1] = 99  # overwriting a value is fine, as for a dict
    next(it)
    t[100] = 1
    with pytest.raises(RuntimeError, match="changed size"):
        next(it)
    it = iter(t)
    next(it)
    del t[100]
    with pytest.raises(RuntimeError, match="changed size"):
        list(it)


def test_set_bit_and_clear_bit() -> None:
    t = BlockTable()
    assert t.set_bit(7, 0) is True and t.set_bit(7, 0) is False and t[7] == 1
    assert t.set_bit(7, 130) is True and t.slots == 192 and t[7] == 1 | 1 << 130
    assert t.clear_bit(7, 0) is True and t.clear_bit(7, 0) is False and t[7] == 1 << 130
    assert t.clear_bit(8, 0) is False and t.clear_bit("x", 0) is False and t.clear_bit(7, 5000) is False
    assert t.clear_bit(7, 130) is True and 7 not in t and len(t) == 0  # an empty mask: deleted
    assert t.slots == 192  # the width stays
    for bad in (-1, _bt.MAX_SLOTS):
        with pytest.raises(ValueError, match="replica slot"):
            t.set_bit(1, bad)
        with pytest.raises(ValueError, match="replica slot"):
            t.clear_bit(1, bad)
    with pytest.raises(OverflowError):
        t.set_bit(2**64, 0)
    with pytest.raises(TypeError):
        t.set_bit(1)
    assert BlockTable(slots=65).slots == 128 and BlockTable(slots=1).slots == 64
    with pytest.raises(ValueError, match="slots"):
        BlockTable(slots=0)


def test_widening_keeps_entries_and_probe_runs() -> None:
    """Colliding keys in long probe runs, then a slot that widens every mask, then deletions
    (backward shifts at the new width)."""
    t, d = BlockTable(), DictTable()
    ks = [colliding(i % 8, i) for i in range(200)]
    for i, k in enumerate(ks):
        assert t.set_bit(k, i % 3) == d.set_bit(k, i % 3)
    it = iter(t)
    t.set_bit(ks[0], 199)
    d.set_bit(ks[0], 199)
    with pytest.raises(RuntimeError):
        next(it)  # the re-allocation moved every entry
    assert t.slots == 256 and t == d
    for k in ks[::2]:
        del t[k]
        del d[k]
    assert t == d and sorted(t.items()) == sorted(d.items())


def test_grows_and_shrinks() -> None:
    t = BlockTable()
    assert t.capacity == 8
    for k in range(10_000):
        t[k * 2**40] = 1  # keys that differ only in their high bits
    assert len(t) == 10_000 and 10_000 * 10 <= t.capacity * 7
    big = t.capacity
    for k in range(9_990):
        del t[k * 2**40]
    assert len(t) == 10 and t.capacity < big
    assert sorted(t) == [k * 2**40 for k in range(9_990, 10_000)]
    assert BlockTable(capacity=1000).capacity >= 1000 * 10 / 7
    with pytest.raises(ValueError):
        BlockTable(capacity=-1)


# --- match against match_chain ------------------------------------------------------------------


@st.composite
def table_and_chain(draw):
    """A table of masks over few slots (so that prefixes of every length occur) and a chain
    mixing its keys with absent ones."""
    n_slots = draw(st.sampled_from([1, 3, 16, 64, 65, 130, 200]))
    slot_bits = st.lists(st.integers(0, n_slots - 1), min_size=1, max_size=n_slots)
    mask = st.builds(lambda bits: sum(1 << b for b in set(bits)), slot_bits)
    present = draw(st.lists(st.tuples(keys, mask), max_size=60))
    table = dict(present)
    pool = list(table) or [0]
    chain = draw(st.lists(st.one_of(st.sampled_from(pool), keys), max_size=80))
    # Mostly-held chains: the common case (a long shared prefix), where drops are rare.
    if draw(st.booleans()) and table:
        chain = draw(st.lists(st.sampled_from(pool), max_size=80)) + chain
    return n_slots, table, chain


@settings(max_examples=300, deadline=None)
@given(table_and_chain())
def test_match_equals_match_chain(case) -> None:
    n_slots, d, chain = case
    t = BlockTable()
    for k, v in d.items():
        t[k] = v
    expected = match_chain(d.get, chain, range(200))
    got = t.match(chain)
    assert got == expected
    assert list(got.items()) == list(expected.items())  # same order too
    assert t.match(tuple(chain)) == expected
    assert t.match(struct.pack(f"<{len(chain)}Q", *chain)) == expected
    assert t.match(chain, OWNERS) == match_chain(d.get, chain, OWNERS)


def test_match_treats_what_is_not_a_uint64_as_missing() -> None:
    t = BlockTable()
    for k in (1, 2, 3):
        t[k] = 0b11
    t[4] = 0b01
    assert t.match([1, 2, 4, 3]) == {1: 2, 0: 4}
    for bad in (-1, 2**64 + 1, "x", None):  # (a float equal to a key would be found in a dict)
        chain = [1, 2, bad, 3]
        assert t.match(chain) == match_chain({1: 3, 2: 3, 3: 3}.get, chain, list(range(64))) == {0: 2, 1: 2}
    assert t.match([]) == {} and t.match(b"") == {} and t.match([99]) == {}
    assert t.match(iter([1, 2])) == {0: 2, 1: 2}  # any iterable of ints
    with pytest.raises(ValueError, match="whole number"):
        t.match(b"\x00" * 12)
    with pytest.raises(TypeError):
        t.match(5)
    with pytest.raises(IndexError):
        t.match([1], ["only-slot-0"])  # slot 1 has no owner


def test_match_with_all_64_slots() -> None:
    t = BlockTable()
    chain = list(range(100, 164))
    for i, k in enumerate(chain):
        t[k] = U64 >> i  # slot s holds the first 64 - s blocks
    assert t.match(chain) == {s: 64 - s for s in range(64)}
    d = dict(t.items())
    assert t.match(chain) == match_chain(d.get, chain, list(range(64)))


def test_match_with_200_slots() -> None:
    """Slot s holds the first 200 - s blocks: a drop at every index, across four mask words."""
    t = BlockTable(slots=200)
    chain = list(range(100, 300))
    full = 2**200 - 1
    for i, k in enumerate(chain):
        t[k] = full >> i
    assert t.match(chain) == {s: 200 - s for s in range(200)}
    assert list(t.match(chain)) == list(range(199, -1, -1))  # by increasing length
    d = dict(t.items())
    assert t.match(chain, OWNERS) == match_chain(d.get, chain, OWNERS)
    assert t.match(chain[:150]) == {s: min(150, 200 - s) for s in range(200)}


def test_prefix_index_reports_which_table_it_uses() -> None:
    assert prefix_index.NATIVE_TABLE is True
    assert prefix_index.PrefixIndex(4, "m").native_tables is True
