"""Background watchers of the fleet: active health polls, /load polls, DNS re-resolution
(InferencePool discovery: balancer/inference_pool.py).

Each is one cancellable asyncio task started and awaited by the app's cleanup context.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import aiohttp

from balancer.config import DnsConfig, ReplicaSpec
from balancer.membership import Membership
from balancer.metrics import BalancerMetrics
from balancer.policies.base import ReplicaLoad
from balancer.registry import Registry, ReplicaState
from protocol.roles import BOTH, ROLES

log = logging.getLogger(__name__)


def load_from_dict(d: dict) -> ReplicaLoad:
    """A ReplicaLoad from a replica's `GET /load` body (or a decoded LoadReport's fields)."""
    return ReplicaLoad(
        num_running=int(d.get("num_running", 0)),
        num_waiting=int(d.get("num_waiting", 0)),
        queued_prefill_tokens=int(d.get("queued_prefill_tokens", 0)),
        running_decode_tokens=int(d.get("running_decode_tokens", 0)),
        free_blocks=int(d.get("free_blocks", 0)),
        total_blocks=int(d.get("total_blocks", 0)),
        kv_usage=float(d.get("kv_usage", 0.0)),
        age_s=0.0,
    )


def note_role(registry: Registry, metrics: BalancerMetrics, replica_id: str, role: object) -> None:
    """The role a replica reports (load report or `GET /load`); an unknown value counts as "both"."""
    role = role if role in ROLES else BOTH
    r = registry.get(replica_id)
    if r is None:
        return
    old = r.role
    if registry.set_role(replica_id, role):
        metrics.series(metrics.replica_role, replica_id, old).set(0)
    metrics.series(metrics.replica_role, replica_id, r.role).set(1)


class HealthChecker:
    def __init__(self, registry: Registry, session: Callable[[], aiohttp.ClientSession], metrics: BalancerMetrics,
                 has_load_stream: Callable[[str], bool], load_poll_s: float, models_poll_s: float = 10.0) -> None:
        self.registry = registry
        self.session = session
        self.metrics = metrics
        self.has_load_stream = has_load_stream
        self.load_poll_s = load_poll_s
        self.models_poll_s = models_poll_s
        self.cfg = registry.health_cfg

    async def run(self) -> None:
        # The polls get a connection pool of their own. The proxy's pool hands out its idle
        # connections oldest first, so polls through it would touch every pooled connection in
        # turn and keep all of them from ever idling out after a burst (measured: 42 sockets
        # still open 100 s after the load ended, vs none with this).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(headers=self.session().headers, connector=connector) as polls:
            self._polls = polls
            loop = asyncio.get_running_loop()
            next_load = 0.0
            while True:
                replicas = list(self.registry)
                poll_load = loop.time() >= next_load
                if poll_load:
                    next_load = loop.time() + self.load_poll_s
                await asyncio.gather(*(self._poll(r, poll_load) for r in replicas))
                await asyncio.sleep(self.cfg.interval_s)

    async def _poll(self, r: ReplicaState, poll_load: bool) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        ok = False
        try:
            async with self._polls.get(r.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
            if ok and self.registry.clock() - r.models_at >= self.models_poll_s:
                await self._read_models(r, timeout)
            if ok and poll_load and not self.has_load_stream(r.replica_id):
                async with self._polls.get(r.url + "/load", timeout=timeout) as resp:
                    if resp.status == 200:
                        body = await resp.json()
                        self.registry.on_load(r.replica_id, load_from_dict(body))
                        note_role(self.registry, self.metrics, r.replica_id, body.get("role"))
                        loras = body.get("loras")
                        if isinstance(loras, list):
                            names = frozenset(n for n in loras if isinstance(n, str))
                            self.registry.set_loras(r.replica_id, names, float(body.get("lora_load_s") or 0.0))
                            self.metrics.series(self.metrics.replica_loras, r.replica_id).set(len(names))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        if self.registry.get(r.replica_id) is None:
            return  # removed meanwhile
        self.registry.record_poll(r, ok)
        self.metrics.healthy.labels(r.replica_id).set(1 if r.healthy else 0)
        self.metrics.breaker_state.labels(r.replica_id).set(r.breaker.value)


    async def _read_models(self, r: ReplicaState, timeout: aiohttp.ClientTimeout) -> None:
        """What the replica serves, from its OpenAI `GET /v1/models` (base models and the LoRA
        adapters it has loaded, as vLLM lists them); kept as it was when the answer is unusable."""
        async with self._polls.get(r.url + "/v1/models", timeout=timeout) as resp:
            if resp.status != 200:
                return
            body = await resp.json(content_type=None)
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list):
            entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            models = frozenset(m["id"] for m in entries)
            # vLLM lists a LoRA adapter with `parent` = its base model (`--lora-modules`)
            adapters = {m["id"]: m["parent"] for m in entries
                        if isinstance(m.get("parent"), str) and m["parent"] != m["id"]}
            if models:
                self.registry.set_models(r, models, adapters)


class DnsWatcher:
    """Keeps the replicas a name resolves to (a headless service) in the registry."""

    def __init__(self, dns: DnsConfig, membership: Membership) -> None:
        self.dns = dns
        self.membership = membership

    async def run(self) -> None:
        host, _, port = self.dns.name.rpartition(":")
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                addrs = sorted({info[4][0] for info in infos})
            except OSError as e:
                log.warning("cannot resolve %s: %s (keeping the current replicas)", self.dns.name, e)
                addrs = None
            if addrs is not None:
                self.membership.reconcile(self.specs(addrs, int(port)))
            await asyncio.sleep(self.dns.interval_s)

    def specs(self, addrs: list[str], port: int) -> list[ReplicaSpec]:
        return [replica_at(a, port, self.dns.events_port, self.dns.replay_port) for a in addrs]


def replica_at(address: str, port: int, events_port: int | None, replay_port: int | None) -> ReplicaSpec:
    """The replica at IP `address` (v4 or v6): HTTP on `port`, KV events on the other ports if given."""
    h = f"[{address}]" if ":" in address else address
    return ReplicaSpec(url=f"http://{h}:{port}",
                       events=f"tcp://{h}:{events_port}" if events_port else None,
                       replay=f"tcp://{h}:{replay_port}" if replay_port else None)
