"""Measure the torch engine's step times on this machine (whole engine steps, plus the live
loop's turnaround between steps) and fit the simulator's step-time model to them; print the fit
error and write a preset file for `kvfleet replica --engine sim --preset-file FILE` and
`kvfleet simulate --preset-file FILE`. Example:

    kvfleet calibrate --model tiny --threads 1 --out results/tiny-cpu.json
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="model preset to measure")
    p.add_argument("--threads", type=int, default=1, help="torch threads (use what the replicas will use)")
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks of the measured engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk size while measuring")
    p.add_argument("--max-num-seqs", type=int, default=32, help="batch limit while measuring")
    p.add_argument("--requests", type=int, default=120, help="requests in the measured workload")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--out", default="results/step-model.json", help="where to write the fitted preset")


def run(args: argparse.Namespace) -> int:
    from replica.calibrate import calibrate, save
    from replica.config import EngineConfig

    try:
        cfg = EngineConfig(model=args.model, threads=args.threads, num_blocks=args.num_blocks,
                           max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    except ValueError as e:
        print(f"kvfleet calibrate: {e}", file=sys.stderr)
        return 2
    model, report = calibrate(cfg, args.requests, args.seed)
    print(f"measured {report['steps']} steps of the {args.model} engine with {args.threads} thread(s)")
    from replica.step_model import FEATURES

    for name in FEATURES:
        print(f"  {name:20s} {getattr(model, name):.4g} s")
    for part in ("fit", "holdout"):
        e = report[part]
        print(f"  {part:8s} median relative error {100 * e['median_rel_error']:.1f} %, "
              f"p90 {100 * e['p90_rel_error']:.1f} %")
    print(f"  median step {1e3 * report['median_step_s']:.2f} ms, of which outside execute "
          f"{1e3 * report['median_outside_execute_s']:.2f} ms; live loop turnaround "
          f"{1e3 * report['loop_turnaround_s']:.2f} ms per step (added to base)")
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save(args.out, model, cfg, report)
    print(f"wrote {args.out}")
    return 0
