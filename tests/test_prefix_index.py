"""PrefixIndex: re-hashing from token ids, engine-id bookkeeping, match semantics, bounds, and a
property test against a brute-force model with an integrity check after every step.

Every test runs twice: with the C tables (balancer._blocktable, where built) and with the dict
tables of the fallback path."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import prefix_index
from balancer.prefix_index import PrefixIndex
from protocol.events import AllBlocksCleared, BlockRemoved, BlockStored
from protocol.hashing import hash_blocks, prompt_hashes, root_hash

BS = 4
MODEL = "tiny-model"
ROOT = root_hash(MODEL)


@pytest.fixture(autouse=True, scope="module", params=["native", "dict"])
def table_kind(request):
    """Which tables new indexes use. Module-scoped (hypothesis rejects function-scoped fixtures)."""
    saved = prefix_index._BlockTable
    if request.param == "native" and saved is None:
        pytest.skip("balancer._blocktable not built")
    if request.param == "dict":
        prefix_index._BlockTable = None
    yield request.param
    prefix_index._BlockTable = saved


def toks(n_blocks: int, start: int = 1) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def vllm_id(*parts: object) -> int:
    """An engine hash unlike ours (vLLM's is sha256-based), as a uint64."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def vllm_events(tokens: list[int], split: int) -> tuple[list[int], list[BlockStored]]:
    """vLLM-style engine ids for a chain, stored as two events (the second names the first's tail)."""
    n = len(tokens) // BS
    ids = [vllm_id(tuple(tokens[: (i + 1) * BS])) for i in range(n)]
    first = BlockStored(tuple(ids[:split]), None, tuple(tokens[: split * BS]), BS)
    second = BlockStored(tuple(ids[split:]), ids[split - 1], tuple(tokens[split * BS : n * BS]), BS)
    return ids, [first, second]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 16), st.integers(0, 2**64 - 1))
def test_hashing_list_and_array_paths_agree(tokens: list[int], bs: int, parent: int) -> None:
    import numpy as np

    assert hash_blocks(tokens, bs, parent) == hash_blocks(np.asarray(tokens, dtype=np.uint64), bs, parent)


def test_vllm_engine_ids_are_rehashed_to_our_chain() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(5)
    ids, events = vllm_events(tokens, 2)
    idx.apply_many("r0", events)
    ours = prompt_hashes(tokens, BS, MODEL)
    assert not set(ids) & set(ours)  # the engine ids are not ours...
    assert idx.replica_block_hashes("r0") == set(ours)  # ...yet the index holds our chain
    assert idx.match(ours) == {"r0": 5}
    assert idx.match(prompt_hashes(tokens[:8] + [999] * 8, BS, MODEL)) == {"r0": 2}
    idx.apply("r0", BlockRemoved((ids[4], ids[3])))
    assert idx.match(ours) == {"r0": 3}
    idx.check_integrity()


def test_kvfleet_engine_ids_equal_ours() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(3)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored(tuple(ours[:2]), None, tuple(tokens[:8]), BS))
    idx.apply("r0", BlockStored((ours[2],), ours[1], tuple(tokens[8:]), BS))
    assert idx.match(ours) == {"r0": 3}
    idx.apply("r0", BlockRemoved((ours[1],)))
    assert idx.match(ours) == {"r0": 1}  # a missing middle block ends the prefix
    idx.check_integrity()


def test_bytes_engine_ids() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(2)
    a, b = b"\xaa" * 32, b"\xbb" * 32
    idx.apply("r0", BlockStored((a,), None, tuple(tokens[:4]), BS))
    idx.apply("r0", BlockStored((b,), a, tuple(tokens[4:]), BS))
    assert idx.match(prompt_hashes(tokens, BS, MODEL)) == {"r0": 2}
    idx.apply("r0", BlockRemoved((b,)))
    assert idx.match(prompt_hashes(tokens, BS, MODEL)) == {"r0": 1}


def test_match_reports_each_replica_prefix_in_one_pass() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(6)
    ours = hash_blocks(tokens, BS, ROOT)
    for rid, n in (("a", 6), ("b", 2), ("c", 4)):
        idx.apply(rid, BlockStored(tuple(ours[:n]), None, tuple(tokens[: n * BS]), BS))
    idx.apply("d", BlockStored((ours[0] ^ 1,), None, tuple(toks(1, 500)), BS))  # unrelated
    assert idx.match(ours) == {"a": 6, "b": 2, "c": 4}
    assert idx.match(ours[:3]) == {"a": 3, "b": 2, "c": 3}
    assert idx.match([]) == {}
    assert idx.match(hash_blocks(toks(3, 900), BS, ROOT)) == {}
    assert idx.match(ours, medium="CPU") == {}


def test_unknown_parent_is_counted_and_flags_a_resync() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(3)
    ids, _ = vllm_events(tokens, 1)
    # The store of block 0 was missed; block 1 names it as parent.
    idx.apply("r0", BlockStored((ids[1],), ids[0], tuple(tokens[4:8]), BS))
    assert idx.replica_block_hashes("r0") == set()
    assert idx.stats.unknown_parent == 1
    assert idx.pop_resync_reason("r0") == "unknown_parent"
    assert idx.pop_resync_reason("r0") is None


def test_unknown_parent_resolved_by_verified_identity() -> None:
    # A kvfleet replica uses our hash: a child of an unknown parent can be checked and kept.
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(3)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored((ours[1], ours[2]), ours[0], tuple(tokens[4:]), BS))
    assert idx.replica_block_hashes("r0") == {ours[1], ours[2]}
    assert idx.stats.identity_parents == 1 and idx.pop_resync_reason("r0") is None


def test_parent_removed_just_before_its_child_is_stored() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(3)
    ids, events = vllm_events(tokens, 2)
    idx.apply("r0", events[0])
    idx.apply("r0", BlockRemoved((ids[1],)))
    idx.apply("r0", events[1])  # parent ids[1] was evicted a moment ago
    ours = prompt_hashes(tokens, BS, MODEL)
    assert idx.replica_block_hashes("r0") == {ours[0], ours[2]}
    assert idx.stats.ghost_parents == 1 and idx.pop_resync_reason("r0") is None
    idx.check_integrity()


def test_two_engine_ids_for_one_block_need_two_removals() -> None:
    # vLLM salts (extra_keys) change its hash but not the tokens: same block for us.
    idx = PrefixIndex(BS, MODEL)
    tokens = tuple(toks(1))
    idx.apply("r0", BlockStored((111,), None, tokens, BS))
    idx.apply("r0", BlockStored((222,), None, tokens, BS))
    ours = prompt_hashes(tokens, BS, MODEL)
    idx.check_integrity()
    idx.apply("r0", BlockRemoved((111,)))
    assert idx.match(ours) == {"r0": 1}
    idx.apply("r0", BlockRemoved((222,)))
    assert idx.match(ours) == {}
    idx.check_integrity()


def test_duplicates_and_unknown_removals_are_harmless() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(2)
    ours = hash_blocks(tokens, BS, ROOT)
    ev = BlockStored(tuple(ours), None, tuple(tokens), BS)
    idx.apply("r0", ev)
    idx.apply("r0", ev)
    idx.apply("r0", BlockRemoved((12345,)))
    assert idx.num_blocks("r0") == 2 and idx.stats.duplicate_stores == 2 and idx.stats.unknown_removals == 1
    idx.check_integrity()


def test_media_are_separate() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(2)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored(tuple(ours), None, tuple(tokens), BS, medium="CPU"))
    idx.apply("r0", BlockStored(tuple(ours[:1]), None, tuple(tokens[:4]), BS, medium="GPU"))
    assert idx.match(ours) == {"r0": 1} and idx.match(ours, medium="CPU") == {"r0": 2}
    idx.apply("r0", BlockRemoved(tuple(ours), medium="CPU"))
    assert idx.match(ours) == {"r0": 1} and idx.match(ours, medium="CPU") == {}
    idx.check_integrity()


def test_tier_of_each_block_per_replica() -> None:
    """vLLM's OffloadingConnector flow: a block is stored on the GPU, copied to host memory
    (BlockStored medium CPU), then evicted from the GPU: the replica's device prefix shrinks and
    the rest of its chain is a host-tier hit."""
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(4)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored(tuple(ours), None, tuple(tokens), BS))
    idx.apply("r1", BlockStored(tuple(ours[:1]), None, tuple(tokens[:4]), BS))
    assert idx.match_offloaded(ours, idx.match(ours)) == {}  # no lower tier published yet
    idx.apply("r0", BlockStored(tuple(ours[1:]), ours[0], tuple(tokens[4:]), BS, medium="CPU"))
    idx.check_integrity()
    device = idx.match(ours)
    assert device == {"r0": 4, "r1": 1} and idx.match_offloaded(ours, device) == {}  # all on the GPU still
    idx.apply("r0", BlockRemoved(tuple(ours[2:]), medium="GPU"))
    device = idx.match(ours)
    assert device == {"r0": 2, "r1": 1}
    assert idx.match_offloaded(ours, device) == {"r0": 2}  # blocks 2, 3 from host memory
    assert idx.replica_block_hashes("r0", "CPU") == set(ours[1:])
    idx.check_integrity()
    # The host copy goes too: the chain ends at the device prefix.
    idx.apply("r0", BlockRemoved((ours[3],), medium="CPU"))
    assert idx.match_offloaded(ours, idx.match(ours)) == {"r0": 1}
    idx.apply("r0", BlockRemoved((ours[1],), medium="GPU"))  # block 1 now only on the host
    assert idx.match(ours) == {"r0": 1, "r1": 1} and idx.match_offloaded(ours, idx.match(ours)) == {"r0": 2}
    idx.check_integrity()
    idx.clear_replica("r0")
    assert idx.match_offloaded(ours, idx.match(ours)) == {}
    idx.check_integrity()


def test_disk_blocks_of_a_lower_tier_hit_are_told_from_host_ones() -> None:
    """A replica with a host and a disk tier: of the blocks after its device prefix, those only
    on disk (loaded over the slower link) are counted apart; a block on both is a host one."""
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(8)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored(tuple(ours[:2]), None, tuple(tokens[:8]), BS))  # device: blocks 0, 1
    idx.apply("r0", BlockStored(tuple(ours[2:4]), ours[1], tuple(tokens[8:16]), BS, medium="CPU"))
    device = idx.match(ours)
    offloaded = idx.match_offloaded(ours, device)
    assert offloaded == {"r0": 2} and idx.match_disk(ours, device, offloaded) == {}  # no disk published
    # Blocks 4, 5 on disk, 6 on host again, 7 on both: 2 of the 6 lower-tier blocks come from disk.
    idx.apply("r0", BlockStored(tuple(ours[4:6]), ours[3], tuple(tokens[16:24]), BS, medium="Disk"))
    idx.apply("r0", BlockStored((ours[6],), ours[5], tuple(tokens[24:28]), BS, medium="CPU"))
    idx.apply("r0", BlockStored((ours[7],), ours[6], tuple(tokens[28:32]), BS, medium="CPU"))
    idx.apply("r0", BlockStored((ours[7],), ours[6], tuple(tokens[28:32]), BS, medium="Disk"))
    idx.apply("r1", BlockStored(tuple(ours[:1]), None, tuple(tokens[:4]), BS, medium="Disk"))
    idx.check_integrity()
    device = idx.match(ours)
    offloaded = idx.match_offloaded(ours, device)
    assert device == {"r0": 2} and offloaded == {"r0": 6, "r1": 1}
    assert idx.match_disk(ours, device, offloaded) == {"r0": 2, "r1": 1}
    # The disk copies go: the chain ends after the host blocks 2, 3.
    idx.apply("r0", BlockRemoved(tuple(ours[4:6]), medium="Disk"))
    offloaded = idx.match_offloaded(ours, device)
    assert offloaded == {"r0": 2, "r1": 1} and idx.match_disk(ours, device, offloaded) == {"r1": 1}
    idx.check_integrity()


def test_each_tier_is_one_table_whoever_spells_its_medium() -> None:
    """Media are indexed by the tier they name (protocol.events.canonical_medium): host memory as
    "CPU" (vLLM) or "CPU_PINNED" (Dynamo's KVBM), disk as "DISK" (kvfleet), "Disk" (kvfleet
    before, vLLM forks) or "nvme"; a removal under another spelling of the same tier applies. A
    medium no alias names is a lower tier of its own: in the offloaded hit, not on disk."""
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(8)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored(tuple(ours[:1]), None, tuple(tokens[:4]), BS, medium=None))  # device (no medium)
    idx.apply("r0", BlockStored((ours[1],), ours[0], tuple(tokens[4:8]), BS, medium="CPU_PINNED"))
    idx.apply("r0", BlockStored((ours[2],), ours[1], tuple(tokens[8:12]), BS, medium="CPU"))
    idx.apply("r0", BlockStored((ours[3],), ours[2], tuple(tokens[12:16]), BS, medium="DISK"))
    idx.apply("r0", BlockStored((ours[4],), ours[3], tuple(tokens[16:20]), BS, medium="Disk"))
    idx.apply("r0", BlockStored((ours[5],), ours[4], tuple(tokens[20:24]), BS, medium="nvme"))
    idx.apply("r1", BlockStored(tuple(ours[:2]), None, tuple(tokens[:8]), BS, medium="Certus"))
    idx.check_integrity()
    assert idx.replica_block_hashes("r0", "CPU") == set(ours[1:3]) == idx.replica_block_hashes("r0", "CPU_PINNED")
    assert idx.replica_block_hashes("r0", "DISK") == set(ours[3:6]) == idx.replica_block_hashes("r0", "Disk")
    assert idx.num_entries("CPU") == 2 and idx.num_entries("DISK") == 3
    device = idx.match(ours)
    offloaded = idx.match_offloaded(ours, device)
    assert device == {"r0": 1} and offloaded == {"r0": 5, "r1": 2}
    assert idx.match_disk(ours, device, offloaded) == {"r0": 3}  # r1's "Certus" blocks: not disk
    idx.apply("r0", BlockRemoved((ours[3], ours[4]), medium="Disk"))  # stored as DISK and as Disk
    idx.apply("r0", BlockRemoved((ours[2],), medium="cpu_pinned"))
    idx.check_integrity()
    assert idx.stats.unknown_removals == 0
    offloaded = idx.match_offloaded(ours, device)
    assert offloaded == {"r0": 1, "r1": 2} and idx.match_disk(ours, device, offloaded) == {}


def test_a_lower_tier_after_many_device_blocks_builds_the_union_once() -> None:
    idx = PrefixIndex(BS, MODEL)
    chains = [toks(3, 1 + 1000 * i) for i in range(5)]
    for i, tokens in enumerate(chains):
        ours = hash_blocks(tokens, BS, ROOT)
        idx.apply(f"r{i % 3}", BlockStored(tuple(ours), None, tuple(tokens), BS))
    idx.apply("r0", BlockStored((7, 8), None, tuple(toks(2, 9000)), BS, medium="CPU"))
    idx.check_integrity()
    ours = hash_blocks(chains[1], BS, ROOT)
    idx.apply("r1", BlockRemoved(tuple(ours[1:])))
    idx.check_integrity()
    assert idx.match(ours) == {"r1": 1} and idx.match_offloaded(ours, idx.match(ours)) == {}


def test_events_the_index_cannot_use_are_skipped_and_counted() -> None:
    idx = PrefixIndex(BS, MODEL)
    idx.apply("r0", BlockStored((1,), None, tuple(toks(2)), 2 * BS, ))  # another block size
    idx.apply("r0", BlockStored((2,), None, tuple(toks(1)), BS, kv_cache_spec_kind="sliding_window"))
    idx.apply("r0", BlockStored((3,), None, (1, 2), BS))  # tokens missing
    idx.apply("r0", BlockStored((4,), None, (1, 2, 3, 2**40), BS))  # not a uint32 token
    assert idx.num_blocks("r0") == 0 and idx.stats.skipped_events == 4


def test_lora_blocks_live_under_the_adapter_root() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(2)
    adapter = hash_blocks(tokens, BS, root_hash(MODEL, lora_name="my-lora"))
    idx.apply("r0", BlockStored((5, 6), None, tuple(tokens), BS, lora_name="my-lora"))
    assert idx.match(prompt_hashes(tokens, BS, MODEL)) == {}
    assert idx.match(prompt_hashes(tokens, BS, MODEL, lora_name="my-lora")) == {"r0": 2} and adapter[1] in idx.replica_block_hashes("r0")


def test_clear_remove_and_slot_reuse() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(2)
    ours = hash_blocks(tokens, BS, ROOT)
    ev = BlockStored(tuple(ours), None, tuple(tokens), BS)
    for rid in ("a", "b", "c"):
        idx.apply(rid, ev)
    idx.apply("b", AllBlocksCleared())
    assert idx.match(ours) == {"a": 2, "c": 2}
    idx.remove_replica("a")
    idx.apply("d", ev)  # takes a's slot
    assert idx.match(ours) == {"c": 2, "d": 2} and sorted(idx.replicas()) == ["b", "c", "d"]
    idx.clear_replica("c")
    assert idx.match(ours) == {"d": 2}
    idx.check_integrity()


def test_per_replica_bound_drops_and_flags() -> None:
    idx = PrefixIndex(BS, MODEL, max_blocks_per_replica=3)
    tokens = toks(5)
    ours = hash_blocks(tokens, BS, ROOT)
    idx.apply("r0", BlockStored(tuple(ours), None, tuple(tokens), BS))
    assert idx.num_blocks("r0") == 3 and idx.stats.over_capacity == 2
    assert idx.pop_resync_reason("r0") == "over_capacity"
    assert idx.match(ours) == {"r0": 3}
    idx.check_integrity()


def test_snapshot_load_accepts_children_before_parents() -> None:
    idx = PrefixIndex(BS, MODEL)
    tokens = toks(4)
    ids, (first, second) = vllm_events(tokens, 2)
    idx.apply("r0", BlockStored((77,), None, tuple(toks(1, 300)), BS))  # replaced by the snapshot
    idx.load_snapshot("r0", [second, first])
    assert idx.replica_block_hashes("r0") == set(prompt_hashes(tokens, BS, MODEL))
    assert idx.pop_resync_reason("r0") is None
    idx.check_integrity()


# --- property: random event streams against a brute-force model ---------------------------------

PREFIXES = [toks(6, 1), toks(6, 1)[:8] + toks(4, 200), toks(6, 500)]


@st.composite
def ops(draw):
    kind = draw(st.sampled_from(["store", "store", "store", "remove", "clear"]))
    replica = draw(st.sampled_from(["a", "b", "c"]))
    if kind == "store":
        chain = draw(st.integers(0, len(PREFIXES) - 1))
        start = draw(st.integers(0, 4))
        n = draw(st.integers(1, 6 - start))
        return ("store", replica, chain, start, n, draw(st.booleans()))
    if kind == "remove":
        return ("remove", replica, draw(st.integers(0, 2)), draw(st.integers(0, 5)))
    return ("clear", replica)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops(), max_size=40))
def test_random_streams_match_a_brute_force_model(stream) -> None:
    """Engine ids are vLLM-like or ours (per op); the model holds replica -> set of our hashes."""
    idx = PrefixIndex(BS, MODEL)
    truth: dict[str, set[int]] = {r: set() for r in "abc"}
    ours = [hash_blocks(p, BS, ROOT) for p in PREFIXES]
    held_ids: dict[str, dict[int, int]] = {r: {} for r in "abc"}  # engine id -> our hash
    for op in stream:
        if op[0] == "store":
            _, r, c, start, n, ident = op
            eid = (lambda i: ours[c][i]) if ident else (lambda i, c=c: vllm_id(c, i))
            parent_known = start == 0 or ours[c][start - 1] in truth[r]
            if not parent_known and not ident:
                continue  # a parent the engine never announced: not a valid stream
            parent = None if start == 0 else (ours[c][start - 1] if ident else next(
                (e for e, o in held_ids[r].items() if o == ours[c][start - 1]), None))
            if start and parent is None:
                continue
            ev = BlockStored(tuple(eid(i) for i in range(start, start + n)), parent,
                             tuple(PREFIXES[c][start * BS : (start + n) * BS]), BS)
            idx.apply(r, ev)
            for i in range(start, start + n):
                held_ids[r][eid(i)] = ours[c][i]
                truth[r].add(ours[c][i])
        elif op[0] == "remove":
            _, r, c, i = op
            victims = [e for e, o in held_ids[r].items() if o == ours[c][i]]
            idx.apply(r, BlockRemoved(tuple(victims)))
            for e in victims:
                del held_ids[r][e]
            truth[r].discard(ours[c][i])
        else:
            idx.apply(op[1], AllBlocksCleared())
            truth[op[1]].clear()
            held_ids[op[1]].clear()
        idx.check_integrity()
        for r in "abc":
            assert idx.replica_block_hashes(r) == truth[r]
        for chain in ours:
            expected = {}
            for r in "abc":
                k = 0
                while k < len(chain) and chain[k] in truth[r]:
                    k += 1
                if k:
                    expected[r] = k
            assert idx.match(chain) == expected


@st.composite
def tier_ops(draw):
    kind = draw(st.sampled_from(["store", "store", "store", "remove", "remove", "clear"]))
    replica = draw(st.sampled_from(["a", "b"]))
    medium = draw(st.sampled_from(["GPU", "CPU", "DISK"]))
    if kind == "store":
        chain = draw(st.integers(0, len(PREFIXES) - 1))
        start = draw(st.integers(0, 4))
        return ("store", replica, medium, chain, start, draw(st.integers(1, 6 - start)))
    if kind == "remove":
        return ("remove", replica, medium, draw(st.integers(0, 2)), draw(st.integers(0, 5)))
    return ("clear", replica)


@settings(max_examples=150, deadline=None)
@given(st.lists(tier_ops(), max_size=40))
def test_random_tiered_streams_match_a_brute_force_model(stream) -> None:
    """Blocks in several media (vLLM names a block by one id, a function of its content, in
    every medium): the device
    prefix is the GPU one, the lower-tier hit the rest of the chain held in any medium."""
    idx = PrefixIndex(BS, MODEL)
    truth: dict[tuple[str, str], set[int]] = {(r, m): set() for r in "ab" for m in ("GPU", "CPU", "DISK")}
    ours = [hash_blocks(p, BS, ROOT) for p in PREFIXES]
    for op in stream:
        if op[0] == "store":
            _, r, medium, c, start, n = op
            held = set().union(*(truth[(r, m)] for m in ("GPU", "CPU", "DISK")))
            if start and ours[c][start - 1] not in held:
                continue  # a parent the engine never announced
            parent = None if start == 0 else vllm_id(ours[c][start - 1])
            idx.apply(r, BlockStored(tuple(vllm_id(ours[c][i]) for i in range(start, start + n)), parent,
                                     tuple(PREFIXES[c][start * BS : (start + n) * BS]), BS, medium=medium))
            truth[(r, medium)].update(ours[c][start : start + n])
        elif op[0] == "remove":
            _, r, medium, c, i = op
            if ours[c][i] in truth[(r, medium)]:
                idx.apply(r, BlockRemoved((vllm_id(ours[c][i]),), medium=medium))
                truth[(r, medium)].discard(ours[c][i])
        else:
            idx.apply(op[1], AllBlocksCleared())
            for m in ("GPU", "CPU", "DISK"):
                truth[(op[1], m)].clear()
        idx.check_integrity()
        for chain in ours:
            device, lower = {}, {}
            for r in "ab":
                anywhere = set().union(*(truth[(r, m)] for m in ("GPU", "CPU", "DISK")))
                d = next((k for k, h in enumerate(chain) if h not in truth[(r, "GPU")]), len(chain))
                a = next((k for k, h in enumerate(chain) if h not in anywhere), len(chain))
                if d:
                    device[r] = d
                if a > d:
                    lower[r] = a - d
            assert idx.match(chain) == device
            assert idx.match_offloaded(chain, device) == lower


def test_more_than_64_replicas(table_kind: str) -> None:
    """Slots 64 and up: the C tables widen their masks in place (no move to dicts), keeping
    every entry, and answer as before."""
    idx = PrefixIndex(BS, MODEL)
    native = table_kind == "native"
    assert idx.native_tables == native
    tokens = toks(4)
    ours = hash_blocks(tokens, BS, ROOT)
    full = BlockStored(tuple(ours), None, tuple(tokens), BS)
    half = BlockStored(tuple(ours[:2]), None, tuple(tokens[: 2 * BS]), BS)
    for i in range(64):
        idx.apply(f"r{i}", full if i % 2 else half)
    other = toks(3, 900)
    idx.apply("r63", BlockStored(tuple(hash_blocks(other, BS, ROOT)), None, tuple(other), BS, medium="CPU"))
    expected = {f"r{i}": 4 if i % 2 else 2 for i in range(64)}
    assert idx.match(ours) == expected
    idx.check_integrity()
    idx.apply("r64", full)  # slot 64
    idx.apply("r69", half)
    assert idx.native_tables == native
    assert idx.match(ours) == expected | {"r64": 4, "r69": 2}
    assert idx.match(prompt_hashes(other, BS, MODEL), medium="CPU") == {"r63": 3}
    idx.check_integrity()
    idx.apply("r64", BlockRemoved((ours[3],)))
    idx.remove_replica("r1")
    assert idx.match(ours) == {r: n for r, n in expected.items() if r != "r1"} | {"r64": 3, "r69": 2}
    idx.check_integrity()
    for i in range(70, 300):  # five mask words
        idx.apply(f"r{i}", half)
    idx.apply("r299", AllBlocksCleared())
    assert idx.match(ours[:2])["r298"] == 2 and "r299" not in idx.match(ours)
    assert len(idx.match(ours)) == 64 - 1 + 2 + 229
    idx.check_integrity()


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(0, MODEL)
    with pytest.raises(ValueError):
        PrefixIndex(BS, MODEL, max_blocks_per_replica=0)


def test_apply_many_equals_applying_each_event() -> None:
    """`apply_many` takes runs of removals in one pass and stores new blocks in bulk (the
    simulator feeds it a replica's events after every step): the index it leaves, ghosts and
    counters included, is the one `apply` leaves block by block (`bulk` off), after every batch
    of events — over evictions from a churning pool, duplicate stores, unknown and repeated
    removals, vLLM-style engine ids (two ids for one block), a lower tier, a clear, and ghost
    FIFOs that overflow or still hold ids removed again."""
    import dataclasses
    import random

    from replica.kv_cache_manager import KVCacheManager

    rng = random.Random(7)
    mgr = KVCacheManager(12, BS, ROOT)
    batches: list[list] = []
    prefixes = [[rng.randrange(1, 1000) for _ in range(2 * BS)] for _ in range(3)]
    for i in range(80):  # shared prefixes (hits, ids removed again while still ghosts), fresh tails
        tokens = rng.choice(prefixes) + [rng.randrange(1, 1000) for _ in range(rng.randrange(0, 6) * BS + 1)]
        hit = mgr.get_computed_blocks(f"q{i}", tokens)
        if mgr.allocate_slots(f"q{i}", tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit):
            mgr.free(f"q{i}")
        else:
            mgr._requests.pop(f"q{i}", None)
        events = mgr.take_events()
        if i % 7 == 3 and events:  # delivered twice, and removals of ids never stored
            events = events + events[:2] + [BlockRemoved((rng.randrange(1 << 60),)) for _ in range(3)]
        batches.append(events)
    salted = tuple(toks(1, 90))  # one block under two engine ids (a vLLM salt), then removed
    batches.append([BlockStored((111,), None, salted, BS), BlockStored((222,), None, salted, BS),
                    BlockRemoved((111,))])
    batches.append([BlockRemoved((222,)), BlockRemoved((222,))])
    stored = next(e for batch in batches for e in batch if isinstance(e, BlockStored))
    batches.append([dataclasses.replace(stored, medium="CPU"), BlockRemoved(stored.block_hashes[:1], medium="GPU"),
                    BlockRemoved(stored.block_hashes[:1], medium="CPU")])
    batches.append([AllBlocksCleared()])
    batches.append([stored, BlockRemoved(stored.block_hashes)])

    probes = [hash_blocks(p + [rng.randrange(1, 1000) for _ in range(4 * BS)], BS, ROOT) for p in prefixes]
    probes.append(hash_blocks(salted, BS, ROOT))
    for capacity in (5, 4096):  # ghosts overflowing, and ids removed again while still ghosts
        one, many = PrefixIndex(BS, MODEL, ghost_capacity=capacity), PrefixIndex(BS, MODEL, ghost_capacity=capacity)
        one.bulk = False  # block by block: the oracle
        check_apply_many(batches, one, many, probes)
    assert one.stats.blocks_removed > 50 and one.stats.unknown_removals > 0 and one.stats.duplicate_stores > 0


def check_apply_many(batches: list[list], one: PrefixIndex, many: PrefixIndex, probes: list[list[int]]) -> None:
    import dataclasses

    for batch in batches:
        for ev in batch:
            one.apply("r0", ev)
        many.apply_many("r0", batch)
        for medium in ("GPU", "CPU"):
            assert many.replica_block_hashes("r0", medium) == one.replica_block_hashes("r0", medium)
        assert dataclasses.asdict(many.stats) == dataclasses.asdict(one.stats)
        a, b = one._replicas["r0"], many._replicas["r0"]
        assert (b.ghosts, list(b.ghost_order), b.num_blocks) == (a.ghosts, list(a.ghost_order), a.num_blocks)
        assert [many.match(p) for p in probes] == [one.match(p) for p in probes]
        many.check_integrity()
