"""Two tenants, one flooding: does the other keep its TTFT? (issue #17 part 4)

A live fleet of sim replicas (`kvfleet replica --engine sim`, slowed by `--time-scale` so this
2-core machine keeps up) behind the real balancer, three runs with the same arrivals:

    alone  tenant A at --load-a of the fleet's capacity, nothing else (balancer with --fairness)
    fifo   A + tenant B flooding at --flood times the capacity, the guard's FIFO admission queue
           (--max-inflight-per-replica, the same capacity, --admission-timeout)
    fair   the same, the fair admission queue (--fairness: classes A and B, equal weights and
           priority, B with a TTFT target so it is shed early)

Capacity = --slots requests in flight per replica; one request's service time is measured alone
first (prompt --prompt tokens, the first --shared of them shared within a tenant, --output
tokens out). Prints per run and class: requests, shed (429), other failures, p50/p99 TTFT,
goodput; for the fair run the balancer's own view: A's shed count, B's measured queue wait, the
calibration factor, the share of B's admitted requests that missed B's target, and the decision
audit's mismatch/unseen counters (issue #17 part 1's alarm).

    .venv/bin/python bench/bench_fairness.py                      # ~4 min
    .venv/bin/python bench/bench_fairness.py --duration 60 --time-scale 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, table  # noqa: E402
from kvfleet.fleet import FleetSpec, LocalFleet  # noqa: E402
from loadgen.client import LoadConfig, run_load_sync  # noqa: E402
from loadgen.metrics import summarize  # noqa: E402
from loadgen.traces import TraceRequest  # noqa: E402

BLOCK = 16


def tenant_requests(name: str, rate: float, duration: float, args, seed: int, first_id: int) -> list[TraceRequest]:
    """Poisson arrivals at `rate` for `duration` s: a prompt whose first `shared` tokens are the
    tenant's own system prompt, the rest unique."""
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * duration))
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    times = times[times < duration]
    shared = tuple(range(first_id, first_id + args.shared // BLOCK))
    blocks = args.prompt // BLOCK
    out = []
    for i, t in enumerate(times):
        own = tuple(first_id + 1000 + i * blocks + k for k in range(blocks - len(shared)))
        out.append(TraceRequest(arrival_s=float(t), input_length=args.prompt, output_length=args.output,
                                hash_ids=shared + own, hash_block_tokens=BLOCK, tenant=name))
    return out


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _max_bucket(text: str, klass: str) -> str:
    """The smallest `le` bound of the class's queue-wait histogram that holds every wait."""
    total = _metric(text, "kvfleet_fairness_queue_wait_seconds_count", **{"class": klass})
    for line in text.splitlines():
        if line.startswith("kvfleet_fairness_queue_wait_seconds_bucket{") and f'class="{klass}"' in line:
            if float(line.rsplit(" ", 1)[1]) >= total:
                return line.split('le="', 1)[1].split('"', 1)[0]
    return "-"


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def run(fleet: LocalFleet, balancer_args: tuple[str, ...], reqs: list[TraceRequest], args
        ) -> tuple[dict, str, list[str]]:
    """One run on a fresh balancer (and empty replica caches): (summary, /metrics, the audit's
    warnings among the balancer's last log lines)."""
    fleet.stop_balancer()
    fleet.reset_caches()
    fleet.spec = replace(fleet.spec, balancer_args=balancer_args)
    fleet.start_balancer(fleet.spec.policy, port=0)
    cfg = LoadConfig(model="tiny", class_header="X-Kvfleet-Class", progress=False, request_timeout_s=600)
    result = run_load_sync(fleet.balancer.url, reqs, cfg)
    summary = summarize(result, percentiles=(50, 99), goodput={"ttft": args.target_a * 1000})
    summary["slowest_a_ttft_ms"] = sorted((round(r.ttft_s * 1000) for r in result.records
                                           if r.tenant == "A" and r.ttft_s is not None), reverse=True)[:5]
    metrics = _get(fleet.balancer.url + "/metrics")
    warnings = [line for line in fleet.balancer.log if "cache mismatch" in line]  # the audit's alarm
    return summary, metrics, warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4, help="capacity: requests in flight per replica")
    ap.add_argument("--time-scale", type=float, default=0.1, help="sim replicas run this many times the GPU's speed")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--shared", type=int, default=256, help="prompt tokens shared within a tenant")
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--load-a", type=float, default=0.3, help="tenant A's rate as a share of the capacity")
    ap.add_argument("--flood", type=float, default=3.0, help="tenant B's rate as a multiple of the capacity")
    ap.add_argument("--target-a", type=float, default=5.0, help="class A's TTFT target, s (goodput SLO)")
    ap.add_argument("--target-b", type=float, default=3.0, help="class B's TTFT target, s (it is shed beyond)")
    ap.add_argument("--fifo-timeout", type=float, default=15.0, help="the FIFO queue's admission timeout, s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    spec = FleetSpec(replicas=args.replicas, engine="sim", balancer_port=0,
                     replica_args=("--preset", "llama3-8b-h100", "--time-scale", str(args.time_scale),
                                   "--log-level", "warning"))
    classes = ("--fair-class", f"A,ttft={args.target_a:g}", "--fair-class", f"B,ttft={args.target_b:g}")
    quiet = ("--log-level", "warning")  # the audit's warnings still show
    fair = (*quiet, "--fairness", "--fair-max-inflight-per-replica", str(args.slots), *classes)
    fifo = (*quiet, "--max-inflight-per-replica", str(args.slots), "--admission-queue", "100000",
            "--admission-timeout", str(args.fifo_timeout))
    t_start = time.time()
    out: dict = {"machine": machine(), "args": vars(args), "runs": {}}
    with LocalFleet(spec) as fleet:
        # One request's service time alone, to size the loads from the capacity.
        probe = tenant_requests("A", 1.0, 5.0, args, args.seed + 99, 50_000)[:5]
        probe = [replace(r, arrival_s=i * 2.0) for i, r in enumerate(probe)]
        s, _, _ = run(fleet, fair, probe, args)
        service_s = s["mean_e2el_ms"] / 1000.0
        capacity = args.slots * args.replicas / service_s
        rate_a, rate_b = args.load_a * capacity, args.flood * capacity
        out.update(service_s=service_s, capacity_rps=capacity, rate_a=rate_a, rate_b=rate_b)
        print(f"service {service_s * 1000:.0f} ms alone -> capacity {capacity:.2f} req/s; A {rate_a:.2f} req/s, "
              f"B {rate_b:.2f} req/s, {args.duration:g} s each", file=sys.stderr)
        a = tenant_requests("A", rate_a, args.duration, args, args.seed, 0)
        b = tenant_requests("B", rate_b, args.duration, args, args.seed + 1, 500_000)
        both = sorted(a + b, key=lambda r: r.arrival_s)
        for name, bargs, reqs in (("alone", fair, a), ("fifo", fifo, both), ("fair", fair, both)):
            print(f"run {name}: {len(reqs)} requests", file=sys.stderr)
            summary, metrics, warnings = run(fleet, bargs, reqs, args)
            view = {
                "a_shed": _metric(metrics, "kvfleet_fairness_shed_requests_total", **{"class": "A"}),
                "b_shed": _metric(metrics, "kvfleet_fairness_shed_requests_total", **{"class": "B"}),
                "b_admitted": _metric(metrics, "kvfleet_fairness_admitted_requests_total", **{"class": "B"}),
                "b_wait_mean_s": (_metric(metrics, "kvfleet_fairness_queue_wait_seconds_sum", **{"class": "B"})
                                  / max(1.0, _metric(metrics, "kvfleet_fairness_queue_wait_seconds_count",
                                                     **{"class": "B"}))),
                "a_wait_over_100ms": (_metric(metrics, "kvfleet_fairness_queue_wait_seconds_count", **{"class": "A"})
                                      - _metric(metrics, "kvfleet_fairness_queue_wait_seconds_bucket",
                                                **{"class": "A", "le": "0.1"})),
                "a_wait_max_bucket": _max_bucket(metrics, "A"),
                "b_good": _metric(metrics, "kvfleet_fairness_goodput_requests_total", **{"class": "B"}),
                "calibration": _metric(metrics, "kvfleet_fairness_estimate_calibration"),
                "drain_tok_s": _metric(metrics, "kvfleet_fairness_drain_rate_tokens_per_second"),
                "cache_mismatch": _metric(metrics, "kvfleet_cache_mismatch_total"),
                "cache_unseen": _metric(metrics, "kvfleet_cache_unseen_total"),
                "cache_accounted": _metric(metrics, "kvfleet_cache_accounted_requests_total"),
            }
            out["runs"][name] = {"summary": summary, "balancer": view, "audit_warnings": warnings[:3]}
    out["wall_s"] = time.time() - t_start

    rows = []
    for name, r in out["runs"].items():
        for k, c in r["summary"]["classes"].items():
            rows.append([name, k, c["requests"], c["shed"], c["failed"], c["completed"], round(c["p50_ttft_ms"]),
                         round(c["p99_ttft_ms"]), round(c["good_share"], 3)])
    print(f"machine: {out['machine']}")
    print(f"{args.replicas} sim replicas (llama3-8b-h100 at time scale {args.time_scale:g}), {args.slots} slots each; "
          f"service {out['service_s'] * 1000:.0f} ms; capacity {out['capacity_rps']:.2f} req/s; "
          f"A {out['rate_a']:.2f} req/s, B {out['rate_b']:.2f} req/s; {args.duration:g} s per run; "
          f"wall {out['wall_s']:.0f} s")
    print(table(["run", "class", "requests", "shed 429", "failed", "completed", "p50 TTFT ms", "p99 TTFT ms",
                 f"share within A's {args.target_a:g} s"], rows))
    alone = out["runs"]["alone"]["summary"]["classes"]["A"]["p99_ttft_ms"]
    for name in ("fifo", "fair"):
        p99 = out["runs"][name]["summary"]["classes"]["A"]["p99_ttft_ms"]
        print(f"{name}: A's p99 TTFT {p99:.0f} ms = {p99 / alone:.2f} x alone ({alone:.0f} ms); goal <= 1.20")
    v = out["runs"]["fair"]["balancer"]
    missed = 1 - v["b_good"] / v["b_admitted"] if v["b_admitted"] else float("nan")
    print(f"fair: A's slowest TTFTs {out['runs']['fair']['summary']['slowest_a_ttft_ms']} ms (alone "
          f"{out['runs']['alone']['summary']['slowest_a_ttft_ms']}); A's queue waits over 100 ms: "
          f"{v['a_wait_over_100ms']:.0f}, all within {v['a_wait_max_bucket']} s")
    print(f"fair: A shed {v['a_shed']:.0f}; B shed {v['b_shed']:.0f}, admitted {v['b_admitted']:.0f} "
          f"(mean queue wait {v['b_wait_mean_s']:.2f} s, {missed:.1%} of them past B's {args.target_b:g} s target); "
          f"calibration {v['calibration']:.2f}, drain {v['drain_tok_s']:.0f} tok/s; cache audit: "
          f"{v['cache_mismatch']:.0f} mismatch, {v['cache_unseen']:.0f} unseen of {v['cache_accounted']:.0f}")
    for name in ("alone", "fifo"):
        w = out["runs"][name]["balancer"]
        print(f"{name}: cache audit {w['cache_mismatch']:.0f} mismatch, {w['cache_unseen']:.0f} unseen of "
              f"{w['cache_accounted']:.0f}")
    for name, r in out["runs"].items():
        for line in r["audit_warnings"]:
            print(f"{name}: audit warning: {line[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
