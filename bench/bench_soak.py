"""Soak (issue: reliability): a long open-loop run at a fraction of the fleet's capacity.

Measures the fleet's capacity first (closed-loop saturation through the balancer), then sends
Poisson load at `--load` of it (default 80 %) for `--duration` seconds (default 600) through a
balancer in front of simulated replicas, sampling the balancer's VmRSS and open descriptors
every second. Passes when: RSS grows less than 10 % from the end of warm-up (the first 20 % of
the run, at most 60 s) to the end, no descriptor leaks (once idle: no client connection left
open, other descriptors back to their warm count, and - after waiting up to 75 s for idle keep-alive
connections to expire - no upstream connections beyond the health polls'), and no request fails
(so no window of the run shows an error spike).

    .venv/bin/python bench/bench_soak.py [--duration 600] [--load 0.8] [--out results/bench_soak.json]

tests/test_soak.py runs a 30 s version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from harness.chaos import ChaosFleet, measure_capacity, run_soak  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    ap.add_argument("--capacity", type=float, default=None, help="requests/s the fleet sustains (default: measure)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with ChaosFleet(replicas=args.replicas) as fleet:
        capacity = args.capacity or measure_capacity(fleet)
        rate = args.load * capacity
        log(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {args.duration:.0f} s")
        r = run_soak(fleet, args.duration, rate, idle_wait_s=75.0, log=log)
    warm_rss = r._at(r.rss_kb, r.warm_s)
    ok_rss = r.rss_growth < 0.10
    ok_fds = not r.fd_leaks
    warm_k, end_k = r.fd_kinds_at(r.warm_s), r.fd_kinds[-1][1]
    ok_errors = r.errored == 0 and r.lost == 0
    rows = [
        ["capacity (req/s)", f"{capacity:.1f}", ""],
        ["offered load (req/s)", f"{rate:.1f} ({args.load:.0%})", ""],
        ["requests sent / completed", f"{r.sent} / {r.completed}", ""],
        ["errored / lost", f"{r.errored} / {r.lost}", "PASS" if ok_errors else "FAIL"],
        ["failures per window", " ".join(map(str, r.errors_per_window)), ""],
        ["balancer RSS warm -> end (MiB)", f"{warm_rss / 1024:.1f} -> {r.rss_kb[-1][1] / 1024:.1f} "
                                           f"({r.rss_growth:+.1%})", "PASS" if ok_rss else "FAIL"],
        ["balancer RSS peak (MiB)", f"{max(v for _, v in r.rss_kb) / 1024:.1f}", ""],
        # A leak keeps climbing; memory kept after a burst of concurrency (the allocator holds on
        # to it) shows as a step followed by a flat line: this row tells the two apart.
        ["balancer RSS second half (MiB)", f"{r._at(r.rss_kb, args.duration / 2) / 1024:.1f} -> "
                                           f"{r.rss_kb[-1][1] / 1024:.1f}", ""],
        ["balancer fds warm -> idle (peak)", f"{r._at(r.fds, r.warm_s)} -> {r.fds[-1][1]} "
                                            f"({max(v for _, v in r.fds)})", ""],
        ["  client/upstream/other", f"{warm_k['client']}/{warm_k['upstream']}/{warm_k['other']} -> "
                                    f"{end_k['client']}/{end_k['upstream']}/{end_k['other']} (peak concurrency "
                                    f"{r.peak_concurrency})", "PASS" if ok_fds else "FAIL: " + "; ".join(r.fd_leaks)],
    ]
    report(f"Soak: {args.replicas} sim replicas, {args.duration:.0f} s at {args.load:.0%} of capacity",
           ["figure", "value", "check"], rows, out=args.out,
           extra={"rss_kb": r.rss_kb, "fds": r.fds, "errors_per_window": r.errors_per_window})
    return 0 if ok_rss and ok_fds and ok_errors else 1


if __name__ == "__main__":
    sys.exit(main())
