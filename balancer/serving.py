"""Listening: the balancer's app on a host and port.

`start` runs the app's start-up (the Balancer's tasks) and opens the listening socket: the
lean front-end (balancer/front.py) serving the app's route table, or, with `fast_path = false`,
aiohttp serving the same table. `Serving.close` stops listening, lets requests in flight
finish, and runs the app's clean-up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from balancer.app import BALANCER, GUARD, ROUTES
from balancer.front import FrontConfig, FrontServer


@dataclass
class Serving:
    runner: web.AppRunner
    addresses: list[tuple[str, int]]
    server: asyncio.AbstractServer | None = None  # the front-end's listening socket
    front: FrontServer | None = None

    @property
    def url(self) -> str:
        host, port = self.addresses[0][:2]
        return f"http://{host}:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.front.close()
            await self.server.wait_closed()
        await self.runner.cleanup()


def front_server(app: web.Application) -> FrontServer:
    """The lean front-end for `app` (from `create_app`): its routes, body limits and guard."""
    cfg = app[BALANCER].cfg
    guard = app[GUARD]
    return FrontServer(FrontConfig(max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.guard.body_timeout_s),
                       app[ROUTES], on_reject=lambda reason: guard.rejected.labels(reason).inc())


async def start(app: web.Application, host: str, port: int, **runner_kw) -> Serving:
    """Listen on host:port (0: a free port); the body limit is the app's balancer config's."""
    # handler_cancellation: on aiohttp's server too (--no-fast-path), a client that closes its
    # connection cancels its handler (as the fast path's front does: balancer/front.py).
    runner = web.AppRunner(app, handler_cancellation=True, **runner_kw)
    await runner.setup()  # the app's start-up: the Balancer's tasks
    try:
        if not app[BALANCER].cfg.fast_path:
            site = web.TCPSite(runner, host, port)
            await site.start()
            return Serving(runner, [a[:2] for a in runner.addresses])
        front = front_server(app)
        server = await asyncio.get_running_loop().create_server(front, host, port, reuse_address=True, backlog=1024)
    except BaseException:
        await runner.cleanup()
        raise
    return Serving(runner, [s.getsockname()[:2] for s in server.sockets], server, front)
