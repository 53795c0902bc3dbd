"""KV offload tiers (replica/kv_offload.py) under the KV cache manager, on tiny pools (block_size 4):
exact events, copies and slots for spill, load, LRU eviction, cascade to disk and pins; then a
hypothesis state machine that moves fake block contents by the queued copies and checks that
every cached block, in every medium, holds exactly the KV its hash names."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol.events import AllBlocksCleared, BlockRemoved, BlockStored
from protocol.hashing import hash_blocks, root_hash
from replica.config import EngineConfig
from replica.kv_cache_manager import KVCacheManager
from replica.kv_offload import TierSpec, Transfer, tier_specs

BS = 4
ROOT = root_hash("tiny-model")


def make(num_blocks: int = 4, host: int = 4, disk: int = 0) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, ROOT, tiers=tier_specs(host, disk))


def admit(mgr: KVCacheManager, req: str, tokens: list[int]):
    hit = mgr.get_computed_blocks(req, tokens)
    assert mgr.allocate_slots(req, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
    return hit


def chain(tokens: list[int]) -> list[int]:
    return hash_blocks(tokens, BS, ROOT)


A = list(range(9))  # 2 full blocks + 1 token
B = list(range(100, 113))  # 3 full blocks + 1 token


def test_spill_on_eviction_then_load_back_events_and_copies() -> None:
    mgr = make(4, host=4)
    ha, hb = chain(A), chain(B)
    admit(mgr, "a", A)  # blocks 0, 1, 2
    mgr.free("a")
    mgr.take_events()
    assert mgr.take_transfers() == []

    admit(mgr, "b", B)  # pops 3, 2, 1, 0: evicts a's blocks 1 (h1) and 0 (h0), each spilled first
    events = mgr.take_events()
    assert events[:4] == [
        BlockStored((ha[1],), ha[0], tuple(A[4:8]), BS, medium="CPU"),
        BlockRemoved((ha[1],), medium="GPU"),
        BlockStored((ha[0],), None, tuple(A[0:4]), BS, medium="CPU"),
        BlockRemoved((ha[0],), medium="GPU"),
    ]
    assert events[4] == BlockStored(tuple(hb), None, tuple(B[:12]), BS)  # b's own, on the device
    assert mgr.take_transfers() == [Transfer("GPU", 1, "CPU", 0), Transfer("GPU", 0, "CPU", 1)]
    mgr.free("b")  # b held [3, 2, 1, 0]: freed tail first, so the LRU head is 0, 1, 2, 3

    hit = mgr.get_computed_blocks("a2", A)
    assert hit.blocks == [] and hit.num_tokens == 8 and hit.num_tier_tokens == 8
    assert [(b.medium, b.slot, b.block_hash) for b in hit.tier_blocks] == [("CPU", 1, ha[0]), ("CPU", 0, ha[1])]
    assert mgr.allocate_slots("a2", A, 8, 1, hit)
    # New blocks 0 (b's partial), 1 (hb[2]) and 2 (hb[1]): b's two spill into free host slots
    # first, then a's prefix is loaded into blocks 0 and 1, which now carry its hashes.
    assert mgr.take_transfers() == [Transfer("GPU", 1, "CPU", 2), Transfer("GPU", 2, "CPU", 3),
                                    Transfer("CPU", 1, "GPU", 0), Transfer("CPU", 0, "GPU", 1)]
    assert mgr.block_ids("a2") == [0, 1, 2]
    events = mgr.take_events()
    assert events[-1] == BlockStored(tuple(ha), None, tuple(A[:8]), BS, medium="GPU")
    host = mgr.offload.tier("CPU")
    assert host.stats.stored_blocks == 4 and host.stats.loaded_blocks == 2 and host.stats.evicted_blocks == 0
    mgr.check_integrity()


def test_host_lru_eviction_cascades_to_disk_and_drops_below_it() -> None:
    mgr = make(4, host=1, disk=1)
    admit(mgr, "a", A)
    mgr.free("a")
    mgr.take_events()
    ha = chain(A)
    admit(mgr, "b", B)  # spills h1 into the host tier, then h0: h1 goes down to the disk tier
    events = [e for e in mgr.take_events() if getattr(e, "medium", "GPU") != "GPU"]
    assert events == [
        BlockStored((ha[1],), ha[0], tuple(A[4:8]), BS, medium="CPU"),
        BlockStored((ha[1],), ha[0], tuple(A[4:8]), BS, medium="STORAGE"),
        BlockRemoved((ha[1],), medium="CPU"),
        BlockStored((ha[0],), None, tuple(A[0:4]), BS, medium="CPU"),
    ]
    assert mgr.take_transfers() == [Transfer("GPU", 1, "CPU", 0), Transfer("CPU", 0, "STORAGE", 0),
                                    Transfer("GPU", 0, "CPU", 0)]
    mgr.free("b")
    hit = mgr.get_computed_blocks("a2", A)  # h0 from the host, h1 from the disk
    assert [(b.medium, b.slot) for b in hit.tier_blocks] == [("CPU", 0), ("STORAGE", 0)]
    assert mgr.allocate_slots("a2", A, 8, 1, hit)
    # The host tier's one slot holds a's h0, pinned for its load: b's two evicted blocks cannot
    # spill (refused, counted), and nothing but the loads is copied.
    assert mgr.take_transfers() == [Transfer("CPU", 0, "GPU", 0), Transfer("STORAGE", 0, "GPU", 1)]
    assert mgr.offload.tier("CPU").stats.skipped_stores == 2
    mgr.check_integrity()


def spill_a(mgr: KVCacheManager) -> KVCacheManager:
    """Run A, then B, which evicts A's two full blocks into the host tier; drain events and copies."""
    admit(mgr, "a", A)
    mgr.free("a")
    admit(mgr, "b", B)
    mgr.free("b")
    mgr.take_events()
    mgr.take_transfers()
    return mgr


def test_pinned_blocks_are_not_evicted_by_the_allocation_that_loads_them() -> None:
    mgr = spill_a(make(4, host=2))  # a's two blocks fill the host tier
    hit = mgr.get_computed_blocks("a2", A)
    assert len(hit.tier_blocks) == 2
    assert mgr.allocate_slots("a2", A, 8, 1, hit)  # evicts two of b's blocks: the full, pinned tier refuses them
    assert mgr.take_transfers() == [Transfer("CPU", 1, "GPU", 0), Transfer("CPU", 0, "GPU", 1)]
    assert mgr.offload.tier("CPU").stats.skipped_stores == 2
    assert all(b.pins == 0 for b in mgr.offload.tier("CPU").held())
    mgr.check_integrity()


def test_already_held_block_is_touched_not_copied_again() -> None:
    mgr = spill_a(make(4, host=4))
    admit(mgr, "a2", A)  # loaded back into device blocks 0 and 1; the host keeps its copy
    mgr.free("a2")
    mgr.take_events()
    mgr.take_transfers()
    host = mgr.offload.tier("CPU")
    before = host.stats.stored_blocks
    admit(mgr, "c", list(range(200, 216)))  # 4 blocks: evicts every block on the device
    assert not any(t.src in (0, 1) for t in mgr.take_transfers())  # a's blocks are not copied twice
    stored = {h for e in mgr.take_events() if isinstance(e, BlockStored) and e.medium == "CPU" for h in e.block_hashes}
    assert not stored & set(chain(A)) and host.stats.stored_blocks == before + len(stored)
    assert [b.block_hash for b in host.held()][-2:] == chain(A)[::-1]  # touched: most recently used
    mgr.check_integrity()


def test_reset_clears_tiers_and_snapshot_lists_them() -> None:
    mgr = spill_a(make(4, host=4))
    snap = mgr.snapshot_events()
    host = [e for e in snap if e.medium == "CPU"]
    assert {e.block_hashes[0] for e in host} == set(chain(A))
    assert all(len(e.token_ids) == BS for e in host)
    assert mgr.reset_prefix_cache()
    assert mgr.take_events() == [AllBlocksCleared()]
    assert len(mgr.offload.tier("CPU")) == 0 and mgr.take_transfers() == []
    assert mgr.get_computed_blocks("a3", A).num_tokens == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="host tier above it"):
        tier_specs(0, 8)
    with pytest.raises(ValueError, match=">= 0"):
        tier_specs(-1, 0)
    with pytest.raises(ValueError, match="medium"):
        TierSpec("NVMe", 4)
    with pytest.raises(ValueError, match="host tier above it"):
        EngineConfig(disk_kv_blocks=8)
    assert EngineConfig(host_kv_blocks=8, disk_kv_blocks=4).kv_tiers == (TierSpec("CPU", 8), TierSpec("STORAGE", 4))
    # Without prefix caching nothing is cached, so nothing is offloaded.
    assert KVCacheManager(4, BS, ROOT, enable_caching=False, tiers=tier_specs(4, 0)).offload is None


def test_replica_flags_map_to_the_config_and_back_and_bad_ones_say_what_to_do(tmp_path) -> None:
    import argparse

    from kvfleet import cmd_replica

    p = argparse.ArgumentParser()
    cmd_replica.add_arguments(p)
    flags = ["--kv-offload-host-blocks", "64", "--kv-offload-disk-blocks", "32", "--kv-offload-disk-path",
             str(tmp_path / "kv.bin")]
    engine = cmd_replica.replica_config(p.parse_args(flags)).engine
    assert (engine.host_kv_blocks, engine.disk_kv_blocks, engine.disk_kv_path) == (64, 32, str(tmp_path / "kv.bin"))
    assert cmd_replica.engine_flags(engine)[-6:] == flags
    for bad, message in ((["--kv-offload-disk-blocks", "8"], "needs a host tier above it"),
                         (["--kv-offload-host-blocks", "8", "--kv-offload-disk-blocks", "8"], "--kv-offload-disk-path"),
                         (["--kv-offload-host-blocks", "8", "--kv-offload-disk-blocks", "8",
                           "--kv-offload-disk-path", str(tmp_path / "nowhere" / "kv.bin")], "does not exist"),
                         (["--kv-offload-host-blocks", "-1"], ">= 0 blocks")):
        with pytest.raises(ValueError, match=message):
            cmd_replica.replica_config(p.parse_args(bad))
    # A sim replica models the disk tier without a file.
    sim = cmd_replica.replica_config(p.parse_args(["--engine", "sim", "--kv-offload-host-blocks", "8",
                                                   "--kv-offload-disk-blocks", "8"]))
    assert sim.engine.kv_tiers == (TierSpec("CPU", 8), TierSpec("STORAGE", 8))


# --- property test: contents follow the copies ------------------------------------------------

PREFIXES = [(), (5, 5, 5, 5), (5, 5, 5, 5, 6, 6, 6, 6), (7,) * 9, (8,) * 13]


class OffloadMachine(RuleBasedStateMachine):
    """Admissions, decode, frees and resets on a small pool with tiers.

    Contents: `store[medium][index]` is the hash of the KV a device block or tier slot holds. Every
    step applies the queued copies in order, then the "forward pass" writes the new positions. The
    invariants: every cached device block and every tier block holds its own hash; the event
    stream replayed per medium gives exactly the hashes each medium holds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mgr: KVCacheManager | None = None
        self.tokens: dict[str, list[int]] = {}
        self.next_id = 0
        self.store: dict[str, dict[int, object]] = {"GPU": {}, "CPU": {}, "STORAGE": {}}
        self.replayed: dict[str, set[int]] = {"GPU": set(), "CPU": set(), "STORAGE": set()}

    @precondition(lambda self: self.mgr is None)
    @rule(num_blocks=st.integers(4, 10), host=st.integers(1, 6), disk=st.sampled_from([0, 0, 3]))
    def init(self, num_blocks: int, host: int, disk: int) -> None:
        self.mgr = make(num_blocks, host, disk)

    def apply(self, req: str, computed: int) -> None:
        mgr = self.mgr
        for t in mgr.take_transfers():
            self.store[t.dst_medium][t.dst] = self.store[t.src_medium].get(t.src)
        tokens, ids, hashes = self.tokens[req], mgr.block_ids(req), mgr.block_hashes(req)
        for p in range(computed // BS, len(ids)):  # the forward pass writes these positions
            full = (p + 1) * BS <= len(tokens)
            self.store["GPU"][ids[p]] = hashes[p] if full else ("partial", req)
        for ev in mgr.take_events():
            if isinstance(ev, AllBlocksCleared):
                for s in self.replayed.values():
                    s.clear()
                continue
            medium = self.replayed[ev.medium]
            for h in ev.block_hashes:
                if isinstance(ev, BlockStored):
                    assert h not in medium
                    medium.add(h)
                else:
                    medium.remove(h)

    @precondition(lambda self: self.mgr is not None and len(self.tokens) < 3)
    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), max_size=6))
    def add(self, prefix: tuple[int, ...], tail: list[int]) -> None:
        tokens = list(prefix) + tail
        if len(tokens) < 2:
            return
        req = f"r{self.next_id}"
        self.next_id += 1
        hit = self.mgr.get_computed_blocks(req, tokens)
        if self.mgr.allocate_slots(req, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit):
            self.tokens[req] = tokens
            self.apply(req, hit.num_tokens)
            for i, b in enumerate(list(hit.blocks)):  # a device hit holds the prompt's own prefix
                assert self.store["GPU"][b.block_id] == self.mgr.block_hashes(req)[i]
        else:
            self.mgr.free(req)  # forget its lookup state

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def decode(self, data) -> None:
        req = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[req]
        tokens.append(data.draw(st.integers(0, 3)))
        if self.mgr.allocate_slots(req, tokens, len(tokens) - 1, 1):
            self.apply(req, len(tokens) - 1)
        else:
            tokens.pop()
            self.finish(req)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish_one(self, data) -> None:
        self.finish(data.draw(st.sampled_from(sorted(self.tokens))))

    def finish(self, req: str) -> None:
        self.mgr.free(req)
        del self.tokens[req]

    @precondition(lambda self: self.mgr is not None and not self.tokens)
    @rule()
    def reset(self) -> None:
        assert self.mgr.reset_prefix_cache()
        for ev in self.mgr.take_events():
            assert ev == AllBlocksCleared()
        for s in self.replayed.values():
            s.clear()

    @invariant()
    def contents_follow_hashes(self) -> None:
        mgr = self.mgr
        if mgr is None:
            return
        mgr.check_integrity()
        for h, block in mgr.pool.cached_blocks().items():
            assert self.store["GPU"].get(block.block_id) == h, f"device block {block.block_id} holds other KV"
        held = {"GPU": set(mgr.pool.cached_blocks())}
        for tier in mgr.offload.tiers:
            held[tier.medium] = set()
            for b in tier.held():
                assert self.store[tier.medium].get(b.slot) == b.block_hash, f"{tier.medium} slot {b.slot} holds other KV"
                held[tier.medium].add(b.block_hash)
        for medium, hashes in held.items():
            assert self.replayed[medium] == hashes, f"{medium} events disagree with the tier"


TestOffloadMachine = OffloadMachine.TestCase
TestOffloadMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
