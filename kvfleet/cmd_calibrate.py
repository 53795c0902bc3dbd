"""Fit the simulator's step-time model to the torch engine on this machine; print the fit error
and write a preset file for `kvfleet replica --engine sim --preset-file FILE` and
`kvfleet simulate --preset-file FILE`. Two ways to measure:

- `--mode served` (default): start a torch replica, send it streaming requests over HTTP, and
  fit to what each step costs the serving replica, start to next start (its server's work on
  the loop competes with the step for the GIL and the cores) — what a live sim replica
  reproduces. See replica/calibrate_served.py.
- `--mode engine`: time whole engine steps in this process, no server, plus the live loop's
  turnaround (replica/calibrate.py). Less noisy, but misses the server's per-token cost.

Example:

    kvfleet calibrate --model tiny --threads 1 --out results/tiny-cpu.json
"""

from __future__ import annotations

import argparse
import sys

MODES = ("served", "engine")
DEFAULT_REQUESTS = {"served": 240, "engine": 120}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="served",
                   help="served: steps of a torch replica serving streaming HTTP requests; "
                        "engine: engine steps in this process, no server")
    p.add_argument("--model", default="tiny", help="model preset to measure")
    p.add_argument("--threads", type=int, default=1, help="torch threads (use what the replicas will use)")
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks of the measured engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk size while measuring")
    p.add_argument("--max-num-seqs", type=int, default=32, help="batch limit while measuring")
    p.add_argument("--requests", type=int, default=None,
                   help=f"requests in the measured workload (default: served {DEFAULT_REQUESTS['served']}, "
                        f"engine {DEFAULT_REQUESTS['engine']})")
    p.add_argument("--passes", type=int, default=5,
                   help="served: measure in this many passes (the requests split between them); each pass is "
                        "checked against the model of the others, and a disturbed one is measured again")
    p.add_argument("--retries", type=int, default=2,
                   help="served: how many times in all a disturbed pass may be measured again (0: never); one "
                        "still disturbed after that is left out of the fit")
    p.add_argument("--retry-wait", type=float, default=10.0,
                   help="served: seconds to wait before measuring a disturbed pass again (doubled each time)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--out", default="results/step-model.json", help="where to write the fitted preset")


def run(args: argparse.Namespace) -> int:
    from replica.config import EngineConfig
    from replica.model_config import ModelConfig

    requests = DEFAULT_REQUESTS[args.mode] if args.requests is None else args.requests
    try:
        if requests < 10:
            raise ValueError(f"--requests must be at least 10 to fit the model, got {requests}")
        if args.passes < 1 or args.retries < 0 or args.retry_wait < 0:
            raise ValueError(f"--passes must be at least 1, --retries and --retry-wait non-negative, got "
                             f"{args.passes}, {args.retries} and {args.retry_wait}")
        if args.mode == "served" and requests < 10 * args.passes:
            raise ValueError(f"--requests ({requests}) must be at least 10 per pass ({args.passes} passes)")
        ModelConfig.from_preset(args.model)  # an unknown name fails here, not in a subprocess
        cfg = EngineConfig(model=args.model, threads=args.threads, num_blocks=args.num_blocks,
                           max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    except ValueError as e:
        print(f"kvfleet calibrate: {e}", file=sys.stderr)
        return 2
    try:
        if args.mode == "served":
            from replica.calibrate_served import calibrate_served

            model, report = calibrate_served(cfg, requests, args.seed, passes=args.passes, retries=args.retries,
                                             progress=lambda msg: print(f"kvfleet calibrate: {msg}", flush=True),
                                             retry_wait_s=args.retry_wait)
        else:
            from replica.calibrate import calibrate

            model, report = calibrate(cfg, requests, args.seed)
    except (RuntimeError, ValueError) as e:
        print(f"kvfleet calibrate: {e}", file=sys.stderr)
        return 1
    where = "a serving replica" if args.mode == "served" else "the engine in-process"
    print(f"measured {report['steps']} steps of the {args.model} engine with {args.threads} thread(s), {where}")
    from replica.step_model import FEATURES

    for name in FEATURES:
        print(f"  {name:20s} {getattr(model, name):.4g} s")
    for part in ("fit", "holdout"):
        e = report[part]
        print(f"  {part:8s} median relative error {100 * e['median_rel_error']:.1f} %, "
              f"p90 {100 * e['p90_rel_error']:.1f} %")
    if args.mode == "served":
        for p in report["passes"]:
            again = report["repeated_passes"].count(p["index"])
            print(f"  pass {p['index'] + 1}: {p['steps']} steps, against the other passes' model median error "
                  f"{100 * p['error']:.1f} %, {'slower' if p['bias'] >= 0 else 'faster'} by {100 * abs(p['bias']):.1f} %"
                  f"{f', measured {again + 1} times' if again else ''}"
                  f"{'' if p['kept'] else ', left out (disturbed)'}")
        print(f"  median step {1e3 * report['median_step_s']:.2f} ms, start to next start while busy "
              f"(server included)")
    else:
        print(f"  median step {1e3 * report['median_step_s']:.2f} ms, of which outside execute "
              f"{1e3 * report['median_outside_execute_s']:.2f} ms; live loop turnaround "
              f"{1e3 * report['loop_turnaround_s']:.2f} ms per step (added to base)")
    from replica.calibrate import NOISY_ERROR

    holdout = report["holdout"]["median_rel_error"]
    if holdout > NOISY_ERROR:  # the measurement was disturbed (quiet runs fit within 2-14 %)
        import os

        print(f"kvfleet calibrate: warning: the holdout error ({100 * holdout:.1f} %) is high — other work on "
              f"this machine was probably competing for its cores (load average now "
              f"{os.getloadavg()[0]:.1f}); re-run when it is quiet, or with more --requests",
              file=sys.stderr)
    from pathlib import Path

    from replica.calibrate import save

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save(args.out, model, cfg, report)
    print(f"wrote {args.out}")
    return 0
