"""Serve a Llama-style model with kvfleet's paged-attention engine.

The replica speaks vLLM's HTTP API (/v1/completions, /v1/chat/completions, /health, /metrics,
...). With no --weights it builds the named preset from --seed, so every replica started with
the same preset and seed is identical. Example:

    kvfleet replica --port 8001 --model tiny --num-blocks 512
"""

from __future__ import annotations

import argparse
import sys

from kvfleet import logs
from kvfleet.cli import run_server
from protocol.roles import ROLES
from replica.config import EngineConfig, KVTransferConfig, ReplicaConfig, ServerConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from replica.step_model import PRESETS

    d, srv = EngineConfig(), ServerConfig()
    p.add_argument("--engine", choices=("torch", "sim"), default="torch",
                   help="torch: run the model; sim: real scheduler and block pool, modelled step times, no torch")
    p.add_argument("--preset", default="llama3-8b-h100", choices=sorted(PRESETS),
                   help="with --engine sim: the GPU set-up whose step times and KV capacity to model")
    p.add_argument("--preset-file", default=None,
                   help="with --engine sim: a step-time preset written by `kvfleet calibrate` (overrides --preset)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="with --engine sim: run this many times faster than the modelled GPU")
    p.add_argument("--host", default=srv.host, help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=srv.port, help="HTTP port (0 picks a free one)")
    p.add_argument("--model", default=d.model, help="model preset: tiny, small, llama3-8b")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: --model)")
    p.add_argument("--weights", default=None, help="local safetensors file with Llama tensor names (default: seeded init)")
    p.add_argument("--model-config", dest="model_config_path", default=None, help="HF config.json that goes with --weights")
    p.add_argument("--tokenizer", default=None, help="path to a HF tokenizer.json (default: built-in byte tokenizer)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weight init and default sampling")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: from --kv-cache-memory)")
    p.add_argument("--kv-cache-memory", type=int, default=d.kv_cache_memory_bytes, help="KV cache budget in bytes when --num-blocks is not given")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--kv-offload-host-blocks", dest="host_kv_blocks", type=int, default=d.host_kv_blocks,
                   metavar="N",
                   help="KV offload: keep up to N blocks the KV pool evicts in host memory (their own LRU) and "
                        "load a prompt's prefix back from there instead of recomputing it; published as KV "
                        "events with medium CPU, as vLLM's offloading connector does (0 = off). Size: N x "
                        "the pool's bytes per block (the ready line prints blocks)")
    p.add_argument("--kv-offload-disk-blocks", dest="disk_kv_blocks", type=int, default=d.disk_kv_blocks,
                   metavar="N",
                   help="KV offload: below the host tier, keep up to N blocks the host tier evicts in a file "
                        "(--kv-offload-disk-path; medium Disk in KV events); needs --kv-offload-host-blocks "
                        "(0 = off)")
    p.add_argument("--kv-offload-disk-path", dest="disk_kv_path", default=None, metavar="FILE",
                   help="the disk tier's file (created, or truncated, at start: the tier starts empty); its "
                        "directory must exist. Needed with --kv-offload-disk-blocks on --engine torch")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"most requests in one running batch (default {d.max_num_seqs}; sim: the preset's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"token budget per step, the prefill chunk size (default {d.max_num_batched_tokens}; sim: the preset's)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--drain-timeout", type=float, default=srv.drain_timeout_s,
                   help="seconds SIGTERM waits for in-flight requests")
    p.add_argument("--kv-events-endpoint", default=None,
                   help="publish KV-cache events (vLLM format) on this ZMQ PUB address, e.g. tcp://*:5557 "
                        "(port 0 picks a free one; the ready line prints the bound address)")
    p.add_argument("--kv-events-replay-endpoint", default=None,
                   help="serve replay and snapshots on this ZMQ ROUTER address, e.g. tcp://*:5558")
    p.add_argument("--kv-events-topic", default="", help="topic of KV-event messages (vLLM default: empty)")
    p.add_argument("--kv-digest-interval", type=float, default=5.0, metavar="S",
                   help="publish a compact digest of the cached block hashes (a binary fuse filter) on the "
                        "PUB socket every S seconds, for balancers started with --index-source digests|both "
                        "(0 = only when a balancer asks on the replay socket)")
    p.add_argument("--kv-digest-filter", default="binary_fuse8", choices=("binary_fuse8", "binary_fuse16"),
                   help="digest filter: binary_fuse8 ~9 bits/block, 0.39%% false positives; binary_fuse16 ~18 "
                        "bits/block, 0.0015%%")
    p.add_argument("--kv-digest-max-bytes", type=int, default=16 * 1024 * 1024, metavar="N",
                   help="largest digest on the wire; a cache too large for it is digested blocks-kept-longest first")
    p.add_argument("--load-report-on-arrival", action="store_true",
                   help="with --kv-events-endpoint: also publish a load report as soon as requests join the queue "
                        "(at most one per engine step), not only every 100 ms; for fleets behind several balancer "
                        "instances started with --consistent-routing, which then see each other's requests within "
                        "a step (docs/benchmarks.md)")
    p.add_argument("--step-log", type=int, default=0, metavar="N",
                   help="keep the last N engine steps with their step-model features and serve them at "
                        "GET /step_log (`kvfleet calibrate` reads them; 0 = off)")
    p.add_argument("--max-body-bytes", type=int, default=srv.max_body_bytes,
                   help="largest request body accepted (413 above)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="serve only clients sending `Authorization: Bearer KEY` (repeatable; /health, /metrics, "
                        "/load stay open): give the balancer the same key with --replica-api-key")
    p.add_argument("--kv-events-curve-secret-key-file", default=None, metavar="FILE",
                   help="CURVE-encrypt and authenticate the KV-event sockets with this secret key "
                        "(`kvfleet keys` writes one); subscribers need its public key")
    p.add_argument("--kv-events-curve-authorized-keys", default=None, metavar="DIR",
                   help="with CURVE: accept only subscribers whose public key file (*.key) is in DIR")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="LoRA adapters to serve, each under its own name (vLLM's flag): a request whose `model` is "
                        "NAME runs with the adapter in PATH (one .safetensors file, PEFT tensor names, `r` and "
                        "`lora_alpha` in its metadata; see replica/lora_weights.py). Listed in /v1/models with "
                        "`parent` = the base model")
    p.add_argument("--max-loras", type=int, default=d.max_loras, metavar="N",
                   help="adapters resident at once and in one batch (vLLM's default is 1 too); the first N "
                        "load at start, others on demand (least recently used evicted)")
    p.add_argument("--lora-load-s", type=float, default=d.lora_load_s, metavar="S",
                   help="--engine sim: modelled seconds to load an adapter; the torch engine measures its own "
                        "loads")
    kt = KVTransferConfig()
    p.add_argument("--role", choices=ROLES, default=kt.role,
                   help="prefill/decode disaggregation (vLLM's kv_producer/kv_consumer/kv_both): a balancer sends "
                        "prefill replicas each prompt with max_tokens=1 and decode replicas the request with the "
                        "prefill's kv_transfer_params, from which they pull the prompt's KV (torch engine only). Every "
                        "role still serves whole requests, the balancer's fallback when a pair member fails; `both` "
                        "replicas may take either side of a pair or a whole request")
    p.add_argument("--kv-transfer-host", default=kt.host,
                   help="prefill/both: the address the KV block socket binds and that decode replicas dial "
                        "(an address they can reach, not 0.0.0.0)")
    p.add_argument("--kv-transfer-port", type=int, default=kt.port,
                   help="prefill/both: the KV block socket's port (0 picks a free one; the ready line prints it)")
    p.add_argument("--kv-transfer-timeout", type=float, default=kt.timeout_s, metavar="S",
                   help="decode: give up on a pull when the next block takes longer than S seconds (the prefill "
                        "replica died or hangs) and compute the rest of the prompt here")
    p.add_argument("--kv-transfer-keep", type=float, default=kt.keep_s, metavar="S",
                   help="prefill: hold a finished prefill's KV blocks this long for its decode replica's pull")
    p.add_argument("--kv-transfer-peers", default=None, metavar="HOST[,HOST...]",
                   help="decode/both: the prefill replicas this replica may pull KV from, as a request's "
                        "kv_transfer_params name them (remote_host): IP addresses, CIDR networks (10.0.0.0/8) or "
                        "host names as written; loopback and --kv-transfer-host are always allowed, `*` allows any. "
                        "A request naming another host is refused with 403")
    logs.add_arguments(p)


def replica_config(args: argparse.Namespace) -> ReplicaConfig:
    """The replica's config from its parsed flags (and the files they name: --preset-file, the
    CURVE key). ValueError says which value is wrong."""
    from replica.lora import parse_lora_modules
    from replica.step_model import get_preset

    if args.step_log < 0:
        raise ValueError(f"--step-log must be 0 (off) or a number of steps, got {args.step_log}")
    preset = None
    if args.engine == "sim":
        if args.preset_file:
            from replica.calibrate import load_preset_file

            preset = load_preset_file(args.preset_file)
        else:
            preset = get_preset(args.preset)
    d = EngineConfig()
    engine = EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        weights=args.weights,
        model_config_path=args.model_config_path,
        tokenizer=args.tokenizer,
        seed=args.seed,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        max_num_seqs=args.max_num_seqs or (preset.max_num_seqs if preset else d.max_num_seqs),
        max_num_batched_tokens=args.max_num_batched_tokens or (preset.max_num_batched_tokens if preset
                                                               else d.max_num_batched_tokens),
        max_model_len=args.max_model_len,
        device=args.device,
        threads=args.threads,
        lora_modules=parse_lora_modules(args.lora_modules, args.served_model_name or args.model),
        max_loras=args.max_loras,
        lora_load_s=args.lora_load_s,
        host_kv_blocks=args.host_kv_blocks,
        disk_kv_blocks=args.disk_kv_blocks,
        disk_kv_path=args.disk_kv_path,
    )
    if engine.disk_kv_blocks and args.engine == "torch":  # a sim replica models the tier without a file
        from replica.kv_offload import check_disk_path

        check_disk_path(engine.disk_kv_path)
    server = ServerConfig(host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                          drain_timeout_s=args.drain_timeout, api_keys=tuple(args.api_key))
    publisher = None
    if args.kv_events_endpoint:
        from protocol.curve import load_secret_key
        from replica.publisher import PublisherConfig

        secret = load_secret_key(args.kv_events_curve_secret_key_file)[1] \
            if args.kv_events_curve_secret_key_file else None
        publisher = PublisherConfig(endpoint=args.kv_events_endpoint, replay_endpoint=args.kv_events_replay_endpoint,
                                    topic=args.kv_events_topic.encode(), bind=True, curve_secret_key=secret,
                                    curve_authorized_clients=args.kv_events_curve_authorized_keys,
                                    digest_interval_s=args.kv_digest_interval, digest_filter=args.kv_digest_filter,
                                    digest_max_bytes=args.kv_digest_max_bytes,
                                    load_report_on_arrival=args.load_report_on_arrival)
    peers = tuple(p for p in (args.kv_transfer_peers or "").split(",") if p)
    kv_transfer = KVTransferConfig(role=args.role, host=args.kv_transfer_host, port=args.kv_transfer_port,
                                   timeout_s=args.kv_transfer_timeout, keep_s=args.kv_transfer_keep, peers=peers)
    return ReplicaConfig(engine=engine, server=server, publisher=publisher, sim_preset=preset,
                         time_scale=args.time_scale, step_log=args.step_log, kv_transfer=kv_transfer)


def engine_flags(cfg: EngineConfig) -> list[str]:
    """The flags that give a replica this engine config (the inverse of `replica_config`'s
    engine part), for launchers that start `kvfleet replica` as a process. A replica has no
    flag for `cache_salt` (clients salt their own requests: the `cache_salt` body field)."""
    if cfg.cache_salt is not None:
        raise ValueError("kvfleet replica takes no cache salt; send `cache_salt` in the request body instead")
    d = EngineConfig()
    flags = ["--model", cfg.model, "--seed", str(cfg.seed), "--block-size", str(cfg.block_size),
             "--max-num-seqs", str(cfg.max_num_seqs), "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
             "--device", cfg.device]
    optional = {"--served-model-name": cfg.served_model_name, "--weights": cfg.weights,
                "--model-config": cfg.model_config_path, "--tokenizer": cfg.tokenizer,
                "--num-blocks": cfg.num_blocks,
                "--max-model-len": cfg.max_model_len, "--threads": cfg.threads}
    for flag, value in optional.items():
        if value is not None:
            flags += [flag, str(value)]
    if cfg.kv_cache_memory_bytes != d.kv_cache_memory_bytes:
        flags += ["--kv-cache-memory", str(cfg.kv_cache_memory_bytes)]
    if not cfg.enable_prefix_caching:
        flags.append("--no-prefix-caching")
    if cfg.lora_modules:
        flags += ["--lora-modules", *(f"{m.name}={m.path}" for m in cfg.lora_modules)]
    if cfg.max_loras != d.max_loras:
        flags += ["--max-loras", str(cfg.max_loras)]
    if cfg.lora_load_s != d.lora_load_s:
        flags += ["--lora-load-s", str(cfg.lora_load_s)]
    if cfg.host_kv_blocks:
        flags += ["--kv-offload-host-blocks", str(cfg.host_kv_blocks)]
    if cfg.disk_kv_blocks:
        flags += ["--kv-offload-disk-blocks", str(cfg.disk_kv_blocks)]
    if cfg.disk_kv_path:
        flags += ["--kv-offload-disk-path", cfg.disk_kv_path]
    return flags


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_format, args.log_level)
    try:
        cfg = replica_config(args)
    except ValueError as e:
        print(f"kvfleet replica: {e}", file=sys.stderr)
        return 2
    from replica.app import run_replica

    return run_server("replica", lambda: run_replica(cfg))
