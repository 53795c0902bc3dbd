"""A fleet for a test: torch replica subprocesses (KV events on), an in-process balancer on a free
port, and the HTTP and SSE helpers the tests read them with. (`kvfleet fleet up` and the demo run
the user's local fleet: kvfleet/fleet.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request

import aiohttp

from balancer import serving
from balancer.app import BALANCER, create_app
from balancer.config import BalancerConfig, HealthConfig, ReplicaSpec
from harness import procs

REPLICA_ARGS = ["replica", "--port", "0", "--model", "tiny", "--num-blocks", "512", "--threads", "1",
                "--max-model-len", "2048", "--kv-events-endpoint", "tcp://127.0.0.1:0",
                "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]


def start_replicas(n: int, extra: list[str] | None = None) -> list[procs.Proc]:
    """n torch replicas started at the same time (procs.start_all)."""
    return procs.start_all([REPLICA_ARGS + (extra or [])] * n)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@contextlib.asynccontextmanager
async def balancer(specs: list[str], **cfg):
    """An in-process balancer on a free port; yields (base_url, Balancer)."""
    health = cfg.pop("health", HealthConfig(interval_s=0.2, timeout_s=0.5))
    cfg.setdefault("model", "tiny")
    config = BalancerConfig(port=0, replicas=tuple(ReplicaSpec.parse(s) for s in specs), health=health, **cfg)
    app = create_app(config)
    listening = await serving.start(app, "127.0.0.1", 0)
    try:
        yield listening.url, app[BALANCER]
    finally:
        await listening.close()


async def read_stream(resp: aiohttp.ClientResponse, on_chunk=None) -> tuple[list[int], str, str | None, dict | None]:
    """Read an SSE completion/chat stream: (token ids, text, finish reason, in-band error).
    on_chunk(total ids so far) is awaited after each data chunk."""
    ids, text, finish, error = [], "", None, None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            error = chunk["error"]
            continue
        for c in chunk["choices"]:
            ids.extend(c.get("token_ids") or [])
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            finish = c.get("finish_reason") or finish
        if on_chunk:
            await on_chunk(len(ids))
    return ids, text, finish, error


async def wait_for(condition, timeout: float = 20.0) -> None:
    """Poll until condition() holds (health polls run every 0.2 s; a loaded machine is slower)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def settle(b, after: float, timeout: float = 20.0) -> None:
    """Until every replica is idle in balancer `b`'s eyes: its KV events applied, a load report
    sent after `after` (loop time; the PUB socket orders it behind the request's events),
    nothing in flight."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = list(b.registry)
        if all(r.load_at > after and r.inflight_requests == 0 and r.sent_since_report == 0
               and r.load.num_running == 0 and r.load.num_waiting == 0 for r in states) \
                and all(sub.in_sync for sub in b.subscribers.values()) and len(b.subscribers) == len(states):
            return
        assert loop.time() < deadline, "the balancer's view did not settle"
        await asyncio.sleep(0.05)
