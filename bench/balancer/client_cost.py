"""Part `client`, in process on the proxy's core: CPU and wall time per sequential small POST to the
fake backend of the balancer's own upstream client (balancer/upstream.py) and of aiohttp's
ClientSession."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from bench.balancer import rig
from bench.common import report

HEADERS = ["client", "CPU us/request", "wall us/request"]


def rows(backend_url: str, core: int | None, n: int = 2000, rounds: int = 3) -> list[list]:
    """CPU and wall time per sequential non-streaming POST of the balancer's upstream client
    (balancer/upstream.py) and of an aiohttp ClientSession set up as the balancer set its own up
    before (keep-alive pool, no cookie jar, no decompression, connect and read timeouts)."""
    import aiohttp

    from balancer.upstream import UpstreamPool

    body = rig.body(rig.SHORT_PROMPT)
    headers = {"Content-Type": "application/json", "X-Request-Id": "bench"}

    async def with_aiohttp(s: aiohttp.ClientSession) -> None:
        r = await s.post(backend_url + "/v1/completions", data=body, headers=headers)
        await r.read()
        r.release()

    async def with_upstream(pool: UpstreamPool) -> None:
        r = await pool.post(backend_url, "/v1/completions", body, headers)
        await r.read()
        r.release()

    async def run() -> dict[str, tuple[float, float]]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None, connect=2, sock_read=300))
        pool = UpstreamPool()
        best: dict[str, tuple[float, float]] = {}
        try:
            for _ in range(rounds):
                for name, one, client in (("aiohttp ClientSession", with_aiohttp, session),
                                          ("kvfleet upstream (httptools)", with_upstream, pool)):
                    for _ in range(50):
                        await one(client)
                    c, t = time.process_time(), time.perf_counter()
                    for _ in range(n):
                        await one(client)
                    cpu, wall = (time.process_time() - c) / n * 1e6, (time.perf_counter() - t) / n * 1e6
                    if name not in best or cpu < best[name][0]:
                        best[name] = (cpu, wall)
        finally:
            await session.close()
            await pool.close()
        return best

    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {core})
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        best = runner.run(run())
    return [[name, round(cpu, 1), round(wall, 1)] for name, (cpu, wall) in best.items()]


def print_report(rows: list[list], stem: str, extra: dict) -> None:
    report("Upstream client: CPU per small POST to the fake backend, in one process on the proxy's core "
           "(2,000 sequential requests per round, clients in turns, best of 3 rounds)",
           HEADERS, rows, out=f"{stem}_client.json", extra=extra)
