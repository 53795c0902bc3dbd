"""Why a policy wins or loses one cell of a routing sweep: its decisions, estimates and outcome.

Runs one policy on one cell of a sweep file (the same requests, fleet and settings as
`kvfleet simulate --sweep` gives that cell, so the headline figures equal the sweep's row) and
reports what the sweep table cannot show: how often it left a replica that held a longer cached
prefix (and the cost terms on both sides when it did), how many prompt tokens were matchable at
routing time, how its TTFT estimate compared with the TTFT delivered (by prompt length, and for
requests that were later preempted), TPOT by prompt and output length, preemptions, and how
evenly requests were spread. Issue #15's diagnoses (docs/benchmarks.md) came from:

    .venv/bin/python bench/diagnose_cell.py --policy predictive --per-replica
    .venv/bin/python bench/diagnose_cell.py --policy precise_prefix
    .venv/bin/python bench/diagnose_cell.py --workload chat --replicas 8 --seed 1 --policy llmd_scorer

Defaults: bench/routing_matrix.toml's Mooncake cell with 32 replicas, 120k KV tokens each, load
0.8, seed 0. Policy terms are printed for policies whose decisions carry numeric scores
(predictive's: cost, ttft, behind, others, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.fleet import FleetSimulation  # noqa: E402
from bench.common import load_sweep_spec  # noqa: E402
from simulator.run import fleet_config, make_predictor, replayed, summarize  # noqa: E402
from simulator.sweep import BLOCK_TOKENS as BLOCK, Cell, cell_config  # noqa: E402

BUCKETS = ((0, 4000), (4000, 16000), (16000, 64000), (64000, 10**9))


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
    ap.add_argument("--spec", default=str(ROOT / "bench" / "routing_matrix.toml"),
                    help="sweep file the cell is taken from (default: bench/routing_matrix.toml)")
    ap.add_argument("--workload", default="mooncake", help="a workload name of the sweep file (default: mooncake)")
    ap.add_argument("--replicas", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=120_000, help="KV tokens per replica (default: 120000)")
    ap.add_argument("--load", type=float, default=0.8, help="utilisation the arrival rate is scaled to")
    ap.add_argument("--seed", type=int, default=0, help="the cell's seed (trace window or generated workload)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests in the cell (default: the sweep file's requests_per_replica x replicas, capped)")
    ap.add_argument("--policy", default="predictive", help="a policy, or a variant label of the sweep file")
    ap.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                    help="a policy setting (JSON value), repeatable, e.g. --option others_weight=0.5")
    ap.add_argument("--per-replica", action="store_true",
                    help="also print each replica's requests, prompt tokens, hit rate and preemptions")
    ap.add_argument("--tail", type=int, default=0, metavar="N",
                    help="also print the N slowest requests (by TTFT): prompt and cached tokens, the replica, "
                         "the estimate at routing time and the chosen replica's cost terms")
    args = ap.parse_args(argv)
    spec, workloads = load_sweep_spec(ap, args.spec, "bench/routing_matrix.toml")
    if args.workload not in workloads:
        ap.error(f"no workload {args.workload!r} in {args.spec}; choose one of {sorted(workloads)}")
    requests = args.requests or min(spec.requests_per_replica * args.replicas, spec.max_requests)
    cell = Cell(workloads[args.workload], args.replicas, args.load, args.kv_tokens, args.seed, requests)
    trace, cfg = cell_config(spec, cell, args.policy, tuple(args.option))
    name = cfg.policies[0]
    # As simulate() replays it: prompts materialised once, arrivals scaled to the cell's load.
    reqs = replayed(trace, cfg)[0]
    fleet = FleetSimulation(fleet_config(cfg, name), predictor=make_predictor(cfg))

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
    summary = summarize(res, cfg)
    share = summary["replica_share"].values()
    print(f"{args.policy} {dict(cfg.policy_options).get(name, ())} on {args.workload}, {args.replicas} replicas, "
          f"{args.kv_tokens} KV tokens, load {args.load}, seed {args.seed}, {requests} requests")
    print(f"TTFT mean {summary['mean_ttft_s']:.3f} s, median {summary['median_ttft_s']:.3f}, "
          f"p99 {summary['p99_ttft_s']:.3f}; TPOT mean {summary['mean_tpot_s'] * 1e3:.1f} ms, "
          f"p90 {np.nanquantile(tpot, 0.9) * 1e3:.1f}; hit rate {summary['cache_hit_rate']:.3f}")
    print(f"preempted requests {int(preempted.sum())}; share of requests per replica {min(share):.3f}–{max(share):.3f}")
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
    if args.tail:
        print(f"the {args.tail} slowest requests: index, arrival s, replica, prompt, cached, matched at routing "
              f"(chosen/best), TTFT, estimate, terms")
        for r in sorted(recs, key=lambda r: -r.ttft)[:args.tail]:
            d = decisions.get(str(r.index))
            terms = d[2] if d and isinstance(d[2], dict) else {}
            est_s = f"{terms['ttft']:.3f}" if "ttft" in terms else "-"
            shown = ", ".join(f"{k}={v:.3g}" for k, v in terms.items() if k != "ttft")
            print(f"  {r.index} {r.arrival:.2f} {r.replica} {r.prompt_tokens} {r.cached_tokens} "
                  f"{d[1] if d else '-'}/{d[0] if d else '-'} {r.ttft:.3f} {est_s} {shown}")
            if d and d[0] > d[1] and isinstance(d[3], dict):
                print("      best-cached replica's terms: " + ", ".join(f"{k}={v:.3g}" for k, v in d[3].items()))
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
