"""Can this machine run a live sim fleet at the trace's own speed? (issue: fleet simulator)

16 sim replicas of Llama-3-70B on 4×H100 (`kvfleet replica --engine sim`), the balancer
(precise_prefix) and loadgen replay a slice of the shared Mooncake synthetic trace at 1× speed.
Keeping up means three things, each measured:

- loadgen sends on time: achieved minus scheduled send time (its `lag_s`);
- the replicas run their steps on time: a replica that falls behind its modelled timeline
  stretches every decode step, so the live TPOT and E2E are compared with the offline
  simulation of the same requests (which is exact about steps and knows no host);
- nobody is starved of CPU: CPU seconds used by the replicas, the balancer and loadgen over the
  run, as cores (this machine has 2, shared).

The offline run adds the live path's per-request latency, measured first on the idle fleet as
in bench_sim_agreement.py.

    .venv/bin/python bench/bench_sim_fleet.py [--replicas 16] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_sim_agreement import probe_latency  # noqa: E402
from kvfleet.fleet import FleetSpec, LocalFleet  # noqa: E402
from loadgen.client import LoadConfig, run_load  # noqa: E402
from loadgen.traces import TraceOptions, load_trace  # noqa: E402
from replica.step_model import get_preset  # noqa: E402
from simulator.run import DEFAULT_RESPONSE_LATENCY_S, SimulateConfig, simulate  # noqa: E402

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "mooncake_synthetic.jsonl"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def q(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def main() -> None:
    from bench.common import report

    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--requests", type=int, default=300, help="first N requests of the trace")
    ap.add_argument("--policy", default="precise_prefix")
    ap.add_argument("--trace", default=str(TRACE))
    args = ap.parse_args()

    preset = "llama3-70b-h100"
    p = get_preset(preset)
    trace = load_trace(args.trace, options=TraceOptions(max_requests=args.requests, time_scale=1.0))
    spec = FleetSpec(replicas=args.replicas, engine="sim", policy=args.policy, balancer_port=0,
                     replica_args=("--preset", preset))
    load = [os.getloadavg()[0]]
    with LocalFleet(spec) as fleet:
        extra = probe_latency(fleet.balancer.url, p.model)
        pids = {"replicas": [r.popen.pid for r in fleet.replicas], "balancer": [fleet.balancer.popen.pid]}
        before = {k: sum(cpu_s(pid) for pid in v) for k, v in pids.items()}
        own0 = time.process_time()
        t0 = time.perf_counter()
        live = asyncio.run(run_load(fleet.balancer.url, trace, LoadConfig(model="tiny", progress=False)))
        wall = time.perf_counter() - t0
        used = {k: sum(cpu_s(pid) for pid in v) - before[k] for k, v in pids.items()}
        used["loadgen"] = time.process_time() - own0
    load.append(os.getloadavg()[0])
    ok = [r for r in live.records if r.error is None]
    lags = [r.lag_s for r in live.records if r.lag_s is not None]
    path = statistics.median(extra)
    resp = min(DEFAULT_RESPONSE_LATENCY_S, path)
    cfg = SimulateConfig(replicas=args.replicas, preset=p, policies=(args.policy,), predictor="none",
                         request_latency_s=path - resp, response_latency_s=resp)
    sim = simulate(trace, cfg)
    off = sim["policies"][0]
    tpots = [(r.e2el_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    off_tpot = {r.index: r.tpot for r in sim["_results"][args.policy].records if r.finish is not None and r.tpot}
    ratio = [((r.e2el_s - r.ttft_s) / (r.output_tokens - 1)) / off_tpot[r.index]
             for r in ok if r.output_tokens > 1 and r.index in off_tpot]
    live_ttft, live_e2e, live_tpot = (statistics.mean(r.ttft_s for r in ok), statistics.mean(r.e2el_s for r in ok),
                                      statistics.mean(tpots))

    def rel(a: float, b: float) -> str:
        return f"{(a - b) / b:+.1%}"

    rows = [
        ["requests (ok / sent)", f"{len(ok)} / {len(live.records)}", f"trace span {trace[-1].arrival_s - trace[0].arrival_s:.0f} s, run {wall:.0f} s"],
        ["loadgen send lag p50 / p99 / max", f"{q(lags, .5) * 1e3:.1f} / {q(lags, .99) * 1e3:.1f} / {max(lags) * 1e3:.1f} ms", "achieved - scheduled"],
        ["live path latency (idle probes, median)", f"{path * 1e3:.1f} ms", "added to the offline run"],
        ["mean TTFT live / offline", f"{live_ttft:.3f} / {off['mean_ttft_s']:.3f} s", rel(live_ttft, off["mean_ttft_s"])],
        ["mean TPOT live / offline", f"{live_tpot * 1e3:.1f} / {off['mean_tpot_s'] * 1e3:.1f} ms", rel(live_tpot, off["mean_tpot_s"])],
        ["median TPOT live / offline", f"{statistics.median(tpots) * 1e3:.1f} / {statistics.median(off_tpot.values()) * 1e3:.1f} ms",
         f"per request live/offline: median {statistics.median(ratio):.2f}, p10 {q(ratio, .1):.2f}, p90 {q(ratio, .9):.2f}"],
        ["mean E2E live / offline", f"{live_e2e:.2f} / {off['mean_e2el_s']:.2f} s", rel(live_e2e, off["mean_e2el_s"])],
        ["CPU: replicas / balancer / loadgen", " / ".join(f"{used[k] / wall:.2f}" for k in ("replicas", "balancer", "loadgen")) + " cores",
         f"{sum(used.values()) / wall:.2f} cores in all"],
        ["load average before / after", f"{load[0]:.1f} / {load[1]:.1f}", "2 cores, shared"],
    ]
    report(f"Live sim fleet at 1x: {args.replicas} replicas, {args.requests} Mooncake requests",
           ["figure", "value", "note"], rows, "results/bench_sim_fleet.json",
           {"cpu_s": used, "wall_s": wall, "offline": off, "path_latency_s": extra})


if __name__ == "__main__":
    main()
