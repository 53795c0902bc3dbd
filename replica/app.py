"""Builds and runs a replica from its `ReplicaConfig`: engine, service, metrics, KV-event
publisher, HTTP app. `kvfleet replica` (kvfleet/cmd_replica.py) and in-process callers (tests)
both start a replica through `run_replica`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from aiohttp import web

from protocol.roles import BOTH, can_prefill
from replica.config import ReplicaConfig
from replica.engine import build_engine, build_sim_engine
from replica.metrics import ReplicaMetrics
from replica.publisher import KVEventPublisher
from replica.kv_transfer import KVSender
from replica.server import SERVICE, create_app, serve
from replica.service import EngineService

log = logging.getLogger("kvfleet.replica")
SENDER = web.AppKey("kv_sender", KVSender)  # the prefill side of the KV hand-over, or None


def build_replica(cfg: ReplicaConfig) -> web.Application:
    """The replica's app; its engine loop and KV-event sockets start with the app and stop
    with it (`create_app`'s `cleanup_ctx`). The service is `app[replica.server.SERVICE]`."""
    if cfg.sim_preset is not None:
        engine = build_sim_engine(cfg.engine, cfg.sim_preset, cfg.time_scale)
    else:
        engine = build_engine(cfg.engine)
    if cfg.step_log > 0:  # the last `step_log` steps, served at GET /step_log
        engine.step_log = deque(maxlen=cfg.step_log)
    publisher = KVEventPublisher(cfg.publisher) if cfg.publisher is not None else None
    model = cfg.engine.model_name
    role = cfg.kv_transfer.role
    tiers = [t.medium for t in engine.kv.offload.tiers] if engine.kv.offload is not None else []
    service = EngineService(engine, ReplicaMetrics(model, kv_tiers=tiers), publisher=publisher,
                            replica_id=f"{cfg.server.host}:{cfg.server.port}", role=role)
    sender = receiver = None
    if cfg.sim_preset is None:  # the KV hand-over moves tensors: the torch engine's
        from replica.kv_transfer import KVReceiver, KVSender

        if can_prefill(role):  # a `both` replica may be a pair's prefill side (balancer/disagg.py)
            sender = KVSender(cfg.kv_transfer, service, service.metrics)
        receiver = KVReceiver(cfg.kv_transfer, service, service.metrics)
    app = create_app(service, cfg.server, model, sender, receiver)
    app[SENDER] = sender
    return app


def ready_line(cfg: ReplicaConfig, service: EngineService, urls: list[str], sender: KVSender | None = None) -> str:
    """What `kvfleet replica` prints once it listens (launchers wait for it: kvfleet/procs.py)."""
    events = "" if service.role == BOTH else f" role={service.role}"
    if sender is not None:
        events += f" kv-transfer={sender.endpoint}"
    offload = service.engine.kv.offload
    tiers = "".join(f" {t.medium.lower()}_blocks={t.num_blocks}" for t in offload.tiers) if offload is not None else ""
    if service.publisher is not None:
        ep = service.publisher.endpoints
        events += f" kv-events={ep.endpoint}" + (f" kv-replay={ep.replay_endpoint}" if ep.replay_endpoint else "")
    return (f"kvfleet replica ready: engine={cfg.kind} model={cfg.engine.model_name} "
            f"blocks={service.engine.kv.num_blocks} block_size={cfg.engine.block_size}{tiers}{events} "
            f"listening on {' '.join(urls)}")


async def run_replica(cfg: ReplicaConfig, stop: asyncio.Event | None = None,
                      ready: Callable[[list[str]], None] | None = None) -> int:
    """Build the replica, serve it, print the ready line once it listens (then `ready(urls)`),
    and drain and stop when `stop` is set (None: on SIGTERM/SIGINT). Returns the exit status."""
    app = build_replica(cfg)
    service = app[SERVICE]

    def on_ready(urls: list[str]) -> None:
        service.replica_id = urls[0] if urls else service.replica_id
        print(ready_line(cfg, service, urls, app[SENDER]), flush=True)
        if ready is not None:
            ready(urls)

    await serve(app, cfg.server, on_ready, stop)
    log.info("kvfleet replica stopped")
    return 0
