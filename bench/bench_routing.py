"""Routing quality against the best peer and the bounds, over issue #15's matrix.

Runs `bench/routing_matrix.toml` (five workload shapes × 8/32 replicas × loads 0.6–1.0 × KV
120k/400k tokens × 3 seeds, every policy on each cell) through `simulator.sweep`, policies in
parallel worker processes, and prints the table — best peer, predictive, ideal-TTFT and
pooled/infinite-cache bounds, gap closed on mean and p99, hit rates — with the machine and how
many cells meet each goal. Flags narrow the matrix (a slice for a quick look):

    .venv/bin/python bench/bench_routing.py                                 # the whole matrix
    .venv/bin/python bench/bench_routing.py --replicas 8 --seeds 0 --loads 0.8,0.9
    .venv/bin/python bench/bench_routing.py --spec bench/routing_matrix_tiers.toml   # host-tier rows
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from simulator.sweep import load_spec, run_sweep, sweep_table, write_sweep  # noqa: E402

MATRIX = Path(__file__).resolve().parent / "routing_matrix.toml"


def _list(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(MATRIX), help="sweep file (default: bench/routing_matrix.toml)")
    ap.add_argument("--workloads", type=_list(str), default=None, help="comma-separated workload names of the spec")
    ap.add_argument("--replicas", type=_list(int), default=None, help="e.g. 8,32")
    ap.add_argument("--loads", type=_list(float), default=None, help="e.g. 0.6,0.8,0.9,1.0")
    ap.add_argument("--kv-tokens", type=_list(int), default=None, help="KV tokens per replica, e.g. 120000,400000")
    ap.add_argument("--host-kv-tokens", type=_list(int), default=None,
                    help="KV offload tier per replica in tokens, e.g. 0,480000 (0: none; "
                         "bench/routing_matrix_tiers.toml is the host-tier matrix)")
    ap.add_argument("--seeds", type=_list(int), default=None, help="e.g. 0,1,2")
    ap.add_argument("--policies", type=_list(str), default=None, help="policies to run (must hold the candidate)")
    ap.add_argument("--requests-per-replica", type=int, default=None)
    ap.add_argument("--load-report-interval-ms", type=float, default=None,
                    help="how often replicas' load reports reach the balancer (default: a live replica's 100 ms; "
                         "0: after every step, as before 2026-12-07)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPU count)")
    ap.add_argument("--out", default="results/bench_routing", help="folder for sweep.md and sweep.json")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.workloads:
            names = {w.name for w in spec.workloads}
            if set(args.workloads) - names:
                raise ValueError(f"unknown workloads {sorted(set(args.workloads) - names)}; the spec has {sorted(names)}")
            spec = dataclasses.replace(spec, workloads=tuple(w for w in spec.workloads if w.name in args.workloads))
        overrides = {k: v for k, v in (("replicas", args.replicas), ("loads", args.loads), ("kv_tokens", args.kv_tokens),
                                       ("seeds", args.seeds), ("policies", args.policies),
                                       ("host_kv_tokens", args.host_kv_tokens),
                                       ("requests_per_replica", args.requests_per_replica)) if v}
        if args.load_report_interval_ms is not None:
            overrides["load_report_interval_s"] = args.load_report_interval_ms / 1e3
        spec = dataclasses.replace(spec, **overrides)
    except (OSError, ValueError) as e:
        print(f"bench_routing: {e}", file=sys.stderr)
        return 2
    info = machine()
    print(f"{len(spec.cells())} cells × {len(spec.policies)} policies; machine: "
          + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    def progress(done, total, cell, policy, elapsed):
        if done == total or done % max(1, total // 20) == 0:
            print(f"  {done}/{total} runs, {elapsed:.0f} s", flush=True)

    out = run_sweep(spec, args.jobs, progress)
    out["machine"] = info
    print()
    print(sweep_table(out))
    paths = write_sweep(out, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
