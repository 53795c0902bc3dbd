"""Policies on a live fleet beside the offline simulator (issue 7: "a live run shows the same
ordering as the simulator").

A short slice of the bundled agentic trace (tenants' system prompts, sessions, agent loops;
prompts scaled by 1/32 so a 512-token block becomes one 16-token KV block) is replayed through
a local fleet of tiny torch replicas (one thread each) behind the balancer, once per policy,
each on a fresh fleet (cold caches). The same slice, at the same arrival times, goes through
the offline simulator with the `tiny-cpu` preset (calibrated on this machine, replica/step_model.py). Arrivals are rescaled so that the
simulator's capacity model puts the fleet at `--load`. The table gives mean and p99 TTFT per
policy and each side's rank; on a loaded 2-core machine the live figures are noisy, so the
machine's load average is printed with them.

    .venv/bin/python bench/bench_policy_live.py [--requests 60] [--replicas 2] [--load 0.7]

About 4–5 minutes: each fleet start loads torch in every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvfleet.fleet import FleetSpec, LocalFleet  # noqa: E402
from loadgen.client import LoadConfig, run_load  # noqa: E402
from loadgen.traces import TraceOptions, TraceRequest, load_trace  # noqa: E402
from replica.step_model import get_preset  # noqa: E402
from simulator.run import SimulateConfig, simulate  # noqa: E402

POLICIES = ("round_robin", "least_request", "precise_prefix", "predictive")
KV_BLOCKS = 512  # the tiny preset's, on both sides


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def workload(n: int, max_output: int) -> list[TraceRequest]:
    from loadgen import BUNDLED

    trace = load_trace(BUNDLED, options=TraceOptions(max_requests=n, scale_input=1 / 32))
    return [replace(r, output_length=max(1, min(r.output_length, max_output))) for r in trace]


def rescale(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    t0 = trace[0].arrival_s
    return [replace(r, arrival_s=(r.arrival_s - t0) * factor) for r in trace]


def offline(trace: list[TraceRequest], replicas: int, policies: tuple[str, ...]) -> dict[str, dict]:
    cfg = SimulateConfig(replicas=replicas, preset=get_preset("tiny-cpu"), policies=policies, kv_blocks=KV_BLOCKS)
    return {s["policy"]: s for s in simulate(trace, cfg)["policies"]}


def live(trace: list[TraceRequest], replicas: int, policy: str) -> dict:
    spec = FleetSpec(replicas=replicas, engine="torch", policy=policy, balancer_port=0,
                     replica_args=("--model", "tiny", "--num-blocks", str(KV_BLOCKS), "--threads", "1"))
    with LocalFleet(spec) as fleet:
        res = asyncio.run(run_load(fleet.balancer.url, trace, LoadConfig(model="tiny", progress=False)))
    ok = [r for r in res.records if r.error is None and r.ttft_s is not None]
    ttft = [r.ttft_s for r in ok]
    hit = [r for r in ok if r.cached_tokens is not None]
    out = {"mean_ttft_s": statistics.mean(ttft), "p99_ttft_s": p99(ttft), "errors": len(res.records) - len(ok)}
    if hit:
        out["hit_rate"] = sum(r.cached_tokens for r in hit) / max(1, sum(r.prompt_tokens or r.input_length for r in hit))
    return out


def ranks(values: dict[str, float]) -> dict[str, int]:
    return {k: i + 1 for i, k in enumerate(sorted(values, key=values.get))}


def main() -> None:
    from bench.common import report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60)
    # One torch replica per core: with more replicas than cores they slow each other down, which the
    # simulator does not model (3 replicas on 2 cores put live TTFTs at 2-3x the simulated ones).
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--load", type=float, default=0.7, help="target utilisation (the simulator's capacity model)")
    ap.add_argument("--max-output", type=int, default=16, help="cap on output tokens (keeps the run short)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--repeats", type=int, default=1,
                    help="live runs per policy (in turns: every policy once, then again); the table gives the "
                         "mean over runs, and a pair of policies whose live means are closer than the runs' "
                         "spread counts as a tie")
    ap.add_argument("--out", default=None, help="write the table and figures as JSON here")
    a = ap.parse_args()
    policies = tuple(a.policies.split(","))

    trace = workload(a.requests, a.max_output)
    cfg = SimulateConfig(replicas=a.replicas, preset=get_preset("tiny-cpu"), policies=(policies[0],),
                         kv_blocks=KV_BLOCKS, load=a.load)
    factor = simulate(trace, cfg)["config"]["time_factor"]
    trace = rescale(trace, factor)
    sim = offline(trace, a.replicas, policies)

    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in policies}
    for _ in range(a.repeats):
        for name in policies:
            runs[name].append(live(trace, a.replicas, name))
            load.append(os.getloadavg()[0])
    wall = time.perf_counter() - t0
    real = {name: {"mean_ttft_s": statistics.mean(r["mean_ttft_s"] for r in rs),
                   "p99_ttft_s": statistics.mean(r["p99_ttft_s"] for r in rs),
                   "errors": sum(r["errors"] for r in rs),
                   "hit_rate": statistics.mean(r.get("hit_rate", float("nan")) for r in rs),
                   "spread_s": (max(r["mean_ttft_s"] for r in rs) - min(r["mean_ttft_s"] for r in rs))}
            for name, rs in runs.items()}

    lm, lp = ranks({k: v["mean_ttft_s"] for k, v in real.items()}), ranks({k: v["p99_ttft_s"] for k, v in real.items()})
    sm, sp = ranks({k: v["mean_ttft_s"] for k, v in sim.items()}), ranks({k: v["p99_ttft_s"] for k, v in sim.items()})
    rows = [[k, f"{1e3 * real[k]['mean_ttft_s']:.1f}", f"{1e3 * real[k]['p99_ttft_s']:.1f}", f"{lm[k]} / {lp[k]}",
             f"{1e3 * sim[k]['mean_ttft_s']:.1f}", f"{1e3 * sim[k]['p99_ttft_s']:.1f}", f"{sm[k]} / {sp[k]}",
             f"{real[k].get('hit_rate', float('nan')):.2f} / {sim[k]['cache_hit_rate']:.2f}", real[k]["errors"]]
            for k in policies]
    same = [lm[k] == sm[k] for k in policies]
    # Pairwise: does live order each pair as the simulator does? A pair whose live means differ by
    # less than the larger of the two policies' run-to-run spreads is unresolved (needs --repeats >= 2).
    pairs = []
    for i, x in enumerate(policies):
        for y in policies[i + 1:]:
            d_live = real[x]["mean_ttft_s"] - real[y]["mean_ttft_s"]
            d_sim = sim[x]["mean_ttft_s"] - sim[y]["mean_ttft_s"]
            noise = max(real[x]["spread_s"], real[y]["spread_s"])
            verdict = ("unresolved (within run-to-run spread)" if a.repeats > 1 and abs(d_live) <= noise
                       else "same" if (d_live < 0) == (d_sim < 0) else "DIFFERENT")
            pairs.append([f"{x} vs {y}", f"{1e3 * d_live:+.1f}", f"{1e3 * noise:.1f}", f"{1e3 * d_sim:+.1f}", verdict])
    report(f"Policies live ({a.replicas} tiny torch replicas, 1 thread) vs offline (tiny-cpu preset): "
           f"{len(trace)} agentic requests, load {a.load}",
           ["policy", "live TTFT mean ms", "live p99 ms", "live rank mean/p99", "sim TTFT mean ms", "sim p99 ms",
            "sim rank mean/p99", "hit rate live/sim", "errors"], rows, a.out,
           {"time_factor": factor, "load_avg": load, "wall_s": wall})
    report(f"Pairs: live mean-TTFT difference (mean of {a.repeats} run(s)) against the simulator's",
           ["pair", "live diff ms", "live spread ms", "sim diff ms", "order"], pairs)
    print(f"\nmean-TTFT ranks agree for {sum(same)}/{len(same)} policies; load average during the live runs: "
          + ", ".join(f"{x:.2f}" for x in load) + f"; live wall {wall:.0f} s")


if __name__ == "__main__":
    main()
