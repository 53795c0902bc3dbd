"""The simulator against reality (issue: fleet simulator), a timing comparison, so a benchmark:

1. `kvfleet calibrate` on this machine, then a calibrated sim replica and the torch replica serve
   the same sequential workload: median per-request relative error of TTFT and E2E (goal ≤ 15 %).
2. The offline simulation and a live fleet (2 sim replicas + balancer + loadgen) on the same
   short trace and policy: mean TTFT (goal within 15 %).

    .venv/bin/python bench/bench_sim_agreement.py
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import replace

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvfleet import procs
from kvfleet.fleet import FleetSpec, LocalFleet
from loadgen.client import LoadConfig, run_load
from loadgen.traces import TraceOptions, TraceRequest, load_trace
from replica.calibrate import calibrate, save  # noqa: E402
from replica.config import EngineConfig
from replica.step_model import get_preset
from simulator.run import SimulateConfig, simulate

def sequential_workload() -> list[TraceRequest]:
    lengths = [120, 700, 300, 900, 60, 500, 1100, 250, 800, 400]
    return [TraceRequest(arrival_s=2.0 * i, input_length=n, output_length=12) for i, n in enumerate(lengths)]


def measure(url: str, trace: list[TraceRequest]) -> list[tuple[float, float]]:
    result = asyncio.run(run_load(url, trace, LoadConfig(model="tiny", progress=False)))
    recs = sorted(result.records, key=lambda r: r.index)
    errors = [r.error for r in recs if r.error is not None]
    if errors:
        raise RuntimeError(f"requests failed: {errors}")
    return [(r.ttft_s, r.e2el_s) for r in recs]


def calibrated_vs_torch(tmp_path: Path) -> dict:
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
    return {"ttft_median_rel_error": ttft_err, "e2e_median_rel_error": e2e_err,
            "calibration_holdout_median_rel_error": report["holdout"]["median_rel_error"]}


def offline_vs_live() -> dict:
    from loadgen import BUNDLED

    trace = load_trace(BUNDLED,
                       options=TraceOptions(max_requests=40, scale_input=0.1, time_scale=0.5))
    trace = [replace(r, output_length=min(r.output_length, 40)) for r in trace]
    preset = "llama3-70b-h100"  # steps of tens of ms: HTTP and Python overheads stay small
    p = get_preset(preset)
    spec = FleetSpec(replicas=2, engine="sim", policy="precise_prefix", balancer_port=0,
                     replica_args=("--preset", preset, "--num-blocks", "2000"))
    with LocalFleet(spec) as fleet:
        live = asyncio.run(run_load(fleet.balancer.url, trace, LoadConfig(model="tiny", progress=False)))
    live_ttft = statistics.mean(r.ttft_s for r in live.records if r.error is None)
    cfg = SimulateConfig(replicas=2, preset=p, policies=("precise_prefix",), kv_blocks=2000)
    offline = simulate(trace, cfg)["policies"][0]
    return {"live_mean_ttft_s": live_ttft, "offline_mean_ttft_s": offline["mean_ttft_s"],
            "rel_diff": abs(offline["mean_ttft_s"] - live_ttft) / live_ttft}


def main() -> None:
    from bench.common import report

    with tempfile.TemporaryDirectory() as d:
        a = calibrated_vs_torch(Path(d))
    b = offline_vs_live()
    report("Simulator vs reality", ["comparison", "figure", "value", "goal"], [
        ["calibrated sim replica vs torch replica", "median rel. error TTFT", f"{a['ttft_median_rel_error']:.1%}", "<= 15%"],
        ["calibrated sim replica vs torch replica", "median rel. error E2E", f"{a['e2e_median_rel_error']:.1%}", "<= 15%"],
        ["calibration (holdout steps)", "median rel. error", f"{a['calibration_holdout_median_rel_error']:.1%}", "-"],
        ["offline sim vs live sim fleet", "mean TTFT live / offline",
         f"{b['live_mean_ttft_s'] * 1e3:.1f} / {b['offline_mean_ttft_s'] * 1e3:.1f} ms", "within 15%"],
        ["offline sim vs live sim fleet", "relative difference", f"{b['rel_diff']:.1%}", "<= 15%"],
    ], "results/bench_sim_agreement.json")


if __name__ == "__main__":
    main()
