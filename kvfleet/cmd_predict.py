"""Evaluate output-length predictors on a trace, online: each request is predicted before its
output is observed, in arrival order (optionally observed only --delay requests later, as a
balancer learns a length only when the request ends). Prints MAE, median relative error,
Kendall tau, log2-bucket accuracy and p10-p90 coverage beside the global-median baseline, for
all requests and for those whose prefix was seen before; writes LABEL.json and LABEL.md.

Predictors: global_median, max_tokens, prefix_history, online_regressor, ensemble. Without
--trace, --generate builds one of kvfleet's own workloads (agentic, chat: loadgen's generator;
tenant-skewed: one output profile per tenant). Examples:

    kvfleet predict eval --trace ../shared/traces/mooncake_synthetic.jsonl
    kvfleet predict eval --trace ../shared/traces/azure2023_code.csv --predictors prefix_history,ensemble \\
        --max-requests 5000 --delay 32
    kvfleet predict eval --generate tenant-skewed --num-requests 3000 --tenants 6 --seed 1
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_D = "kvfleet predict"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from loadgen.traces import FORMATS
    from predictors import predictor_names
    from predictors.evaluate import DEFAULT_PREDICTORS
    from predictors.workloads import KINDS

    sub = p.add_subparsers(dest="predict_action", metavar="{eval}")
    ev = sub.add_parser("eval", help="online evaluation of predictors over a trace",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", default=None, help="trace file (mooncake, azure, burstgpt, bailian, sharegpt)")
    src.add_argument("--generate", default=None, choices=KINDS, help="evaluate on a generated workload instead")
    ev.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="trace format")
    ev.add_argument("--predictors", default=",".join(DEFAULT_PREDICTORS),
                    help=f"comma-separated, any of: {', '.join(predictor_names())} (global_median is always added)")
    ev.add_argument("--max-requests", type=int, default=None, help="use only the first N requests")
    ev.add_argument("--delay", type=int, default=0,
                    help="observe each request's length only after N later requests were predicted")
    ev.add_argument("--num-requests", type=int, default=3000, help="--generate: requests")
    ev.add_argument("--tenants", type=int, default=6, help="--generate: tenants")
    ev.add_argument("--seed", type=int, default=0, help="--generate: seed")
    ev.add_argument("--no-tenant-labels", action="store_true",
                    help="--generate: drop tenant names (only the prompt's blocks tell tenants apart)")
    ev.add_argument("--out", default="results/predict", help="folder for LABEL.json and LABEL.md")
    ev.add_argument("--label", default=None, help="file name stem (default: the trace's or workload's name)")


def _err(msg: str) -> int:
    print(f"{_D}: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if getattr(args, "predict_action", None) != "eval":
        return _err("give a sub-command: `kvfleet predict eval --trace FILE` (see --help)")
    from loadgen.traces import load_trace
    from predictors.evaluate import EvalConfig, evaluate_trace, table, write
    from predictors.workloads import workload

    try:
        cfg = EvalConfig(tuple(p.strip() for p in args.predictors.split(",") if p.strip()), args.delay,
                         args.max_requests)
        if args.trace:
            trace = load_trace(args.trace, args.format)
            label = args.label or Path(args.trace).stem
            where = args.trace
        else:
            trace = workload(args.generate, args.num_requests, args.tenants, args.seed,
                             tenant_labels=not args.no_tenant_labels)
            label = args.label or f"{args.generate}-seed{args.seed}" + ("-unlabelled" if args.no_tenant_labels else "")
            where = f"generated {args.generate} workload (seed {args.seed}, {args.tenants} tenants)"
    except (OSError, ValueError) as e:
        return _err(str(e))
    if not trace:
        return _err("the trace has no requests")
    result = evaluate_trace(trace, cfg)
    result["trace"] = where
    print(f"{where}: {result['requests']} requests, {result['with_history']} with prefix history\n")
    print(table(result))
    paths = write(result, args.out, re.sub(r"[^A-Za-z0-9_.-]+", "_", label))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m kvfleet.cmd_predict eval ...` (the same as `kvfleet predict eval ...`)."""
    parser = argparse.ArgumentParser(prog="kvfleet predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
