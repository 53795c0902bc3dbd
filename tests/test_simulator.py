"""The simulator: step-time model, bounds, determinism, and the offline fleet."""

from __future__ import annotations

import pytest

from loadgen.traces import TraceRequest
from replica.step_model import PRESETS, StepFeatures, StepTimeModel, get_preset
from simulator.bounds import infinite_cache_hits
from simulator.run import SimulateConfig, simulate


def test_step_model_fit_recovers_known_coefficients():
    truth = StepTimeModel(0.004, 1e-4, 2e-8, 0.0, 5e-7, 3e-4)
    rows = [StepFeatures(n, n * (c + n / 2), c, d, s) for n, c, d, s in
            [(1, 0, 100, 1), (512, 0, 0, 1), (512, 512, 0, 1), (32, 0, 4000, 32), (300, 100, 2000, 9),
             (8, 0, 900, 8), (1024, 2048, 0, 1), (64, 0, 12000, 64), (128, 256, 500, 5)]]
    fitted = StepTimeModel.fit(rows, [truth.duration(r) for r in rows])
    for r in rows:
        assert fitted.duration(r) == pytest.approx(truth.duration(r), rel=1e-6)
    assert all(c >= 0 for c in fitted.coefficients())


def test_presets_are_sane():
    for name, p in PRESETS.items():
        m = p.model
        assert m.prefill_time(1000) > m.prefill_time(100) > 0, name
        # a decode step of 32 sequences is far cheaper than prefilling 2k tokens
        assert m.decode_step_time(32, 1000) < m.prefill_time(2048), name
    with pytest.raises(ValueError, match="unknown sim preset"):
        get_preset("nope")


def test_infinite_cache_hits():
    chains = [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3, 6], [2, 3]]
    assert infinite_cache_hits(chains, 16) == [0, 32, 0, 48, 32]


def small_trace(n: int = 60) -> list[TraceRequest]:
    # Four tenants sharing a 6-block system prompt (hash blocks of 64 tokens), then unique blocks.
    out = []
    for i in range(n):
        tenant = i % 4
        hashes = tuple(range(100 * tenant, 100 * tenant + 6)) + (10_000 + 2 * i, 10_001 + 2 * i)
        out.append(TraceRequest(arrival_s=0.05 * i, input_length=len(hashes) * 64 - 10, output_length=8 + i % 5,
                                hash_ids=hashes, hash_block_tokens=64, tenant=f"t{tenant}"))
    return out


def run_small(policies=("round_robin", "precise_prefix"), seed=0):
    cfg = SimulateConfig(replicas=3, preset=get_preset("llama3-8b-h100"), policies=policies, load=0.7, seed=seed)
    return simulate(small_trace(), cfg)


def test_same_seed_identical_results():
    a, b = run_small(seed=3), run_small(seed=3)
    for pa, pb in zip(a["policies"], b["policies"]):
        pa, pb = dict(pa), dict(pb)
        pa.pop("wall_s"), pb.pop("wall_s")
        assert pa == pb
    ra, rb = a["_results"]["precise_prefix"].records, b["_results"]["precise_prefix"].records
    assert [(r.replica, r.first_token, r.finish) for r in ra] == [(r.replica, r.first_token, r.finish) for r in rb]


def test_cache_aware_policy_hits_more_and_bounds_hold():
    out = run_small()
    by = {p["policy"]: p for p in out["policies"]}
    assert by["precise_prefix"]["cache_hit_rate"] > by["round_robin"]["cache_hit_rate"]
    bound = out["bounds"]
    assert 0 < bound["pooled_cache_hit_rate"] <= bound["infinite_cache_hit_rate"]
    for p in out["policies"]:
        assert p["completed"] == 60
        assert p["cache_hit_rate"] <= bound["infinite_cache_hit_rate"] + 1e-9
        assert p["mean_ttft_s"] >= bound["ideal_mean_ttft_s"] - 1e-9


def test_memoised_prompts_change_nothing():
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    runs = []
    for memoize in (True, False):
        reqs = sim_requests(small_trace(), seed=1, memoize=memoize)
        assert (reqs[0].prompt is not None) == memoize
        res = FleetSimulation(FleetConfig(3, preset, "sglang_cache_aware")).run(reqs)
        runs.append([(r.replica, r.cached_tokens, r.first_token, r.finish) for r in res.records])
    assert runs[0] == runs[1]


def test_request_and_response_latency_add_to_each_request_on_an_idle_fleet():
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=10.0 * i, input_length=500, output_length=4) for i in range(3)]
    base = FleetSimulation(FleetConfig(2, preset, "round_robin")).run(sim_requests(trace))
    slow = FleetSimulation(FleetConfig(2, preset, "round_robin", request_latency_s=0.02,
                                       response_latency_s=0.005)).run(sim_requests(trace))
    for a, b in zip(base.records, slow.records):
        assert b.ttft == pytest.approx(a.ttft + 0.025)
        assert b.e2e == pytest.approx(a.e2e + 0.025)
        assert b.tpot == pytest.approx(a.tpot)


def test_prompts_longer_than_max_model_len_are_rejected_like_a_live_replica():
    trace = [TraceRequest(arrival_s=float(i), input_length=n, output_length=4) for i, n in enumerate((100, 5000, 200))]
    cfg = SimulateConfig(replicas=2, preset=get_preset("llama3-8b-h100"), policies=("round_robin",),
                         max_model_len=4096)
    s = simulate(trace, cfg)["policies"][0]
    assert (s["completed"], s["rejected"]) == (2, 1)


class _FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _out(*arrivals: float):
    from types import SimpleNamespace

    return SimpleNamespace(scheduled=[SimpleNamespace(request=SimpleNamespace(arrival_time=a)) for a in arrivals])


def test_pacer_keeps_a_busy_replica_on_its_modelled_timeline():
    from replica.sim_executor import Pacer

    ft = _FakeTime()
    pacer = Pacer(time_scale=2.0, max_lag_s=0.1, clock=ft.clock, sleep=ft.sleep)
    pacer(0.1, _out(100.0))  # 0.1 s modelled at 2x: ends at 100.05
    assert ft.t == pytest.approx(100.05)
    ft.t += 0.01  # the process's own work between steps (10 ms) ...
    pacer(0.1, _out(100.0))
    assert ft.t == pytest.approx(100.10)  # ... comes out of the next step, not on top of it
    ft.t += 0.08  # a late wake-up longer than the step: no sleep, caught up on the next ones
    pacer(0.1, _out(100.0))
    assert ft.t == pytest.approx(100.18) and pacer.lag_s == pytest.approx(0.03)
    pacer(0.1, _out(100.0))
    assert ft.t == pytest.approx(100.20) and pacer.late_steps == 1
    ft.t = 105.0  # idle; a request entered the engine at 104.99
    pacer(0.1, _out(104.99))
    assert ft.t == pytest.approx(105.04)
    ft.t = 106.0  # stalled 1 s with work (a stopped process): restart from now, no burst
    pacer(0.1, _out(100.0))
    assert ft.t == pytest.approx(106.05) and pacer.restarts == 1


def test_client_max_tokens_reaches_the_router_like_loadgens_live_requests():
    # Live, loadgen sends max_tokens = the trace's output length (with ignore_eos), and the
    # router caps its output-length predictions at it; with `client_max_tokens` the simulated
    # router sees the same, without it none (traces record no max_tokens).
    from predictors.adapter import balancer_predictor
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=1.0 * i, input_length=300, output_length=3 + i, hash_ids=(i,),
                          hash_block_tokens=512) for i in range(6)]
    seen = {}
    for flag in (False, True):
        fleet = FleetSimulation(FleetConfig(2, preset, "predictive", client_max_tokens=flag),
                                predictor=balancer_predictor("ensemble", "sim"))
        select, got = fleet.policy.select, []

        def spy(request, replicas, select=select, got=got):
            got.append((request.max_tokens, request.predicted_output_tokens))
            return select(request, replicas)

        fleet.policy.select = spy
        res = fleet.run(sim_requests(trace))
        assert [r.output_tokens for r in res.records] == [t.output_length for t in trace]
        seen[flag] = got
    assert all(m is None for m, _ in seen[False])
    assert any(p > t.output_length for (_, p), t in zip(seen[False], trace))  # uncapped predictions
    assert [m for m, _ in seen[True]] == [t.output_length for t in trace]
    assert all(p <= t.output_length for (_, p), t in zip(seen[True], trace))
    out = simulate(trace, SimulateConfig(replicas=2, preset=preset, policies=("predictive",), client_max_tokens=True))
    assert out["config"]["client_max_tokens"] is True


def test_load_reports_reach_the_registry_at_a_live_replicas_cadence():
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=0.05 * i, input_length=2000, output_length=60) for i in range(40)]
    for interval in (0.0, 0.1):
        fleet = FleetSimulation(FleetConfig(2, preset, "least_request", load_report_interval_s=interval))
        reports: dict[str, list[tuple[float, int, int]]] = {}
        on_load = fleet.registry.on_load
        observed: dict[str, int] = {}
        observe = fleet.policy.observe_steps

        def record(url, load, age_s=0.0, on_load=on_load, reports=reports, fleet=fleet):
            reports.setdefault(url, []).append((fleet.now, load.num_running, load.num_waiting))
            on_load(url, load, age_s)

        def count(url, steps, observed=observed, observe=observe):
            observed[url] = observed.get(url, 0) + len(steps)
            observe(url, steps)

        fleet.registry.on_load, fleet.policy.observe_steps = record, count
        res = fleet.run(sim_requests(trace))
        assert all(r.first_token is not None for r in res.records)
        for url, rs in reports.items():
            times = [t for t, _, _ in rs]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert min(gaps) >= interval - 1e-9
            assert rs[-1][1:] == (0, 0)  # the last report, made once idle, says so
        if interval == 0.0:
            assert sum(len(rs) for rs in reports.values()) == res.steps  # one per step
            assert sum(observed.values()) == res.steps
        else:
            assert sum(len(rs) for rs in reports.values()) < res.steps / 2
            # Each report carries the steps made since the last one (up to 16), none twice.
            assert res.steps * 0.5 < sum(observed.values()) <= res.steps


def test_digest_mode_sees_the_cache_only_as_of_each_replicas_last_digest():
    """With index_source digests the policies see a replica's cache through the digest it took
    last (every digest_interval_s): a prefix repeated before the next digest is a miss to the
    router, one repeated after it a hit; the exact index is never fed."""
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    hashes = tuple(range(8))  # one 512-token prompt, three times
    trace = [TraceRequest(arrival_s=t, input_length=8 * 64, output_length=2, hash_ids=hashes, hash_block_tokens=64)
             for t in (0.0, 0.3, 3.0)]
    seen = {}
    for source in ("events", "digests"):
        fleet = FleetSimulation(FleetConfig(2, preset, "precise_prefix", kv_blocks=2000, index_source=source,
                                            digest_interval_s=1.0))
        res = fleet.run(sim_requests(trace))
        seen[source] = [r.predicted_cached_tokens for r in res.records]
        if source == "digests":
            assert fleet.index.num_entries() == 0 and fleet.digests.stats.received >= 4
    assert seen["events"][0] == 0 and seen["events"][1] > 0 and seen["events"][2] > 0
    assert seen["digests"][:2] == [0, 0] and seen["digests"][2] == seen["events"][2]
    with pytest.raises(ValueError, match="index_source"):
        FleetConfig(2, preset, "precise_prefix", index_source="both")


def test_several_balancers_fed_the_same_events_agree_when_nothing_is_in_flight():
    """Issue #18 part 3: N uncoordinated instances, each with its own index, registry and policy,
    all fed the same KV events and load reports. With requests far apart nothing is in flight at
    any instance, so every instance decides alike (agreement 1.0) and all indexes hold the same."""
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=10.0 * i, input_length=8 * 64, output_length=2,
                          hash_ids=tuple(range(i % 3, i % 3 + 8)), hash_block_tokens=64) for i in range(8)]
    one = FleetSimulation(FleetConfig(3, preset, "precise_prefix")).run(sim_requests(trace))
    fleet = FleetSimulation(FleetConfig(3, preset, "precise_prefix", balancers=3))
    res = fleet.run(sim_requests(trace))
    assert res.extra == {"balancers": 3, "agreement": 1.0}
    assert [r.replica for r in res.records] == [r.replica for r in one.records]
    entries = {inst[1].num_entries() for inst in fleet.instances}
    assert len(entries) == 1 and entries.pop() > 0
    with pytest.raises(ValueError, match="balancers"):
        FleetConfig(2, preset, "precise_prefix", balancers=0)


def test_several_balancers_diverge_on_in_flight_bookkeeping():
    """What no shared event carries: each instance counts only its own sends. A burst at one
    moment, spread round robin over two instances, makes least_request's in-flight counts
    differ between them, so some decisions disagree."""
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=0.0, input_length=256, output_length=8) for _ in range(8)]
    one = FleetSimulation(FleetConfig(2, preset, "least_request")).run(sim_requests(trace))
    assert "agreement" not in one.extra
    res = FleetSimulation(FleetConfig(2, preset, "least_request", balancers=2)).run(sim_requests(trace))
    assert res.extra["agreement"] < 1.0


def test_simulate_reports_the_instances_agreement():
    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=0.0, input_length=256, output_length=8) for _ in range(8)]
    out = simulate(trace, SimulateConfig(2, preset, ("least_request",), balancers=2))
    s = out["policies"][0]
    assert s["balancers"] == 2 and 0.0 <= s["agreement"] < 1.0
    assert "agreement" not in simulate(trace, SimulateConfig(2, preset, ("least_request",)))["policies"][0]


def test_a_host_tier_holds_what_the_device_evicts_and_the_balancer_learns_its_load_time():
    """A prompt pushed out of a 40-block device pool by another spills to the host tier: the index
    sees its blocks under medium CPU, the router hands the lower-tier hit to the policy, the
    replica loads it back (the step says how many tokens), and predictive's θload is fitted from
    those steps, replacing its prior."""
    from balancer.step_learner import LOAD_PRIOR
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    a, b = tuple(range(8)), tuple(range(100, 108))  # two 512-token prompts (32 blocks each)
    trace = [TraceRequest(arrival_s=t, input_length=8 * 64, output_length=2, hash_ids=h, hash_block_tokens=64)
             for t, h in ((0.0, a), (1.0, b), (2.0, a))]
    fleet = FleetSimulation(FleetConfig(1, preset, "predictive", kv_blocks=40, host_kv_blocks=200))
    seen = []
    choose = fleet.router.choose
    fleet.router.choose = lambda *args, **kw: seen.append(choose(*args, **kw)) or seen[-1]
    res = fleet.run(sim_requests(trace))
    (url,) = res.replica_ids
    rr = seen[2][0]
    device, lower = rr.matched_blocks.get(url, 0), rr.offloaded_blocks.get(url, 0)
    assert lower > 0 and device + lower == 32  # the whole prompt, in two tiers
    # The replica reuses all but the last block (its last token is always computed): the device
    # part and the rest loaded from host memory, not recomputed.
    assert res.records[2].cached_tokens == 31 * 16
    rep = fleet.replicas["r0"]
    assert sum(s.loaded_tokens for s in rep.engine.steps) == (31 - device) * 16
    assert fleet.index.num_entries("CPU") > 0
    assert fleet.policy.learner.load_cost(url) != LOAD_PRIOR
    with pytest.raises(ValueError, match="host tier"):
        FleetConfig(1, preset, "predictive", disk_kv_blocks=10)
    with pytest.raises(ValueError, match="host link"):
        FleetConfig(1, preset, "predictive", host_kv_blocks=10, host_link="pcie9")


def test_every_balancer_instance_routes_by_session_key():
    """With several instances each request's session key reaches the instance that routes it,
    and the summary counts every instance's session decisions, not the first one's."""
    from balancer.sessions import SessionConfig
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    trace = [TraceRequest(arrival_s=0.1 * i, input_length=256, output_length=8, session_id=f"s{i % 2}")
             for i in range(8)]
    res = FleetSimulation(FleetConfig(2, preset, "least_request", balancers=2,
                                      sessions=SessionConfig(enabled=True))).run(sim_requests(trace))
    assert sum(res.extra["sessions"].values()) == len(trace)


def test_replicate_sends_warm_ups_that_no_client_sees():
    # A hot shared prompt on 8 replicas at load 0.9 (generated, not a development trace): with
    # `replicate` predictive sends prefill-only warm-ups instead of moving requests off the
    # cache; they run on the engines (more prompt tokens computed) but are no client's request.
    from loadgen.generate import GenerateConfig, generate

    trace = generate(GenerateConfig(kind="hot", num_requests=300, session_rate=1.0, tenants=8, seed=11))
    base = dict(replicas=8, preset=get_preset("llama3-8b-h100"), load=0.9, seed=11, kv_blocks=7500)
    off = simulate(trace, SimulateConfig(policies=("predictive",), **base,
                                         policy_options=(("predictive", (("replicate", False),)),)))
    on = simulate(trace, SimulateConfig(policies=("predictive",), **base))  # the default since 2026-12-08
    p_off, p_on = off["policies"][0], on["policies"][0]
    assert "warmups" not in p_off and p_on["warmups"] > 0
    assert p_on["completed"] == p_off["completed"] == len(on["_results"]["predictive"].records) == 300
    assert all(r.index >= 0 for r in on["_results"]["predictive"].records)


def test_a_request_that_arrives_mid_step_is_in_the_report_made_when_that_step_ends():
    """A live replica reports after each step, counting the requests that arrived during it
    (waiting in its inbox) with their prompts as queued prefill. The simulated replica must too:
    a report that missed them let the balancer drop them from its own count (sent before the
    report) while the replica's report did not hold them, so a short prompt routed next saw an
    idle queue behind a 56k-token prefill (issue #15, Mooncake, 8 replicas, load 0.9)."""
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    preset = get_preset("llama3-8b-h100")
    long_prompt, short_prompt = 40_000, 300  # the long one prefills over 5 steps of 8192 tokens
    trace = [TraceRequest(arrival_s=0.0, input_length=long_prompt, output_length=4),
             TraceRequest(arrival_s=0.02, input_length=short_prompt, output_length=4)]
    fleet = FleetSimulation(FleetConfig(1, preset, "least_request", load_report_interval_s=0.0,
                                        request_latency_s=0.0, response_latency_s=0.0))
    reports: list[tuple[float, int, int]] = []
    on_load = fleet.registry.on_load

    def record(url, load, age_s=0.0):
        reports.append((fleet.now, load.num_running + load.num_waiting, load.queued_prefill_tokens))
        on_load(url, load, age_s)

    fleet.registry.on_load = record
    res = fleet.run(sim_requests(trace))
    assert all(r.first_token is not None for r in res.records)
    after = [r for r in reports if r[0] > 0.02]
    assert after, "no report after the second arrival"
    t, requests, queued = after[0]  # the end of the step the short prompt arrived during
    assert requests == 2
    assert queued >= short_prompt + (long_prompt - 8192) - 1  # its prompt and the long one's rest
