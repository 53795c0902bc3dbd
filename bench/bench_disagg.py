"""Prefill/decode disaggregation against the same number of unified replicas (issue #19 part 3),
in the simulator: for each workload and load, the same requests (same arrival times: the load is
scaled for the unified fleet and kept for every variant) on N unified replicas routed by
`predictive`, and on P prefill + D decode replicas placed by the pair selector
(balancer/disagg.py) with the KV handed over on a modelled link (simulator/kv_link.py). Prints
TTFT and TPOT (mean, p99) per variant, the prefix-cache hit rate (of a split request: on its
prefill replica) and the mean hand-over time (prefill end to KV on the decode replica).

    .venv/bin/python bench/bench_disagg.py [--workloads chat,agentic,hot,mooncake] [--loads 0.6,0.9]
        [--ratios 2:6,4:4,6:2] [--replicas 8] [--requests 300] [--kv-links ib-ndr,tcp-25g] [--out results/disagg.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_multi_balancer import workload  # noqa: E402
from bench.common import report  # noqa: E402
from replica.step_model import get_preset  # noqa: E402
from simulator.fleet import FleetSimulation  # noqa: E402
from simulator.kv_link import get_link, preset_kv  # noqa: E402
from simulator.run import (SimulateConfig, fleet_config, make_predictor, offered_load, rescale, sim_requests,  # noqa: E402
                           summarize)


def ratios(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        p, _, d = item.partition(":")
        out.append((int(p), int(d)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="chat,agentic,hot,mooncake",
                    help="mooncake (../shared/traces) or the generated chat, agentic, hot")
    ap.add_argument("--loads", default="0.6,0.9", help="target utilisations of the unified fleet")
    ap.add_argument("--ratios", default="2:6,4:4,6:2",
                    help="prefill:decode replica counts; below --replicas in sum, the rest do both")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--preset", default="llama3-8b-h100")
    ap.add_argument("--kv-links", default="ib-ndr", help="comma-separated links the split fleets hand over on "
                                                         "(simulator/kv_link.py)")
    ap.add_argument("--kv-tokens", type=int, default=120_000, help="KV tokens per replica")
    ap.add_argument("--policy", default="predictive", help="the unified fleet's policy (and a split fleet's "
                                                          "for requests kept whole)")
    ap.add_argument("--out", default=None, help="JSON file for the table")
    args = ap.parse_args(argv)
    preset = get_preset(args.preset)
    kv_bytes, lanes = preset_kv(args.preset)
    links = [get_link(name) for name in args.kv_links.split(",")]
    variants = [(0, 0, links[0])] + [(p, d, link) for link in links for p, d in ratios(args.ratios)]
    for p, d, _ in variants[1:]:
        if p + d > args.replicas:
            ap.error(f"ratio {p}:{d} exceeds --replicas {args.replicas}")
    rows = []
    for wl in args.workloads.split(","):
        trace = workload(wl, args.requests)
        base = sim_requests(trace)
        base.sort(key=lambda r: r.arrival_s)
        for load in (float(x) for x in args.loads.split(",")):
            for p, d, link in variants:
                cfg = SimulateConfig(args.replicas, preset, (args.policy,), args.kv_tokens // 16, load,
                                     prefill_replicas=p, decode_replicas=d, kv_link=link, kv_bytes_per_token=kv_bytes,
                                     kv_lanes=lanes)
                util, _ = offered_load(base, cfg)  # the unified fleet's: the same arrivals for every variant
                reqs = rescale(base, util / load)
                res = FleetSimulation(fleet_config(cfg, args.policy), predictor=make_predictor(cfg)).run(reqs)
                s = summarize(res, cfg)
                dis = s.get("disagg", {})
                both = f"+{args.replicas - p - d} both" if p + d < args.replicas else ""
                rows.append([wl, load, f"{p}:{d}{both} {link.name}" if p + d else f"{args.replicas} unified",
                             s["completed"],
                             s["mean_ttft_s"], s["p99_ttft_s"], 1e3 * s["mean_tpot_s"], 1e3 * s["p99_tpot_s"],
                             s["cache_hit_rate"],
                             1e3 * dis.get("mean_transfer_s", 0.0), s["wall_s"]])
                print(rows[-1], flush=True)
    report(f"prefill/decode disaggregation vs unified ({args.preset}, simulator)",
           ["workload", "load", "fleet", "done", "TTFT mean s", "TTFT p99 s", "TPOT mean ms", "TPOT p99 ms",
            "hit rate", "hand-over ms", "wall s"], rows, args.out,
           {"command": " ".join(sys.argv), "requests": args.requests, "kv_tokens": args.kv_tokens})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
