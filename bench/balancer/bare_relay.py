"""A reference target: the least an aiohttp proxy does (server + one ClientSession, body bytes
passed through, SSE relayed as read), a floor for any proxy built on aiohttp, kvfleet's included.

    python -m bench.balancer.bare_relay UPSTREAM_URL    # prints "... listening on http://..."
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def serve(upstream: str) -> None:
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                    auto_decompress=False)
    ctype = {"Content-Type": "application/json"}

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(upstream + request.path, data=body, headers=ctype) as up:
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(), headers=ctype)
            out = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.router.add_post("/v1/completions", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"bare aiohttp relay listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(sys.argv[1]))
