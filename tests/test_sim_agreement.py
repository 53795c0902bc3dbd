"""The simulator against reality: a calibrated sim replica vs the torch replica, and the
offline simulation vs a live fleet of sim replicas behind the balancer."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import replace

import pytest

from kvfleet import procs
from kvfleet.fleet import FleetSpec, LocalFleet
from loadgen.client import LoadConfig, run_load
from loadgen.traces import TraceOptions, TraceRequest, load_trace
from replica.calibrate import calibrate, save
from replica.config import EngineConfig
from replica.step_model import get_preset
from simulator.run import SimulateConfig, simulate

pytestmark = pytest.mark.slow


def sequential_workload() -> list[TraceRequest]:
    lengths = [120, 700, 300, 900, 60, 500, 1100, 250, 800, 400]
    return [TraceRequest(arrival_s=2.0 * i, input_length=n, output_length=12) for i, n in enumerate(lengths)]


def measure(url: str, trace: list[TraceRequest]) -> list[tuple[float, float]]:
    result = asyncio.run(run_load(url, trace, LoadConfig(model="tiny", progress=False)))
    recs = sorted(result.records, key=lambda r: r.index)
    assert all(r.error is None for r in recs), [r.error for r in recs]
    return [(r.ttft_s, r.e2el_s) for r in recs]


def test_calibrated_sim_replica_matches_torch_replica(tmp_path):
    cfg = EngineConfig(model="tiny", threads=1, num_blocks=1024, max_num_batched_tokens=512, max_num_seqs=32)
    model, report = calibrate(cfg, num_requests=80)
    preset_file = tmp_path / "tiny.json"
    save(preset_file, model, cfg, report)
    trace = sequential_workload()
    common = ["--port", "0", "--num-blocks", "1024", "--max-num-batched-tokens", "512", "--max-num-seqs", "32",
              "--no-prefix-caching"]
    torch_rep = procs.start(["replica", "--model", "tiny", "--threads", "1", *common])
    try:
        real = measure(torch_rep.url, trace)
    finally:
        torch_rep.stop()
    sim_rep = procs.start(["replica", "--engine", "sim", "--preset-file", str(preset_file), *common])
    try:
        sim = measure(sim_rep.url, trace)
    finally:
        sim_rep.stop()
    ttft_err = statistics.median(abs(s[0] - r[0]) / r[0] for s, r in zip(sim, real))
    e2e_err = statistics.median(abs(s[1] - r[1]) / r[1] for s, r in zip(sim, real))
    assert ttft_err <= 0.15, (ttft_err, real, sim, report)
    assert e2e_err <= 0.15, (e2e_err, real, sim, report)


def test_offline_simulation_matches_live_sim_fleet():
    trace = load_trace("loadgen/data/agentic_small.jsonl",
                       options=TraceOptions(max_requests=40, scale_input=0.1, time_scale=0.5))
    trace = [replace(r, output_length=min(r.output_length, 40)) for r in trace]
    preset = "llama3-8b-h100"
    p = get_preset(preset)
    spec = FleetSpec(replicas=2, engine="sim", policy="precise_prefix", balancer_port=0,
                     replica_args=("--preset", preset, "--num-blocks", "2000"))
    with LocalFleet(spec) as fleet:
        live = asyncio.run(run_load(fleet.balancer.url, trace, LoadConfig(model="tiny", progress=False)))
    live_ttft = statistics.mean(r.ttft_s for r in live.records if r.error is None)
    assert all(r.error is None for r in live.records)
    cfg = SimulateConfig(replicas=2, preset=p, policies=("precise_prefix",), kv_blocks=2000)
    offline = simulate(trace, cfg)["policies"][0]
    assert offline["mean_ttft_s"] == pytest.approx(live_ttft, rel=0.15), (offline["mean_ttft_s"], live_ttft)
