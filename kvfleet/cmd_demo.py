"""The demo: a local fleet of tiny replicas and the balancer replay a bundled trace under
round_robin and under kvfleet's predictive policy, print the comparison table and one sentence
with the verdict, and write the report (JSON, per-request JSONL, markdown, plots, and
compare_ttft_cdf.png with both policies' TTFT) to --out. About 2 minutes on 2 cores; every process
it starts is stopped at the end. Example:

    kvfleet demo --out results/demo
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kvfleet.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--replicas", type=int, default=d.replicas, help="tiny replicas in the fleet")
    p.add_argument("--policies", default=",".join(d.policies), help="policies to compare, comma-separated")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="requests replayed per policy")
    p.add_argument("--trace", default=d.trace, help="trace to replay (default: the bundled agentic trace)")
    p.add_argument("--out", default=d.out, help="report folder")


def run(args: argparse.Namespace) -> int:
    from kvfleet.demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(replicas=args.replicas, policies=tuple(p for p in args.policies.split(",") if p),
                         max_requests=args.max_requests, trace=args.trace, out=args.out)
        run_demo(cfg)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"kvfleet demo: {e}", file=sys.stderr)
        return 1
    return 0
