"""Assembles a replica process: engine, service, metrics, KV-event publisher, HTTP server."""

from __future__ import annotations

import logging
from collections import deque

from replica.config import EngineConfig
from replica.engine import build_engine, build_sim_engine
from replica.metrics import ReplicaMetrics
from replica.publisher import KVEventPublisher, PublisherConfig
from replica.server import ServerConfig, create_app, serve
from replica.service import EngineService


async def run_replica(cfg: EngineConfig, host: str, port: int, drain_timeout_s: float = 30.0,
                      max_body_bytes: int = 16 * 1024 * 1024, publisher_cfg: PublisherConfig | None = None,
                      sim_preset=None, time_scale: float = 1.0, api_keys: tuple[str, ...] = (),
                      step_log: int = 0) -> int:
    engine = build_sim_engine(cfg, sim_preset, time_scale) if sim_preset else build_engine(cfg)
    if step_log > 0:  # the last `step_log` steps, served at GET /step_log
        engine.step_log = deque(maxlen=step_log)
    publisher = KVEventPublisher(publisher_cfg) if publisher_cfg is not None else None
    sched = engine.scheduler
    server_cfg = ServerConfig(
        host=host,
        port=port,
        drain_timeout_s=drain_timeout_s,
        max_body_bytes=max_body_bytes,
        model_name=cfg.model_name,
        max_model_len=sched.config.max_model_len,
        vocab_size=engine.tokenizer.vocab_size,
        api_keys=api_keys,
    )
    service = EngineService(engine, ReplicaMetrics(cfg.model_name), publisher=publisher, replica_id=f"{host}:{port}")
    app = create_app(service, server_cfg)

    def ready(runner) -> None:
        addrs = [f"http://{a[0]}:{a[1]}" for a in runner.addresses]
        service.replica_id = addrs[0] if addrs else service.replica_id
        events = ""
        if publisher is not None:
            ep = publisher.endpoints
            events = f" kv-events={ep.endpoint}" + (f" kv-replay={ep.replay_endpoint}" if ep.replay_endpoint else "")
        kind = "sim" if sim_preset else "torch"
        print(f"kvfleet replica ready: engine={kind} model={cfg.model_name} blocks={engine.kv.num_blocks} "
              f"block_size={cfg.block_size}{events} listening on {' '.join(addrs)}", flush=True)

    await serve(app, server_cfg, ready)
    logging.getLogger("kvfleet.replica").info("kvfleet replica stopped")
    return 0
