"""Simulate a fleet on a virtual clock: the real scheduler, block pool, prefix index and
balancer policies, with modelled GPU step times. No sockets, no torch, no GPU.

Each policy replays the whole trace on a fresh fleet; the table compares them with bounds
(the ideal TTFT, and the infinite-cache and pooled-cache hit rates: every block kept forever,
or the whole fleet's KV as one LRU cache). Example:

    kvfleet simulate --trace ../shared/traces/mooncake_synthetic.jsonl --replicas 8 \\
        --preset llama3-70b-h100 --policies round_robin,precise_prefix,dynamo_kv --load 0.8

`--sweep FILE` runs a matrix instead (workloads × fleet sizes × loads × KV sizes × seeds, every
policy on each, in parallel worker processes) and writes one table of the candidate against
the best peer and the bounds; bench/routing_matrix.toml is the full matrix of issue #15:

    kvfleet simulate --sweep bench/routing_matrix.toml --jobs 2 --out results/sweep
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from balancer.policies import policy_names
    from replica.step_model import PRESETS

    p.add_argument("--trace", default=None, help="trace file (mooncake, azure, burstgpt, bailian, sharegpt); "
                                                  "required unless --sweep")
    p.add_argument("--sweep", default=None, metavar="FILE",
                   help="run the matrix a TOML sweep file describes (see bench/routing_matrix.toml) and write "
                        "sweep.md/sweep.json to --out; the other options here are then ignored")
    p.add_argument("--jobs", type=int, default=None, help="--sweep: worker processes (default: the CPU count)")
    p.add_argument("--format", default="auto", help="trace format (auto-detected by default)")
    p.add_argument("--replicas", type=int, default=8, help="replicas in the fleet")
    p.add_argument("--preset", default="llama3-70b-h100", choices=sorted(PRESETS), help="GPU set-up to model")
    p.add_argument("--preset-file", default=None, help="a step-time preset written by `kvfleet calibrate` (overrides --preset)")
    p.add_argument("--policies", default="round_robin,least_request,precise_prefix",
                   help=f"comma-separated policies; any of: {', '.join(policy_names())}")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV blocks (16 tokens) per replica (default: the preset's)")
    p.add_argument("--kv-offload-host-blocks", type=int, default=0, metavar="N",
                   help="a host-memory KV tier of N blocks below each replica's device pool: evicted blocks spill "
                        "there and are loaded back on a hit (as `kvfleet replica --kv-offload-host-blocks`; 0: none)")
    p.add_argument("--kv-offload-disk-blocks", type=int, default=0, metavar="N",
                   help="a disk KV tier of N blocks below the host tier (needs --kv-offload-host-blocks; 0: none)")
    p.add_argument("--host-link", default="", choices=("", "pcie4", "pcie5", "nvlink-c2c"),
                   help="the host tier's link to the GPU (simulator/tiers.py gives each figure's source; "
                        "default: the preset's PCIe Gen5)")
    p.add_argument("--load", type=float, default=None,
                   help="scale the arrival rate to this utilisation of the fleet (e.g. 0.8); default: trace timestamps")
    p.add_argument("--max-requests", type=int, default=None, help="use only the first N requests")
    p.add_argument("--policy-option", action="append", default=[], metavar="POLICY:KEY=VALUE",
                   help="a policy setting (JSON value), e.g. predictive:others_weight=1 (repeatable)")
    p.add_argument("--predictor", default="ensemble",
                   help="output-length predictor the policies see: a predictors name, none, or oracle (true lengths)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt materialisation")
    from simulator.run import (DEFAULT_LOAD_REPORT_INTERVAL_S, DEFAULT_REQUEST_LATENCY_S, DEFAULT_RESPONSE_LATENCY_S,
                               SIM_MAX_MODEL_LEN)

    p.add_argument("--request-latency-ms", type=float, default=1e3 * DEFAULT_REQUEST_LATENCY_S,
                   help="what a live fleet adds from a client's send to the replica's engine queue "
                        "(HTTP, balancer, tokenizing; default: measured on a live sim fleet, docs/benchmarks.md)")
    p.add_argument("--response-latency-ms", type=float, default=1e3 * DEFAULT_RESPONSE_LATENCY_S,
                   help="what a live fleet adds from a token leaving a step to the client (SSE via the balancer)")
    p.add_argument("--balancers", type=int, default=1,
                   help="uncoordinated balancer instances, requests round robin over them; >1 reports their "
                        "agreement in the JSON output (default 1)")
    p.add_argument("--consistent-routing", action="store_true",
                   help="the --balancers instances route from shared state only (load reports, KV events), as "
                        "kvfleet balancer --consistent-routing: compare agreement and TTFT with and without it")
    p.add_argument("--load-report-on-arrival", action="store_true",
                   help="replicas also report their load as soon as requests join their queue, as kvfleet replica "
                        "--load-report-on-arrival (at once when idle, else when the step in flight ends)")
    from simulator.kv_link import KV_LINKS

    p.add_argument("--prefill-replicas", type=int, default=0, metavar="N",
                   help="disaggregate: N of the --replicas only prefill (a request's prompt and first token), "
                        "handing its KV to a decode replica over --kv-link; 0 and --decode-replicas 0: a unified fleet")
    p.add_argument("--decode-replicas", type=int, default=0, metavar="N",
                   help="disaggregate: N of the --replicas only decode, from KV a prefill replica handed over; "
                        "the rest of the --replicas do both (e.g. --replicas 8 --prefill-replicas 2 "
                        "--decode-replicas 6)")
    p.add_argument("--kv-link", default="ib-ndr", choices=tuple(KV_LINKS),
                   help="the modelled link KV hand-overs take: " + "; ".join(
                       f"{k}: {v.bandwidth_Bps / 1e9:g} GB/s per GPU, {v.latency_s * 1e6:g} us ({v.source})"
                       for k, v in KV_LINKS.items()))
    p.add_argument("--kv-bytes-per-token", type=int, default=None, metavar="B",
                   help="KV bytes of one token, for the hand-over time (default: the --preset model's, e.g. "
                        "131072 for Llama-3-8B bf16; with --preset-file, 131072)")
    p.add_argument("--load-report-interval-ms", type=float, default=1e3 * DEFAULT_LOAD_REPORT_INTERVAL_S,
                   help="how often a replica's load report reaches the balancer (default: a live replica's "
                        "cadence); 0: after every engine step, fresher than any live fleet")
    p.add_argument("--max-model-len", type=int, default=SIM_MAX_MODEL_LEN,
                   help="longest prompt a replica takes; longer ones are rejected, as by a live sim replica")
    p.add_argument("--index-source", default="events", choices=("events", "digests"),
                   help="what the policies see of the replicas' caches: exact KV events after every step, or "
                        "each replica's cache digest (a binary fuse filter) taken every --digest-interval, as a "
                        "balancer started with --index-source digests sees them")
    p.add_argument("--digest-interval", type=float, default=1.0, metavar="S",
                   help="with --index-source digests: virtual seconds between a replica's digests")
    p.add_argument("--digest-filter", default="binary_fuse8", choices=("binary_fuse8", "binary_fuse16"),
                   help="with --index-source digests: the filter (8 or 16-bit fingerprints)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in seconds, for goodput")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT SLO in seconds, for goodput")
    p.add_argument("--sessions", action="store_true",
                   help="sticky sessions (balancer/sessions.py, default settings), keyed by the trace's session ids "
                        "(kvfleet's generated chat/agentic traces, Bailian's chat ids)")
    p.add_argument("--out", default="results/simulate", help="folder for the JSON, markdown table and plot")


def run_sweep(args: argparse.Namespace) -> int:
    from simulator.sweep import load_spec, run_sweep, sweep_table, write_sweep

    try:
        spec = load_spec(args.sweep)
    except (OSError, ValueError) as e:
        print(f"kvfleet simulate --sweep: {e}", file=sys.stderr)
        return 2
    cells = spec.cells()
    print(f"{len(cells)} cells × {len(spec.policies)} policies; writing to {args.out}", flush=True)

    def progress(done: int, total: int, cell, policy: str, elapsed: float) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"  {done}/{total} runs done, {elapsed:.0f} s", flush=True)

    try:
        out = run_sweep(spec, args.jobs, progress)
    except (OSError, ValueError) as e:
        print(f"kvfleet simulate --sweep: {e}", file=sys.stderr)
        return 2
    print(sweep_table(out))
    paths = write_sweep(out, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(args: argparse.Namespace) -> int:
    from balancer.policies import policy_names

    if args.sweep:
        return run_sweep(args)
    if not args.trace:
        print("kvfleet simulate: give --trace FILE (a trace to replay) or --sweep FILE (a matrix); "
              "see kvfleet simulate --help", file=sys.stderr)
        return 2
    from balancer import sessions
    from loadgen.traces import load_trace
    from replica.step_model import get_preset
    from simulator.run import SimulateConfig, simulate, table, write

    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = [p for p in policies if p not in policy_names()]
    if unknown:
        print(f"kvfleet simulate: unknown policies {unknown}; choose from {policy_names()}", file=sys.stderr)
        return 2
    import json

    options: dict[str, dict] = {}
    for item in args.policy_option:
        name, _, kv = item.partition(":")
        key, sep, value = kv.partition("=")
        if not sep or not key:
            print(f"kvfleet simulate: --policy-option takes POLICY:KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            options.setdefault(name, {})[key] = json.loads(value)
        except ValueError:
            options.setdefault(name, {})[key] = value
    try:
        trace = load_trace(args.trace, args.format)
        if args.max_requests:
            trace = trace[: args.max_requests]
        if args.preset_file:
            from replica.calibrate import load_preset_file

            preset = load_preset_file(args.preset_file)
        else:
            preset = get_preset(args.preset)
        from simulator.kv_link import get_link, preset_kv

        kv_bytes, kv_lanes = (131_072, 1) if args.preset_file else preset_kv(args.preset)
        cfg = SimulateConfig(args.replicas, preset, policies, args.kv_blocks, args.load, args.seed,
                             args.slo_ttft, args.slo_tpot, predictor=args.predictor,
                             policy_options=tuple((k, tuple(sorted(v.items()))) for k, v in options.items()),
                             request_latency_s=args.request_latency_ms / 1e3,
                             load_report_interval_s=args.load_report_interval_ms / 1e3,
                             response_latency_s=args.response_latency_ms / 1e3, max_model_len=args.max_model_len,
                             index_source=args.index_source, digest_interval_s=args.digest_interval,
                             digest_filter=args.digest_filter,
                             sessions=sessions.SessionConfig(enabled=args.sessions), balancers=args.balancers,
                             consistent_routing=args.consistent_routing,
                             report_on_arrival=args.load_report_on_arrival,
                             host_kv_blocks=args.kv_offload_host_blocks, disk_kv_blocks=args.kv_offload_disk_blocks,
                             host_link=args.host_link,
                             prefill_replicas=args.prefill_replicas, decode_replicas=args.decode_replicas,
                             kv_link=get_link(args.kv_link), kv_bytes_per_token=args.kv_bytes_per_token or kv_bytes,
                             kv_lanes=kv_lanes)
        # The fleet's own checks (roles against --replicas), before the trace is replayed.
        from simulator.run import fleet_config

        fleet_config(cfg, policies[0])
    except (OSError, ValueError) as e:
        print(f"kvfleet simulate: {e}", file=sys.stderr)
        return 2
    out = simulate(trace, cfg)
    c = out["config"]
    rejected = max((s.get("rejected", 0) for s in out["policies"]), default=0)
    if rejected:
        print(f"{rejected} requests longer than --max-model-len {args.max_model_len} rejected (not in the figures)")
    if c["index_source"] == "digests":
        print(f"policies see each replica's cache digest ({c['digest_filter']}) every {c['digest_interval_s']:g} s")
    print(f"{c['requests']} requests, {c['replicas']} replicas of {c['preset']}, {c['kv_blocks']} KV blocks each; "
          f"trace utilisation {c['trace_utilisation']:.2f}" +
          (f", rescaled ×{c['time_factor']:.2f} to load {c['load']}" if c["load"] else ""))
    print(table(out))
    paths = write(out, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
