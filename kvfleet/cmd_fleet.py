"""Start a local fleet — N replicas and the balancer in front — and keep it up until Ctrl-C,
then stop every process cleanly. Example:

    kvfleet fleet up --replicas 3 --engine torch --policy precise_prefix --port 8080
    # then: any OpenAI client at http://127.0.0.1:8080/v1

With --prometheus it also runs a real Prometheus (Debian: `apt-get install prometheus`) that
scrapes the balancer and every replica, found through file-based service discovery that the
fleet keeps current; point Grafana at it and load dashboards/ (see dashboards/README.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    from balancer.policies import policy_names

    p.add_argument("action", choices=["up"], help="`up`: start the fleet and wait for Ctrl-C")
    p.add_argument("--replicas", type=int, default=2, help="number of replicas")
    p.add_argument("--prefill-replicas", type=int, default=0, metavar="N",
                   help="of --replicas, N run `--role prefill` (prefill/decode disaggregation, torch engine)")
    p.add_argument("--decode-replicas", type=int, default=0, metavar="N",
                   help="of --replicas, N run `--role decode`; the rest are `both` (whole requests or either side)")
    p.add_argument("--engine", choices=["torch", "sim"], default="torch", help="replica engine")
    p.add_argument("--policy", default="precise_prefix", choices=policy_names(), help="balancer policy")
    p.add_argument("--host", default="127.0.0.1", help="address every process listens on")
    p.add_argument("--port", type=int, default=8080, help="balancer port")
    p.add_argument("--replica-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every replica, e.g. --replica-arg=--num-blocks=256 (repeatable)")
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per replica")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--prometheus", action="store_true",
                   help="also run Prometheus (the `prometheus` binary) scraping the balancer and the replicas")
    p.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus port (0 picks a free one)")
    p.add_argument("--prometheus-binary", default=None, help="Prometheus executable (when not given: `prometheus` on PATH)")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="Prometheus scrape interval, seconds")
    p.add_argument("--targets-dir", default=None,
                   help="also keep Prometheus file_sd targets (balancers.json, replicas.json) in this directory, "
                        "for a Prometheus of your own run with dashboards/prometheus.yml")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log format of the replicas and the balancer (stderr)")


def run(args: argparse.Namespace) -> int:
    from kvfleet.fleet import FleetSpec, LocalFleet
    from protocol.roles import BOTH
    from kvfleet.prometheus import PrometheusConfig

    replica_args = ["--num-blocks", str(args.num_blocks)]
    if args.engine == "torch":
        replica_args += ["--model", "tiny", "--threads", str(args.threads)]
    replica_args += args.replica_arg + ["--log-format", args.log_format]
    try:
        prom = None
        if args.prometheus:
            prom = PrometheusConfig(binary=args.prometheus_binary, host=args.host, port=args.prometheus_port,
                                    scrape_interval_s=args.scrape_interval)
        spec = FleetSpec(replicas=args.replicas, engine=args.engine, policy=args.policy, host=args.host,
                         balancer_port=args.port, replica_args=tuple(replica_args),
                         balancer_args=("--log-format", args.log_format), prometheus=prom,
                         targets_dir=args.targets_dir, prefill=args.prefill_replicas, decode=args.decode_replicas)
    except ValueError as e:
        print(f"kvfleet fleet: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with LocalFleet(spec) as fleet:
            print(f"fleet up: balancer {fleet.balancer.url} ({args.policy}) in front of "
                  f"{len(fleet.replicas)} {args.engine} replicas", flush=True)
            for r, role in zip(fleet.replicas, spec.roles()):
                print(f"  replica {r.url}  kv-events {r.events}" + (f"  role {role}" if role != BOTH else ""),
                      flush=True)
            if fleet.prometheus is not None:
                print(f"  prometheus {fleet.prometheus.url}  (scraping every {args.scrape_interval:g} s; "
                      f"targets in {fleet.prometheus.targets_dir})", flush=True)
            print("Ctrl-C stops everything.", flush=True)
            stop.wait()
            print("stopping ...", flush=True)
    except RuntimeError as e:
        print(f"kvfleet fleet: {e}", file=sys.stderr)
        return 1
    return 0
