"""Prefill/decode disaggregation in the simulator: the hand-over, its time, the roles kept,
and the scheduler's entry point for a handed-over request."""

from __future__ import annotations

import pytest

from loadgen.traces import TraceRequest
from protocol.hashing import root_hash
from replica.kv_cache_manager import KVCacheManager
from replica.request import Request, SamplingParams
from replica.scheduler import Scheduler, SchedulerConfig, TooLarge
from replica.step_model import get_preset
from simulator.fleet import FleetConfig, FleetSimulation
from simulator.kv_link import KvLink, get_link
from simulator.run import SimulateConfig, sim_requests, simulate
from tests.test_simulator import small_trace

PRESET = get_preset("llama3-8b-h100")


def test_a_disaggregated_fleet_completes_every_request_and_keeps_the_roles():
    reqs = sim_requests(small_trace(60))
    res = FleetSimulation(FleetConfig(4, PRESET, "predictive", prefill_replicas=1, decode_replicas=2)).run(reqs)
    assert all(r.finish is not None and r.output_tokens == q.output_length for r, q in zip(res.records, reqs))
    d = res.extra["disagg"]
    roles = d["roles"]
    assert sorted(roles.values()) == ["both", "decode", "decode", "prefill"]
    assert d["split_requests"] > 0
    for r in res.records:
        assert roles[r.replica] != "prefill"  # nobody decodes on a prefill replica
        if r.prefill_replica:
            assert roles[r.prefill_replica] != "decode" and r.prefill_replica != r.replica
    for url, role in roles.items():
        if role == "decode":  # it computed no prompt token: every request it ran came with its KV
            assert d["prefill_tokens"][url] == 0
        elif role == "prefill":
            assert d["prefill_tokens"][url] > 0


def test_the_hand_over_time_shows_in_ttft_and_not_in_tpot():
    trace = [TraceRequest(arrival_s=10.0 * i, input_length=4000, output_length=6) for i in range(3)]
    slow = KvLink("slow", 1e9, 0.01, efficiency=1.0)

    def run(link):
        cfg = FleetConfig(2, PRESET, "predictive", prefill_replicas=1, decode_replicas=1, kv_link=link)
        return FleetSimulation(cfg).run(sim_requests(trace)).records

    fast, slowed = run(get_link("nvlink4")), run(slow)
    nv = get_link("nvlink4")
    for a, b, q in zip(fast, slowed, trace):
        assert a.prefill_replica and b.prefill_replica  # split: prefill on r0, decode on r1
        expect_slow = 0.01 + 4000 * 131_072 / 1e9  # nothing cached on the idle decode replica
        assert b.transfer_s == pytest.approx(expect_slow)
        assert a.transfer_s == pytest.approx(nv.transfer_s(4000, 131_072))
        assert b.ttft - a.ttft == pytest.approx(expect_slow - a.transfer_s)
        assert b.tpot == pytest.approx(a.tpot)
    # The same requests on 2 unified replicas: no hand-over, sooner first token.
    whole = FleetSimulation(FleetConfig(2, PRESET, "predictive")).run(sim_requests(trace)).records
    assert all(w.ttft < b.ttft for w, b in zip(whole, slowed))


def test_hand_overs_wait_for_decode_memory_and_all_finish():
    # 2 decode replicas of 600 blocks (9600 tokens) for 1500-token prompts arriving at once:
    # hand-overs queue until decodes free their blocks; nothing is lost.
    trace = [TraceRequest(arrival_s=0.001 * i, input_length=1500, output_length=40) for i in range(24)]
    cfg = FleetConfig(3, PRESET, "predictive", prefill_replicas=1, decode_replicas=2, kv_blocks=600)
    res = FleetSimulation(cfg).run(sim_requests(trace))
    assert all(r.finish is not None and r.output_tokens == 40 for r in res.records)
    assert res.extra["disagg"]["split_requests"] == 24


def test_fleet_roles_are_validated():
    with pytest.raises(ValueError, match="exceed"):
        FleetConfig(4, PRESET, "predictive", prefill_replicas=3, decode_replicas=2)
    with pytest.raises(ValueError, match="can prefill and replicas that can decode"):
        FleetConfig(2, PRESET, "predictive", decode_replicas=2)
    with pytest.raises(ValueError, match="unknown kv link"):
        get_link("carrier-pigeon")


def test_simulate_reports_the_disaggregated_run():
    cfg = SimulateConfig(replicas=3, preset=PRESET, policies=("predictive",), load=0.7, prefill_replicas=1,
                         decode_replicas=2)
    out = simulate(small_trace(), cfg)
    s = out["policies"][0]
    assert s["completed"] == 60 and s["p99_tpot_s"] >= s["mean_tpot_s"] > 0
    assert s["disagg"]["split_requests"] == 60 and out["config"]["kv_link"] == "ib-ndr"


def _scheduler(blocks=8, seqs=4):
    kv = KVCacheManager(blocks, 4, root_hash("m"))
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=64), kv, clock=lambda: 0.0), kv


def _handed(rid, prompt, first=7):
    req = Request(rid, prompt, SamplingParams(max_tokens=3, ignore_eos=True), 0.0)
    req.token_ids.append(first)
    return req


def test_scheduler_add_prefilled_decodes_without_a_prefill_chunk_and_reuses_the_cache():
    sched, kv = _scheduler()
    assert sched.add_prefilled(_handed("a", list(range(10))))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens, s.sample) for s in out.scheduled] == [("a", 1, True)]
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (0, 1)
    # The handed-over prompt's full blocks are cached here now: a second hand-over of the same
    # prompt takes them instead of new ones.
    b = _handed("b", list(range(10)))
    free = kv.num_free_blocks
    assert sched.add_prefilled(b) and b.num_cached_tokens == 8
    assert free - kv.num_free_blocks == 1  # only the partial block is new
    kv.check_integrity()


def test_scheduler_add_prefilled_refuses_without_room_and_changes_nothing():
    sched, kv = _scheduler(blocks=4, seqs=1)
    assert sched.add_prefilled(_handed("a", list(range(6))))
    assert not sched.add_prefilled(_handed("b", list(range(50, 54))))  # no running slot
    sched2, kv2 = _scheduler(blocks=5, seqs=4)
    assert sched2.add_prefilled(_handed("x", list(range(100, 110))))  # holds 3 of the 5 blocks
    assert not sched2.add_prefilled(_handed("c", list(range(12))))  # needs 4 blocks: 2 are free now
    assert kv2.num_free_blocks == 2 and list(sched2.requests) == ["x"]
    kv2.check_integrity()
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_prefilled(_handed("a", [1, 2]))


def test_scheduler_add_prefilled_refuses_a_request_larger_than_the_whole_cache_for_good():
    # Before, False ("no room now"): a caller retrying after each step waited forever.
    sched, kv = _scheduler(blocks=2, seqs=4)
    with pytest.raises(TooLarge, match="need 4 KV blocks, but this replica's cache has only 2"):
        sched.add_prefilled(_handed("c", list(range(12))))
    assert kv.num_free_blocks == 2 and not sched.has_unfinished()
    kv.check_integrity()


def test_a_hand_over_too_large_for_the_decode_replica_ends_rejected_instead_of_waiting_forever():
    # 1599 prompt tokens + 1: 100 blocks of 16, all the arrival check allows; the decode side
    # holds the prompt and the prefill's first token, one block more than the cache.
    trace = [TraceRequest(arrival_s=0.0, input_length=1599, output_length=8),
             TraceRequest(arrival_s=1.0, input_length=800, output_length=8)]
    cfg = FleetConfig(2, PRESET, "predictive", prefill_replicas=1, decode_replicas=1, kv_blocks=100)
    res = FleetSimulation(cfg).run(sim_requests(trace))
    big, small = res.records
    assert big.rejected and big.finish is None and big.prefill_replica
    assert not small.rejected and small.output_tokens == 8
    assert res.extra["disagg"]["split_requests"] == 2
