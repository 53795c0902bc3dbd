"""Why a policy wins or loses one simulated cell: its decisions, its estimates and the outcome.

Runs one policy on one trace in the simulator (as `kvfleet simulate` does) and reports what the
summary table cannot show: how often it left a replica that held a longer cached prefix (and
the cost terms on both sides when it did), how many prompt tokens were matchable at routing
time, how its TTFT estimate compared with the TTFT delivered (by prompt length, and for
requests that were later preempted), TPOT by prompt and output length, preemptions, and how
evenly requests were spread. Issue #15's Mooncake-32 diagnosis (docs/benchmarks.md) came from:

    .venv/bin/python bench/diagnose_cell.py --policy predictive
    .venv/bin/python bench/diagnose_cell.py --policy precise_prefix
    .venv/bin/python bench/diagnose_cell.py --policy predictive --option prefill_stall=true

Defaults: the Mooncake synthetic trace's first 2,000 requests, 32 Llama-3-8B H100 replicas,
120k KV tokens each, load 0.8, seed 0, 100 ms load reports. Policy terms are printed for
policies whose decisions carry numeric scores (predictive's: cost, ttft, behind, others, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen.traces import load_trace  # noqa: E402
from predictors.adapter import balancer_predictor  # noqa: E402
from replica.step_model import PRESETS, get_preset  # noqa: E402
from simulator.fleet import MODEL, FleetConfig, FleetSimulation  # noqa: E402
from simulator.run import SimulateConfig, offered_load, rescale, sim_requests  # noqa: E402

BUCKETS = ((0, 4000), (4000, 16000), (16000, 64000), (64000, 10**9))
BLOCK = 16


def parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option wants KEY=VALUE (a JSON value), e.g. others_weight=0.5; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="predictive", help="the policy to diagnose (default: predictive)")
    ap.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                    help="a policy setting (JSON value), repeatable, e.g. --option others_weight=0.5")
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "mooncake_synthetic.jsonl"),
                    help="trace file (any format `kvfleet simulate` reads)")
    ap.add_argument("--generate", choices=("chat", "agentic", "hot"), default=None,
                    help="instead of --trace, the routing matrix's generated workload of this kind "
                         "(session_rate 1, 8 tenants, burstiness 0.5, seeded by --seed), as bench/routing_matrix.toml")
    ap.add_argument("--requests", type=int, default=2000, help="the trace's first N requests (default: 2000)")
    ap.add_argument("--replicas", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=120_000, help="KV tokens per replica (default: 120000)")
    ap.add_argument("--load", type=float, default=0.8, help="utilisation the arrival rate is scaled to")
    ap.add_argument("--seed", type=int, default=0, help="seed for the prompts' contents")
    ap.add_argument("--preset", default="llama3-8b-h100", choices=sorted(PRESETS))
    ap.add_argument("--predictor", default="ensemble", help="output-length predictor, none, or oracle")
    ap.add_argument("--load-report-interval-ms", type=float, default=100.0)
    ap.add_argument("--per-replica", action="store_true",
                    help="also print each replica's requests, prompt tokens, hit rate and preemptions")
    args = ap.parse_args(argv)
    if args.generate:
        from loadgen.generate import GenerateConfig, generate

        trace = generate(GenerateConfig(kind=args.generate, session_rate=1.0, tenants=8, burstiness=0.5,
                                        num_requests=args.requests, seed=args.seed))
        args.trace, prompt_seed = f"generated {args.generate}", 0  # as simulator.sweep.cell_trace
    elif not Path(args.trace).exists():
        ap.error(f"no trace at {args.trace}; pass --trace with a path to a trace file, or --generate chat")
    else:
        trace, prompt_seed = load_trace(args.trace)[:args.requests], args.seed
    t0 = trace[0].arrival_s
    trace = [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in trace]
    preset = get_preset(args.preset)
    cfg = SimulateConfig(args.replicas, preset, (args.policy,), kv_blocks=args.kv_tokens // BLOCK, load=args.load,
                         seed=prompt_seed, predictor=args.predictor,
                         load_report_interval_s=args.load_report_interval_ms / 1e3)
    reqs = sorted(sim_requests(trace, prompt_seed), key=lambda r: r.arrival_s)
    util, _ = offered_load(reqs, cfg)
    reqs = rescale(reqs, util / args.load)
    predictor = None if args.predictor == "oracle" else balancer_predictor(args.predictor, MODEL)
    fleet = FleetSimulation(FleetConfig(args.replicas, preset, args.policy, tuple(args.option),
                                        kv_blocks=cfg.kv_blocks, seed=prompt_seed,
                                        oracle_lengths=args.predictor == "oracle",
                                        request_latency_s=cfg.request_latency_s,
                                        response_latency_s=cfg.response_latency_s, max_model_len=cfg.max_model_len,
                                        load_report_interval_s=cfg.load_report_interval_s), predictor=predictor)

    decisions: dict[str, tuple] = {}  # request id -> (best matched tokens, chosen matched, chosen terms, best terms)
    select = fleet.policy.select

    def recording_select(request, replicas):
        d = select(request, replicas)
        scores = d.scores() if callable(d.scores) else d.scores
        mb = request.matched_blocks
        best = max(mb, key=mb.get) if mb else d.replica_id
        decisions[request.request_id] = (mb.get(best, 0) * BLOCK, mb.get(d.replica_id, 0) * BLOCK,
                                         (scores or {}).get(d.replica_id), (scores or {}).get(best))
        return d

    fleet.policy.select = recording_select  # this run's policy object only
    res = fleet.run(reqs)
    recs = [r for r in res.records if r.finish is not None]
    ttft = np.array([r.ttft for r in recs])
    prompt = np.array([r.prompt_tokens for r in recs])
    tpot = np.array([r.tpot if r.tpot is not None else np.nan for r in recs])
    out_len = np.array([r.output_tokens for r in recs])
    preempted = np.array([r.preemptions > 0 for r in recs])
    hit = sum(r.cached_tokens for r in recs) / max(prompt.sum(), 1)
    print(f"{args.policy} {dict(args.option)} on {Path(args.trace).name}[:{args.requests}], {args.replicas} replicas, "
          f"{args.kv_tokens} KV tokens, load {args.load}, seed {args.seed}")
    print(f"TTFT mean {ttft.mean():.3f} s, median {np.median(ttft):.3f}, p99 {np.quantile(ttft, 0.99):.3f}; "
          f"TPOT mean {np.nanmean(tpot) * 1e3:.1f} ms, p90 {np.nanquantile(tpot, 0.9) * 1e3:.1f}; hit rate {hit:.3f}")
    share = np.array([sum(1 for r in recs if r.replica == rid) for rid in res.replica_ids]) / max(len(recs), 1)
    print(f"preempted requests {int(preempted.sum())}; share of requests per replica {share.min():.3f}–{share.max():.3f}")
    rows = list(decisions.values())
    off = [d for d in rows if d[0] > d[1] + 10 * BLOCK]
    print(f"decisions {len(rows)}; matchable tokens at routing time {sum(d[0] for d in rows)}; "
          f"left a replica holding >= {10 * BLOCK} more cached tokens: {len(off)} "
          f"({sum(d[0] - d[1] for d in off)} cached tokens given up)")
    numeric = [d for d in off if isinstance(d[2], dict) and isinstance(d[3], dict)]
    if numeric:
        print("  mean terms, chosen vs best-cached replica:")
        for k in numeric[0][2]:
            a, b = np.mean([d[2][k] for d in numeric]), np.mean([d[3][k] for d in numeric])
            print(f"    {k:16s} {a:12.4f} {b:12.4f}")
    est = {rid: d[2].get("ttft") for rid, d in decisions.items() if isinstance(d[2], dict)}
    print("by prompt tokens: n, TTFT mean, hit rate, TPOT mean ms" + (", estimated TTFT mean" if est else ""))
    for lo, hi in BUCKETS:
        m = (prompt >= lo) & (prompt < hi)
        if not m.any():
            continue
        cached = sum(r.cached_tokens for r, k in zip(recs, m) if k)
        line = (f"  {lo}-{hi if hi < 10**9 else 'inf'}: {int(m.sum())}, {ttft[m].mean():.3f}, "
                f"{cached / prompt[m].sum():.3f}, {np.nanmean(tpot[m]) * 1e3:.1f}")
        e = [est.get(str(r.index)) for r, k in zip(recs, m) if k]
        if est and all(x is not None for x in e):
            line += f", {np.mean(e):.3f}"
        print(line)
    for lo, hi in ((0, 50), (50, 200), (200, 10**9)):
        m = (out_len >= lo) & (out_len < hi) & ~np.isnan(tpot)
        if m.any():
            print(f"  output {lo}-{hi if hi < 10**9 else 'inf'} tokens: {int(m.sum())} requests, TPOT mean {np.nanmean(tpot[m]) * 1e3:.1f} ms")
    for name, m in (("preempted", preempted), ("not preempted", ~preempted)):
        if m.any():
            e = [est.get(str(r.index)) for r, k in zip(recs, m) if k]
            err = (f", TTFT - estimate mean {np.mean([r.ttft - x for r, x in zip([r for r, k in zip(recs, m) if k], e)]):+.3f} s"
                   if est and all(x is not None for x in e) else "")
            print(f"  {name}: {int(m.sum())} requests, TPOT mean {np.nanmean(tpot[m]) * 1e3:.1f} ms{err}")
    if args.per_replica:
        print("replica: requests, of which prompts >= 16k, prompt Mtokens, hit rate, preempted, mean TTFT")
        for rid in sorted(res.replica_ids, key=lambda x: -sum(1 for r in recs if r.replica == x)):
            mine = [r for r in recs if r.replica == rid]
            p = sum(r.prompt_tokens for r in mine)
            print(f"  {rid}: {len(mine)}, {sum(1 for r in mine if r.prompt_tokens >= 16000)}, {p / 1e6:.2f}, "
                  f"{sum(r.cached_tokens for r in mine) / max(p, 1):.3f}, {sum(1 for r in mine if r.preemptions)}, "
                  f"{np.mean([r.ttft for r in mine]) if mine else 0:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
