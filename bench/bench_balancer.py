"""Balancer overhead benchmark (issue: balancer, benchmark section).

Goals: added latency p50 <= 0.5 ms and p99 <= 2 ms at 500 req/s; >= 2,000 non-streaming req/s on
one core; >= 50,000 relayed SSE chunks/s; a routing decision (tokenize, hash, look up, score 16
replicas) <= 200 us p50 for an 8k-token prompt.

Every proxy sits in front of the same fake backend (bench/fake_backend.py: a raw asyncio
protocol that answers at once, or streams N SSE events). Side by side in one run:

    direct              the client talks to the backend
    kvfleet <policy>    `python -m kvfleet.cli balancer` (precise_prefix, round_robin); the
                        generation routes on its lean front-end (balancer/front.py)
    kvfleet ..., aiohttp front   the same with `--no-fast-path`: aiohttp serves every route
    kvfleet ..., guard on        the same with an API key checked and a per-key rate limit counted
                                 on every request (high enough never to refuse one)
    aiohttp bare relay  reference: an aiohttp server + ClientSession passing bytes through, no
                        parsing or routing: the floor for any proxy built on aiohttp
    nginx               Debian's nginx, worker_processes 1, upstream keepalive, proxy_buffering off
    sglang-router       PyPI `sglang-router` (Rust), in its own venv, --policy round_robin

Cores: the proxy under test is pinned to core 0 (--proxy-core); the backend and the load
generator share core 1 (--load-core). "Direct" therefore has no proxy core: its rows are the rig's
own ceiling, and a proxy row near them is limited by the rig, not by the proxy.

1. Latency: an open-loop aiohttp client (own process) sends at a fixed rate (500 req/s) for a few
   seconds after a warm-up; latency is measured per request from its send to the end of its body.
   added = percentile(via proxy) - percentile(direct), for a short prompt and an 8k-token prompt,
   measured in --rounds rounds (direct, then every target) and given as the median over rounds of
   the difference within a round: this machine is a VM whose speed drifts from minute to minute.
2. Max throughput: `wrk -t1 -c64` with a POST body (aiohttp closed loop of 64 when wrk is absent);
   the proxy's CPU use during the run shows whether it was the bottleneck (100% = one core), and
   its CPU per request (µs).
3. SSE relay: 4 concurrent streams of 1,000 events each, repeated for a few seconds: relayed
   events/s counted by the client (every stream is checked to end with [DONE]).
4. Upstream client (`--parts client`), in process: CPU per sequential small POST of the
   balancer's own client (balancer/upstream.py) and of aiohttp's ClientSession.
5. Routing decision, in process: Router.prepare (tokenize + hash) + routing_request (exact and
   approximate index look-up) + decide (registry.usable + policy over 16 replicas) for 8k-token
   prompts, against a PrefixIndex of 16 replicas holding ~1M blocks; each probe is cached fully on
   3 replicas and half on 3 more, so the look-up walks the whole chain.

    .venv/bin/python bench/bench_balancer.py [--duration 5] [--rate 500] [--nice -10 | --realtime] [--no-install]
    .venv/bin/python bench/bench_balancer.py --parts routing --skip round_robin,bare,nginx,sglang-router
    .venv/bin/python bench/bench_balancer.py --profile [--py-spy PATH]  # where the balancer's CPU goes

The code: bench/balancer/ (one file per part, the rig and the measurement helpers; its
__init__ lists them). A balancer configuration to compare is one entry in rig.VARIANTS.

Every table has an "others on cores P/L" column: the share of the proxy's core (P) and of the
load core (L) that processes outside this benchmark took during that run (from /proc/stat, minus
the CPU of the proxy, backend and load generator). On a machine shared with other work it is not
0, and rows with high values are pessimistic. --nice -10 or --realtime (SCHED_RR, root) make the
benchmark's processes win most of that contention.

Missing tools are installed unless --no-install: `apt-get install wrk nginx` (as root) and
`pip install sglang-router` into a separate venv under ~/.cache/kvfleet-bench (never into the
project's venv). A tool that cannot be had gets "n/a (reason)" rows. Only 127.0.0.1 is contacted;
sglang-router is given HF_ENDPOINT=http://127.0.0.1:9 so its tokenizer fetch stays on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.balancer import (client_cost, decision, goals, latency, profiling, rig, sse,  # noqa: E402
                            throughput, tools)

PARTS = ("latency", "throughput", "sse", "client", "routing")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop rate for the latency runs (req/s)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="latency rounds (direct, then every target, per round); added = median over rounds of "
                         "the difference to direct in the same round")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections for max throughput")
    ap.add_argument("--sse-streams", type=int, default=4)
    ap.add_argument("--sse-chunks", type=int, default=1000)
    ap.add_argument("--proxy-core", type=int, default=0)
    ap.add_argument("--load-core", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="indexed blocks for the routing benchmark")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for this run and every process it starts (inherited); e.g. -10 on a machine "
                         "shared with other work (negative needs root)")
    ap.add_argument("--realtime", action="store_true",
                    help="run the load phases under SCHED_RR priority 1 (inherited by every process started; "
                         "root), so other work on a shared machine cannot preempt them; of the in-process routing "
                         "benchmark only the timed loops run so")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing tools")
    ap.add_argument("--skip", default="", help=f"comma list of targets to skip: {','.join(rig.SKIPPABLE)}")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma list of the parts to run ({', '.join(PARTS)}); the goals table covers the parts "
                         "run; client: CPU per request of the balancer's upstream client against aiohttp's")
    ap.add_argument("--profile", action="store_true", help="only profile the kvfleet balancer under load")
    ap.add_argument("--profile-policy", default="precise_prefix")
    ap.add_argument("--profile-variant", default=None, choices=[v.key for v in rig.VARIANTS],
                    help="profile this balancer configuration of the comparison instead (its flags and headers)")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--py-spy", default=None, help="py-spy binary for --profile (default: on PATH, else cProfile)")
    ap.add_argument("--out", default="results/bench_balancer.json", help="results/bench_balancer_<part>.json")
    args = ap.parse_args()
    parts = set(filter(None, args.parts.split(",")))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown part(s) {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(rig.SKIPPABLE):
        ap.error(f"--skip: unknown target(s) {sorted(skip - set(rig.SKIPPABLE))}; "
                 f"choose from {', '.join(rig.SKIPPABLE)}")
    if (os.cpu_count() or 1) < 2:
        args.proxy_core = args.load_core = None  # nothing to pin apart; the numbers say less
    os.chdir(ROOT)
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # children inherit it
        except OSError as e:
            print(f"cannot set niceness {args.nice}: {e}; running at {os.getpriority(os.PRIO_PROCESS, 0)}")
    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {args.load_core})  # this orchestrator mostly waits; keep core 0 free
    if args.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))  # children inherit it
        except (OSError, AttributeError) as e:
            print(f"cannot switch to SCHED_RR: {e}; running as SCHED_OTHER")
            args.realtime = False
    loadavg_start = os.getloadavg()
    found = tools.ensure_debian_tools(not args.no_install)
    t_start = time.perf_counter()
    # This process's own threads (one per child, reading its output) stay off the proxy's core:
    # a balancer's log line must not wake a reader that then competes with it there.
    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {args.load_core})

    with contextlib.ExitStack() as stack:
        backend = rig.start_backend(stack, args.load_core)
        burl, bpid = backend.url, backend.pid
        if args.profile:
            profiling.run(args, burl, bpid, found["wrk"])
            return 0
        targets = rig.start_targets(args, stack, burl, found, skip)
        print(f"targets up in {time.perf_counter() - t_start:.1f} s: "
              + ", ".join(t.name for t in targets if t.url is not None), flush=True)
        lat = latency.rows(args, targets, bpid) if "latency" in parts else []
        thr = throughput.rows(args, targets, bpid, found["wrk"]) if "throughput" in parts else []
        sse_ = sse.rows(args, targets, bpid) if "sse" in parts else []
        client = client_cost.rows(burl, args.proxy_core) if "client" in parts else []

    # In process, once every process above is stopped.
    if args.realtime:  # the index build must not hold a core at real-time priority for seconds
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {args.proxy_core})
    routing = decision.rows(list(decision.POLICIES), args.blocks, 16, probes_n=32, rounds=20,
                            realtime=args.realtime) if "routing" in parts else []

    stem = args.out.removesuffix(".json")
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    sched = "; SCHED_RR" if args.realtime else f"; SCHED_OTHER, nice {nice}"
    setup = {"proxy_core": args.proxy_core, "load_core": args.load_core, "rate": args.rate, "duration_s": args.duration,
             "wrk": found["wrk"], "nginx": found["nginx"], "targets": {t.name: t.note for t in targets},
             "command": " ".join(sys.argv), "niceness": nice, "realtime_load_phases": args.realtime,
             "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()}
    extra = {"setup": setup}
    latency.print_report(args, lat, stem, extra, sched)
    throughput.print_report(args, thr, stem, extra, sched)
    sse.print_report(args, sse_, stem, extra, sched)
    decision.print_report(args, routing, stem, extra, sched)
    if client:
        client_cost.print_report(client, stem, extra)
    goals.print_report(goals.rows(args, lat, thr, sse_, routing), stem, extra)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
