"""Several uncoordinated balancer instances (issue #18 part 3), in the simulator: N instances,
each with its own index, registry and policy, fed the same KV events and load reports, requests
spread round robin over them. For 1, 2, 4 instances, each routing on its own bookkeeping
(`own`, the default) or from shared state only (`consistent`, BalancerConfig.consistent_routing),
with the replicas also reporting as soon as requests join their queue (`+arrival`, `kvfleet
replica --load-report-on-arrival`) or only at the live 100 ms cadence:
agreement (the share of requests for which every other instance, asked at that moment without
booking, would have picked the same replica) and mean / p99 TTFT. Each instance has its own
output-length predictor, learning from the requests it routed.

    .venv/bin/python bench/bench_multi_balancer.py [--workloads mooncake,agentic] [--policies ...]
        [--balancers 1,2,4] [--modes own,consistent,consistent+arrival] [--replicas 8] [--load 0.8] [--requests 1000]
        [--out results/multi.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report, routing_mode  # noqa: E402
from loadgen.generate import GenerateConfig, generate  # noqa: E402
from loadgen.traces import load_trace  # noqa: E402
from replica.step_model import get_preset  # noqa: E402
from simulator.run import SimulateConfig, simulate  # noqa: E402

MOONCAKE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_synthetic.jsonl"


def workload(name: str, n: int):
    if name == "mooncake":
        return load_trace(MOONCAKE)[:n]
    # the routing matrix's generated shapes (bench/routing_matrix.toml)
    return generate(GenerateConfig(kind=name, num_requests=n, session_rate=1.0, tenants=8, burstiness=0.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="mooncake,agentic", help="mooncake (../shared/traces) or chat, agentic, hot")
    ap.add_argument("--policies", default="predictive,precise_prefix,llmd_scorer")
    ap.add_argument("--balancers", default="1,2,4", help="instance counts")
    ap.add_argument("--modes", default="own,consistent,consistent+arrival",
                    help="own: each instance counts its own sends (the default balancer); consistent: shared state "
                         "only (kvfleet balancer --consistent-routing); +arrival: replicas also report when requests "
                         "join their queue (kvfleet replica --load-report-on-arrival)")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.8, help="target utilisation")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--kv-tokens", type=int, default=120000, help="KV tokens per replica")
    ap.add_argument("--out", default=None, help="JSON file for the table")
    args = ap.parse_args(argv)
    preset = get_preset("llama3-8b-h100")
    rows = []
    for wl in args.workloads.split(","):
        trace = workload(wl, args.requests)
        for mode in args.modes.split(","):
            try:
                consistent, arrival = routing_mode(mode)
            except ValueError as e:
                ap.error(f"--modes: {e}")
            for n in (int(x) for x in args.balancers.split(",")):
                cfg = SimulateConfig(args.replicas, preset, tuple(args.policies.split(",")), args.kv_tokens // 16,
                                     args.load, balancers=n, consistent_routing=consistent,
                                     report_on_arrival=arrival)
                out = simulate(trace, cfg)
                for s in out["policies"]:
                    res = out["_results"][s["policy"]]
                    rows.append([wl, s["policy"], mode, n, res.extra.get("agreement", 1.0), s["mean_ttft_s"],
                                 s["p99_ttft_s"]])
                    print(rows[-1], flush=True)
    report("several balancer instances (simulator)",
           ["workload", "policy", "mode", "instances", "agreement", "TTFT mean s", "TTFT p99 s"], rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
