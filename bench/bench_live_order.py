"""Live agreement (issue #15): do policies rank the same on a live fleet as in the simulator?

For each workload of the routing matrix named (default: multi-turn chat and agentic), the same
requests are replayed

- live: a fresh fleet of `--replicas` sim replicas (`kvfleet replica --engine sim`, the
  matrix's Llama-3-8B H100 preset and KV size) behind the real balancer, loadgen sending
  token prompts with `max_tokens` = the trace's output length, once per policy, and
- offline: `simulator.run.simulate` with the same preset, KV, load, output-length predictor
  and `client_max_tokens` (the requests carry max_tokens, as loadgen's do),

and the policies are ordered by mean and by p99 TTFT in each. The table prints both figures
and both orders per workload, whether the orders match and Kendall's tau between them.

With `--time-scale S` (< 1) the replicas run S times the modelled GPU's speed and the trace is
stretched by 1/S, so a busy machine keeps up; live times are divided back by 1/S before they
are compared (the orders do not depend on it).

    .venv/bin/python bench/bench_live_order.py                        # chat + agentic, 16 replicas
    .venv/bin/python bench/bench_live_order.py --workloads hot --policies round_robin,predictive
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPEC = Path(__file__).resolve().parent / "routing_matrix.toml"
DEFAULT_POLICIES = "round_robin,least_request,llmd_scorer,dynamo_kv,predictive"


def run_live(trace, policy: str, args, prompt_seed: int, sessions: bool = False) -> dict:
    """`trace` through a fresh live fleet running `policy` (with `sessions`: sticky sessions on,
    loadgen sending each request's session id as its `user`)."""
    import numpy as np

    from kvfleet.fleet import FleetSpec, LocalFleet
    from loadgen.client import LoadConfig, run_load
    from loadgen.metrics import summarize
    from loadgen.prompts import PromptConfig

    replica_args = ("--preset", args.preset, "--num-blocks", str(args.kv_tokens // 16),
                    "--time-scale", str(args.time_scale))
    spec = FleetSpec(replicas=args.replicas, engine="sim", policy=policy, balancer_port=0, replica_args=replica_args,
                     balancer_args=("--sessions",) if sessions else ())
    stretched = [dataclasses.replace(r, arrival_s=r.arrival_s / args.time_scale) for r in trace]
    with LocalFleet(spec) as fleet:
        t0 = time.perf_counter()
        res = asyncio.run(run_load(fleet.balancer.url, stretched,
                                   LoadConfig(model="tiny", prompt=PromptConfig(seed=prompt_seed), progress=False,
                                              session_user=sessions)))
        wall = time.perf_counter() - t0
    summary = summarize(res, percentiles=(99,))
    if not summary["completed"]:
        raise SystemExit(f"{policy}: no request succeeded live; run `kvfleet fleet up --engine sim` to see why")
    s = args.time_scale / 1000.0  # live ms at the stretched speed -> modelled seconds
    lags = [r.lag_s for r in res.records if r.lag_s is not None]
    return {"mean_ttft_s": summary["mean_ttft_ms"] * s, "p99_ttft_s": summary["p99_ttft_ms"] * s,
            "mean_e2el_s": summary["mean_e2el_ms"] * s, "ok": summary["completed"], "sent": summary["num_requests"],
            "lag_p99_s": float(np.percentile(lags, 99)) if lags else 0.0, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="chat,agentic", help="names in bench/routing_matrix.toml")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--kv-tokens", type=int, default=120_000, help="KV tokens per replica")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="llama3-8b-h100")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="replicas run this many times the modelled GPU's speed (e.g. 0.5 on a busy machine)")
    ap.add_argument("--out", default="results/bench_live_order.json")
    args = ap.parse_args()
    if not 0 < args.time_scale <= 1:
        ap.error("--time-scale must be in (0, 1]: slower than the model, never faster (the machine must keep up)")

    from bench.common import report
    from predictors.metrics import kendall_tau
    from replica.step_model import get_preset
    from simulator.run import SimulateConfig, simulate
    from simulator.sweep import Cell, cell_trace, load_spec

    spec = load_spec(SPEC)
    known = {w.name: w for w in spec.workloads}
    policies = tuple(p for p in args.policies.split(",") if p)
    rows, raw, verdicts = [], {}, []
    load0 = os.getloadavg()[0]
    for name in args.workloads.split(","):
        if name not in known:
            raise SystemExit(f"unknown workload {name!r}; the matrix has: {', '.join(known)}")
        trace, prompt_seed = cell_trace(Cell(known[name], args.replicas, args.load, args.kv_tokens, args.seed,
                                             args.requests))
        cfg = SimulateConfig(args.replicas, get_preset(args.preset), policies, kv_blocks=args.kv_tokens // 16,
                             load=args.load, seed=prompt_seed, predictor=spec.predictor, client_max_tokens=True)
        offline = simulate(trace, cfg)
        factor = offline["config"]["time_factor"]
        scaled = [dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in trace]  # the load asked for
        off = {p["policy"]: p for p in offline["policies"]}
        live = {}
        for policy in policies:
            live[policy] = run_live(scaled, policy, args, prompt_seed)
            print(f"  {name} {policy}: live mean / p99 TTFT {live[policy]['mean_ttft_s']:.3f} / "
                  f"{live[policy]['p99_ttft_s']:.3f} s, offline {off[policy]['mean_ttft_s']:.3f} / "
                  f"{off[policy]['p99_ttft_s']:.3f} s ({live[policy]['ok']}/{live[policy]['sent']} ok, "
                  f"{live[policy]['wall_s']:.0f} s)", flush=True)
        raw[name] = {"live": live, "offline": {p: {k: off[p][k] for k in ("mean_ttft_s", "p99_ttft_s", "mean_e2el_s")}
                                               for p in policies}, "time_factor": factor}
        for key, label in (("mean_ttft_s", "mean"), ("p99_ttft_s", "p99")):
            lo = sorted(policies, key=lambda p: live[p][key])
            oo = sorted(policies, key=lambda p: off[p][key])
            tau = kendall_tau([live[p][key] for p in policies], [off[p][key] for p in policies])
            verdicts.append(lo == oo)
            rows.append([name, label, " < ".join(oo), " < ".join(lo), "yes" if lo == oo else "no", f"{tau:+.2f}",
                         ", ".join(f"{p} {live[p][key]:.3f}/{off[p][key]:.3f}" for p in oo)])
        for p in policies:
            rows.append([name, f"{p}", "", "", "", "",
                         f"mean {live[p]['mean_ttft_s']:.3f}/{off[p]['mean_ttft_s']:.3f} s, "
                         f"p99 {live[p]['p99_ttft_s']:.3f}/{off[p]['p99_ttft_s']:.3f} s, "
                         f"E2E {live[p]['mean_e2el_s']:.2f}/{off[p]['mean_e2el_s']:.2f} s, "
                         f"send lag p99 {live[p]['lag_p99_s'] * 1e3:.0f} ms"])
    report(f"Policy order live ({args.replicas} sim replicas, {args.preset}, {args.kv_tokens // 1000}k KV, "
           f"load {args.load}, {args.requests} requests, seed {args.seed}, time scale {args.time_scale}) vs simulator",
           ["workload", "TTFT", "offline order", "live order", "same", "tau", "live/offline s"], rows, args.out,
           {"raw": raw, "load_average": [load0, os.getloadavg()[0]]})
    print(f"orders matching: {sum(verdicts)} of {len(verdicts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
