"""Run the KV-cache-aware balancer in front of a fleet of replicas.

Replicas come from --replica flags (repeatable), a --config file (TOML or JSON with the same
keys as the flags), --dns names re-resolved periodically (a Kubernetes headless service), the
Ready pods of an --inference-pool (Gateway API Inference Extension, through the Kubernetes API),
and the admin API at run time. A replica may be a kvfleet replica, vLLM or SGLang: give its KV-event
endpoints after `=` so the balancer knows exactly what it caches. Example:

    kvfleet balancer --port 8080 --policy precise_prefix \\
        --replica http://127.0.0.1:8001=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 \\
        --replica http://127.0.0.1:8002

Then point any OpenAI client at http://127.0.0.1:8080/v1. `GET /admin/replicas` shows the
fleet; `POST /admin/explain` with a request body shows how it would be routed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from balancer import fairness, guard, sessions
from balancer.config import BalancerConfig, DnsConfig, InferencePoolConfig, ReplicaSpec
from kvfleet import logs
from kvfleet.cli import run_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    from balancer.policies import policy_names

    d = BalancerConfig()
    p.add_argument("--host", default=None, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=None, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument("--replica", action="append", default=[], metavar="[ROLE@]URL[=EVENTS[,REPLAY]]",
                   help="a replica, e.g. http://h:8000=tcp://h:5557,tcp://h:5558 (repeatable). ROLE (prefill, "
                        "decode, both) for prefill/decode disaggregation, e.g. prefill@http://h:8100 for a vLLM P/D "
                        "server; kvfleet replicas report their --role themselves")
    p.add_argument("--dns", action="append", default=[], metavar="HOST:PORT",
                   help="a name whose addresses are replicas, re-resolved every few seconds (repeatable)")
    p.add_argument("--dns-events-port", type=int, default=None, help="KV-event PUB port on DNS-discovered replicas")
    p.add_argument("--dns-replay-port", type=int, default=None, help="replay port on DNS-discovered replicas")
    p.add_argument("--inference-pool", default=None, metavar="NAMESPACE/NAME",
                   help="a Gateway API Inference Extension InferencePool whose Ready pods are the replicas (its "
                        "selector and target port), followed through the Kubernetes API; KV events are read from the "
                        "pods' container ports named kv-events / kv-replay. Needs get/list/watch on pods and "
                        "inferencepools (the Helm chart's Role) and the kubernetes client (pip install 'kvfleet[k8s]'). In a "
                        "--config file: inference_pool = \"NAMESPACE/NAME\", or a table with pool, kubeconfig, "
                        "context, events_port, replay_port, resync_s")
    p.add_argument("--kubeconfig", default=None, metavar="PATH",
                   help="with --inference-pool: the kubeconfig to use (default: the pod's service account inside a "
                        "cluster, else $KUBECONFIG or ~/.kube/config, as kubectl)")
    p.add_argument("--kube-context", default=None, metavar="NAME",
                   help="with --inference-pool: the kubeconfig context (default: its current-context)")
    p.add_argument("--policy", default=None, choices=policy_names(), help=f"routing policy (default {d.policy})")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy setting (JSON value), e.g. cache_threshold=0.5 (repeatable)")
    p.add_argument("--model", default=None, help="served model name (default: asked from the replicas)")
    p.add_argument("--block-size", type=int, default=None, help=f"KV block size of the replicas (default {d.block_size})")
    p.add_argument("--tokenizer", default=None, help="a HF tokenizer.json (default: the built-in byte tokenizer)")
    p.add_argument("--config", default=None, help="a TOML or JSON file with BalancerConfig keys; flags win")
    p.add_argument("--index-source", default=None, choices=("events", "digests", "both"),
                   help="where a replica's cached prefix comes from: events (its exact KV-event stream), digests "
                        "(only the compact cache digest it publishes every --kv-digest-interval: for fleets too large "
                        "to follow every stream), both (events, and the digest until the event index is exact, e.g. "
                        f"after joining late) (default {d.index_source})")
    p.add_argument("--digest-max-age", type=float, default=None, metavar="S", dest="digest_max_age_s",
                   help=f"route from a digest only while it is younger than S seconds (default {d.digest_max_age_s}); "
                        "keep it above the replicas' --kv-digest-interval")
    p.add_argument("--no-failover", action="store_true", help="do not continue broken streams on another replica")
    p.add_argument("--failover-max-stop", type=int, default=None, metavar="N",
                   help="continue a broken stream only if it has at most N stop strings (default "
                        f"{d.retry.failover_max_stop}); longer lists are still forwarded, their streams end with an "
                        "error event if the replica is lost. Only greedy, n=1, no-logprobs streams are continued")
    p.add_argument("--decisions-kept", type=int, default=None, metavar="N",
                   help=f"routing decisions kept for GET /admin/decisions (default {d.audit.keep}; 0: none)")
    p.add_argument("--mismatch-ratio", type=float, default=None, metavar="R",
                   help="a request whose replica reports fewer cached tokens than R times what the prefix index "
                        f"predicted counts as a cache mismatch, with a warning (default {d.audit.mismatch_ratio}; "
                        f"predictions under {d.audit.mismatch_min_tokens} tokens never do)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="serve every route with aiohttp instead of the balancer's lean HTTP front-end (the "
                        "same routes and checks; for comparison, or if you suspect the front-end)")
    p.add_argument("--memory-trim-s", type=float, default=None,
                   help=f"return freed heap memory to the OS every this many seconds (glibc malloc_trim), so RSS "
                        f"does not ratchet up after bursts; 0 disables (default {d.memory_trim_s} s)")
    p.add_argument("--lora-slack", type=int, default=None, metavar="N",
                   help="a request for a LoRA adapter goes to a replica that has it loaded unless those have more "
                        "than N requests in flight beyond the least busy replica that would load it (default "
                        f"{d.lora_slack}; the predictive policy prices the adapter load instead)")
    p.add_argument("--consistent-routing", action="store_true",
                   help="use when several balancer or picker instances serve the same replicas without talking to "
                        "each other: route only from what they all see (the replicas' load reports and KV events), "
                        "not from this instance's own requests in flight or a learned output-length prediction, so "
                        "that every instance sends the same request to the same replica. Requests that arrive between two load reports are then not "
                        "counted against their replica (predictive spreads them over the near-best replicas by the "
                        "request's hash), which costs some TTFT in bursts (docs/benchmarks.md): leave it off for a "
                        "single instance. "
                        "In a --config file: consistent_routing = true")
    guard.add_arguments(p)
    sessions.add_arguments(p)
    fairness.add_arguments(p)
    logs.add_arguments(p)


def build_config(args: argparse.Namespace, base: BalancerConfig | None = None) -> BalancerConfig:
    """The config the flags say, over `base` (default: the --config file's, or the defaults)."""
    options = {}
    for item in args.policy_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--policy-option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    overrides = dict(host=args.host, port=args.port, policy=args.policy, model=args.model,
                     block_size=args.block_size, tokenizer=args.tokenizer, memory_trim_s=args.memory_trim_s,
                     lora_slack=args.lora_slack, index_source=args.index_source,
                     digest_max_age_s=args.digest_max_age_s, consistent_routing=args.consistent_routing or None)
    replicas = tuple(ReplicaSpec.parse(r) for r in args.replica)
    dns = tuple(DnsConfig(name=n, events_port=args.dns_events_port, replay_port=args.dns_replay_port) for n in args.dns)
    if base is None:
        base = BalancerConfig.from_file(args.config) if args.config else BalancerConfig()
    from dataclasses import replace

    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if replicas:
        cfg = replace(cfg, replicas=cfg.replicas + replicas)
    if dns:
        cfg = replace(cfg, dns=cfg.dns + dns)
    if options:
        cfg = replace(cfg, policy_options=tuple(sorted({**dict(cfg.policy_options), **options}.items())))
    if args.no_fast_path:
        cfg = replace(cfg, fast_path=False)
    if args.no_failover:
        cfg = replace(cfg, retry=replace(cfg.retry, failover=False))
    if args.decisions_kept is not None or args.mismatch_ratio is not None:
        cfg = replace(cfg, audit=replace(cfg.audit, **{k: v for k, v in (("keep", args.decisions_kept),
                                                                        ("mismatch_ratio", args.mismatch_ratio))
                                                      if v is not None}))
    if args.failover_max_stop is not None:
        cfg = replace(cfg, retry=replace(cfg.retry, failover_max_stop=args.failover_max_stop))
    cfg = guard.apply_arguments(cfg, args)
    cfg = sessions.apply_arguments(cfg, args)
    cfg = fairness.apply_arguments(cfg, args)
    if args.inference_pool:
        cfg = replace(cfg, inference_pool=InferencePoolConfig.parse(args.inference_pool))
    if cfg.inference_pool is not None and (args.kubeconfig or args.kube_context):
        cfg = replace(cfg, inference_pool=replace(cfg.inference_pool, **{k: v for k, v in (
            ("kubeconfig", args.kubeconfig), ("context", args.kube_context)) if v}))
    elif args.kubeconfig or args.kube_context:
        raise ValueError("--kubeconfig and --kube-context need --inference-pool NAMESPACE/NAME")
    if not cfg.replicas and not cfg.dns and cfg.inference_pool is None:
        raise ValueError("no replicas: give --replica URL (repeatable), --dns HOST:PORT, --inference-pool "
                         "NAMESPACE/NAME or a --config file")
    return cfg


async def serve(cfg: BalancerConfig) -> int:
    from balancer import serving
    from balancer.app import BALANCER, create_app

    app = create_app(cfg)
    listening = await serving.start(app, cfg.host, cfg.port, access_log=None)
    b = app[BALANCER]
    addrs = [f"http://{a[0]}:{a[1]}" for a in listening.addresses]
    front = "lean front-end" if listening.front else "aiohttp"
    print(f"kvfleet balancer ready: model={b.model} policy={b.policy.name} replicas={len(b.registry)} "
          f"listening on {' '.join(addrs)} ({front})", flush=True)
    try:
        await until_signalled()
    finally:
        await listening.close()
    return 0


async def until_signalled() -> None:
    """Return on SIGTERM or SIGINT (the server then shuts down in order)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_format, args.log_level)
    try:
        cfg = build_config(args)
        from balancer.policies import make_policy

        make_policy(cfg.policy, dict(cfg.policy_options))  # fail early on bad options
    except ValueError as e:
        print(f"kvfleet balancer: {e}", file=sys.stderr)
        return 2
    return run_server("balancer", lambda: serve(cfg))
