"""Faults under load (issue: reliability): what a client sees and how fast the index recovers.

For each fault in harness/chaos.py (kill -9 a replica mid-stream, SIGSTOP one for 5 s, cut a
replica's event stream for 3 s, restart the balancer, restart a replica) open-loop load runs
through a balancer in front of simulated replicas (`--engine sim --preset llama3-8b-h100`),
and the table says: requests sent, completed, continued on another replica (failed over),
retried before the first byte, errored explicitly (an HTTP error, an in-band error event, or a
refused connection), lost (no answer or a stream cut without an error: must be 0), how long the
fault lasted, seconds from the fault's end until the balancer's index equals every replica's
cache again (target: under 2 s), and the balancer's RSS and open descriptors before/after.

    .venv/bin/python bench/bench_faults.py [--duration 20] [--rate 10] [--rounds 1] [--out results/bench_faults.json]

The test suite runs the same scenarios, shorter (tests/test_faults.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from harness.chaos import FAULTS, HEADER, ChaosFleet, run_scenario  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per scenario")
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s (open loop, Poisson)")
    ap.add_argument("--fault-at", type=float, default=5.0, help="seconds into the load when the fault starts")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole list this many times")
    ap.add_argument("--faults", nargs="*", default=list(FAULTS), choices=FAULTS)
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    rows, raw, failed = [], [], []
    with ChaosFleet(replicas=args.replicas) as fleet:
        run_scenario(fleet, "cut_events", duration_s=4.0, rate=args.rate, fault_at_s=1.0, cut_s=0.5)  # warm-up
        for rnd in range(args.rounds):
            for fault in args.faults:
                r = run_scenario(fleet, fault, duration_s=args.duration, rate=args.rate, fault_at_s=args.fault_at,
                                 seed=rnd, log=lambda s: print(s, file=sys.stderr, flush=True))
                rows.append(r.row())
                raw.append({**r.__dict__})
                if r.lost or r.recovery_s is None or r.recovery_s > 2.0 or any(
                        v != "ok" for v in r.consistent_after.values()):
                    failed.append(fault)
                for line in r.error_detail[:5]:
                    print(f"  {fault}: {line}", file=sys.stderr)
    report(f"Faults under load: {args.replicas} sim replicas, {args.rate:g} req/s for {args.duration:g} s per "
           f"scenario, fault at {args.fault_at:g} s", HEADER, rows, out=args.out, extra={"scenarios": raw})
    if failed:
        print(f"\nFAILED (lost requests, or the index not consistent within 2 s): {failed}")
        return 1
    print("\nall scenarios: 0 lost, index consistent within 2 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
