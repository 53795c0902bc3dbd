"""Assembles the endpoint picker: the balancer's own objects, a gRPC server and an HTTP port.

`Picker` builds a `balancer.app.Balancer` from the fleet's config and starts it as `kvfleet
balancer` does (registry, health polls, KV-event subscribers, prefix indexes, policy, predictor,
router, audit: one construction, so picker and balancer route identically), then serves:

- gRPC (`grpc_host:grpc_port`): `envoy.service.ext_proc.v3.ExternalProcessor` (ext_proc.py) and
  `grpc.health.v1.Health` with the services the endpoint-picker protocol names: `liveness`
  (always SERVING), `readiness` and `envoy.service.ext_proc.v3.ExternalProcessor` (SERVING while
  some replica is usable), and "" (the server: as readiness);
- HTTP (the fleet config's host:port, 9090 by default): `/metrics`, `/health`, `/v1/models` and
  the balancer's admin API (`/admin/replicas`, `/admin/explain`, `/admin/decisions`,
  `/admin/index`), served by the balancer's own front-end behind its guard (`--admin-key`).

`stop` stops the gRPC server (streams in flight get a grace period), the HTTP port, the health
task and the balancer's tasks, and awaits them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from balancer import admin, index_state
from balancer.app import Balancer
from balancer.exchange import RouteTable
from balancer.front import FrontConfig, FrontServer
from balancer.guard import Guard

from balancer.picker.config import PickerConfig
from balancer.picker.ext_proc import ExternalProcessor, PickerMetrics, Picking

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
GRACE_S = 5.0  # ext_proc streams in flight at shutdown get this long to finish
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second picker on the same port fails instead of sharing it
    # Envoy PINGs the picker every second (balancer/picker/envoy.py: how a hung picker is found).
    # gRPC's defaults answer pings more often than every 5 min without data with GOAWAY
    # ("too_many_pings"), which closed an idle gateway's connection every few seconds (a new
    # request could race the close). Accept them.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]


class Picker:
    def __init__(self, cfg: PickerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.balancer = Balancer(cfg.fleet, clock)
        self.metrics = PickerMetrics(self.balancer.metrics.registry)
        self.picking = Picking(cfg, self.balancer, self.metrics)
        self.health = health.aio.HealthServicer()
        self.grpc_address: tuple[str, int] | None = None
        self.http_address: tuple[str, int] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._front: FrontServer | None = None
        self._http: asyncio.AbstractServer | None = None
        self._health_task: asyncio.Task | None = None

    @property
    def grpc_target(self) -> str:
        host, port = self.grpc_address
        return f"{host}:{port}"

    @property
    def http_url(self) -> str:
        host, port = self.http_address
        return f"http://{host}:{port}"

    async def start(self) -> None:
        cfg = self.cfg
        await self.balancer.start()
        self.picking.access.start()
        try:
            server = grpc.aio.server(options=GRPC_OPTIONS)
            pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(self.picking), server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            port = server.add_insecure_port(f"{cfg.grpc_host}:{cfg.grpc_port}")
            if not port:
                raise RuntimeError(f"cannot listen for gRPC on {cfg.grpc_host}:{cfg.grpc_port}; pick a free "
                                   "--grpc-port (0: any)")
            await server.start()
            self._grpc = server
            self.grpc_address = (cfg.grpc_host, port)
            await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
            await self._set_readiness()
            self._health_task = asyncio.create_task(self._watch_health(), name="picker:grpc-health")
            b = self.balancer
            guard = Guard.for_balancer(b)
            table = RouteTable({**admin.routes(b), **index_state.routes(b)}, guard.guarded)
            self._front = FrontServer(FrontConfig(max_body_bytes=b.cfg.max_body_bytes), table,
                                      on_reject=lambda reason: guard.rejected.labels(reason).inc())
            self._http = await asyncio.get_running_loop().create_server(
                self._front, b.cfg.host, b.cfg.port, reuse_address=True)
            self.http_address = self._http.sockets[0].getsockname()[:2]
        except BaseException:
            await self.stop()
            raise

    async def _set_readiness(self) -> None:
        ready = bool(self.balancer.registry.usable())
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("readiness", EXT_PROC_SERVICE, ""):
            await self.health.set(service, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_refresh_s)
            await self._set_readiness()

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._grpc is not None:
            await self._grpc.stop(GRACE_S)
            self._grpc = None
        if self._http is not None:
            self._http.close()
            await self._front.close()
            await self._http.wait_closed()
            self._http = None
        await self.picking.access.stop()  # every buffered access line written
        await self.balancer.stop()
