"""How fast the simulator runs (issue #15: >= 300 simulated requests per second of wall per
policy on 8 replicas), and a fingerprint of what it simulated, to check a speed-up changed nothing.

Runs each policy on each cell of a sweep file exactly as `bench/diagnose_cell.py` (and the
sweep) runs it, times `FleetSimulation.run` alone (prompt materialisation and the arrival
rescaling are made once per cell, before the clock starts), and prints per run the requests per
second of wall (and of the process's CPU time, steadier on a shared machine) and a SHA-256 over every request record (replica, token counts, cached tokens,
first-token and finish times as exact floats, preemptions) and the step count: two runs
simulated the same thing iff their fingerprints agree.

    PYTHONPATH=$PWD taskset -c 1 .venv/bin/python bench/bench_sim_speed.py \\
        --spec bench/replicate_variants.toml --workloads chat,agentic,hot,mooncake \\
        --policies predictive,llmd_scorer --replicas 8 --load 0.9 --seed 3
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.fleet import FleetSimulation  # noqa: E402
from bench.common import load_sweep_spec  # noqa: E402
from simulator.run import fleet_config, make_predictor, replayed  # noqa: E402
from simulator.sweep import Cell, cell_config  # noqa: E402


def fingerprint(res) -> str:
    """SHA-256 of every record's outcome (floats by their exact repr) and the step count."""
    h = hashlib.sha256(f"steps={res.steps}".encode())
    for r in res.records:
        h.update(repr((r.index, r.arrival, r.replica, r.prompt_tokens, r.output_tokens, r.cached_tokens,
                       r.first_token, r.finish, r.predicted_cached_tokens, r.rejected, r.preemptions,
                       r.prefill_replica, r.transfer_s)).encode())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "bench" / "replicate_variants.toml"),
                    help="sweep file the cells are taken from (default: bench/replicate_variants.toml)")
    ap.add_argument("--workloads", default="chat,agentic,hot,mooncake",
                    help="comma-separated workload names of the sweep file")
    ap.add_argument("--policies", default="predictive,llmd_scorer", help="comma-separated policies or variant labels")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--kv-tokens", type=int, default=120_000, help="KV tokens per replica (default: 120000)")
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="runs per (cell, policy); the fastest is reported")
    args = ap.parse_args(argv)
    spec, workloads = load_sweep_spec(ap, args.spec, "bench/replicate_variants.toml")
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in workloads]
    if unknown:
        ap.error(f"no workload {unknown} in {args.spec}; choose among {sorted(workloads)}")
    requests = min(spec.requests_per_replica * args.replicas, spec.max_requests)
    print("| workload | policy | requests | steps | wall s | req/s | CPU s | req/CPU s | fingerprint |")
    print("|---|---|---|---|---|---|---|---|---|")
    total_req = total_wall = 0.0
    for wname in names:
        cell = Cell(workloads[wname], args.replicas, args.load, args.kv_tokens, args.seed, requests)
        reqs = None
        for policy in (p for p in args.policies.split(",") if p):
            trace, cfg = cell_config(spec, cell, policy)
            if reqs is None:  # the cell's requests, as diagnose_cell / simulate() replay them
                reqs = replayed(trace, cfg)[0]
            best, best_cpu, prints = float("inf"), float("inf"), set()
            for _ in range(args.repeat):
                fleet = FleetSimulation(fleet_config(cfg, cfg.policies[0]), predictor=make_predictor(cfg))
                t0, c0 = time.perf_counter(), time.process_time()
                res = fleet.run(reqs)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
                prints.add(fingerprint(res))
            if len(prints) != 1:
                print(f"# {wname} {policy}: runs differ ({sorted(prints)}): the simulation is not deterministic")
            total_req += len(reqs)
            total_wall += best
            print(f"| {wname} | {policy} | {len(reqs)} | {res.steps} | {best:.2f} | {len(reqs) / best:.0f} | "
                  f"{best_cpu:.2f} | {len(reqs) / best_cpu:.0f} | {sorted(prints)[0]} |", flush=True)
    print(f"all: {total_req:.0f} requests in {total_wall:.1f} s, {total_req / total_wall:.0f} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
