"""Several uncoordinated balancer instances, live (issue #18 part 3): `--balancers` real
`kvfleet balancer` subprocesses in front of `--replicas` `kvfleet replica --engine sim`
subprocesses (Llama-3-8B/H100 modelled), each instance subscribed to every replica's KV events
and load reports and knowing nothing of the others. Requests (half with one of a few long shared
prefixes, half cold) arrive at Poisson times and go round robin over the instances; as each is
sent, every other instance is asked at the same moment through `POST /admin/explain` (books
nothing) where it would send it. Agreement: every other instance named the replica that served
it. Per policy, with each instance counting its own sends (`own`, the default balancer), with
`--consistent-routing` (`consistent`), and with that and the replicas' `--load-report-on-arrival`
(`consistent+arrival`). TTFT is wall-clock on this machine, through the balancer.

    .venv/bin/python bench/bench_multi_balancer_live.py [--policies predictive,precise_prefix]
        [--modes own,consistent,consistent+arrival] [--replicas 3] [--balancers 2] [--requests 200] [--rate 6]
        [--max-tokens 64] [--out results/multi_balancer_live.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.balancer.loadclient import pct  # noqa: E402
from bench.common import report, routing_mode  # noqa: E402
from harness import multi_balancer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="predictive,precise_prefix", help="comma-separated policy names")
    ap.add_argument("--modes", default="own,consistent,consistent+arrival",
                    help="own: each instance counts its own sends; consistent: --consistent-routing; +arrival: the "
                         "replicas' --load-report-on-arrival")
    ap.add_argument("--replicas", type=int, default=3, help="sim replica subprocesses")
    ap.add_argument("--balancers", type=int, default=2, help="balancer instances (subprocesses)")
    ap.add_argument("--requests", type=int, default=200, help="requests per (policy, mode)")
    ap.add_argument("--rate", type=float, default=6.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="replicas run this many times faster than modelled")
    ap.add_argument("--out", default=None, help="JSON file for the table")
    args = ap.parse_args(argv)
    rows = []
    texts = multi_balancer.prompts(args.requests)
    for policy in args.policies.split(","):
        for mode in args.modes.split(","):
            try:
                consistent, arrival = routing_mode(mode)
            except ValueError as e:
                ap.error(f"--modes: {e}")
            with multi_balancer.fleet(args.replicas, args.balancers, policy, consistent,
                                      time_scale=args.time_scale, arrival_reports=arrival) as (_, bals):
                bases = [b.url for b in bals]

                async def run():
                    import aiohttp

                    async with aiohttp.ClientSession() as s:
                        await multi_balancer.wait_settled(s, bases, args.replicas)
                    return await multi_balancer.replay(bases, texts, args.rate, args.max_tokens)

                out = asyncio.run(run())
            t = out.ttfts or []
            rows.append([policy, mode, args.balancers, out.served, out.agreement,
                         sum(t) / len(t) if t else float("nan"), pct(sorted(t), 0.99) if t else float("nan")])
            print(rows[-1], flush=True)
    report(f"several balancer instances, live ({args.replicas} sim replicas, {args.balancers} balancers, "
           f"{args.rate:g} req/s, load average {os.getloadavg()[0]:.1f})",
           ["policy", "mode", "instances", "served", "agreement", "TTFT mean s", "TTFT p99 s"], rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
