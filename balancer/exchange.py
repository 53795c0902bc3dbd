"""One HTTP request and its response, as a route handler sees it, and the table of routes.

Every route of the balancer is a handler of an `Exchange`: it reads the request's method, path,
query, headers and body and writes one response — a whole body, or a stream of chunks — without
knowing which HTTP server carries it. The balancer's own front-end (balancer/front.py) serves
the whole `RouteTable`; with `fast_path = false` aiohttp serves the same table through
`WebExchange` (below), for comparison.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol

from aiohttp import web

from protocol.openai_api import error_body


class Exchange(Protocol):
    method: str  # upper case
    path: str  # percent-decoded, without the query
    remote: str | None  # the client's address

    @property
    def target(self) -> str:
        """The request target as the client sent it: the path (not decoded) and the query."""

    @property
    def query(self) -> Mapping[str, str]:
        """The query string's parameters (the first value of each name)."""

    def header(self, name: str) -> str | None:
        """A request header's (first) value; `name` in any case."""

    async def read(self) -> bytes:
        """The whole request body."""

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """A complete response (Content-Length framing); sent at once, or when the handler returns."""

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        """Start a streamed response: status and headers now, the body in `write` calls."""

    async def write(self, data: bytes) -> None:
        """One piece of a streamed body; waits while the client reads slowly. Raises
        ConnectionResetError when the client has gone."""

    async def end(self) -> None:
        """Finish the streamed body."""


Handler = Callable[[Exchange], Awaitable[None]]
JSON = {"Content-Type": "application/json"}


def reply_json(ex: Exchange, obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
    ex.reply(status, json.dumps(obj).encode(), {**JSON, **headers} if headers else dict(JSON))


def _unguarded(method: str, path: str, handler: Handler) -> Handler:
    return handler


class RouteTable:
    """path -> method -> handler, read-only once built. `resolve` answers every (method, path):
    the route's handler, the fallback's for a path under its prefix that no route has, or one
    that replies 404 / 405 (with `Allow`). HEAD is served by a GET
    route (the server sends the head of its answer only). `guard(method, path, handler)` puts
    each handler behind the checks its request needs, the 404 and 405 answers included (with
    API keys on, an unknown route answers 401 to a client without one: it reveals nothing)."""

    def __init__(self, routes: Mapping[str, Mapping[str, Handler]],
                 guard: Callable[[str, str, Handler], Handler] = _unguarded,
                 fallback: tuple[str, Handler] | None = None) -> None:
        self._guard = guard
        self._fallback = fallback  # (path prefix, handler of every method) for paths not in `routes`
        self._routes = MappingProxyType({
            path: MappingProxyType({method: guard(method, path, h) for method, h in by_method.items()})
            for path, by_method in routes.items()})

    def __iter__(self) -> Iterator[tuple[str, str, Handler]]:
        """(method, path, handler) of every route."""
        for path, by_method in self._routes.items():
            for method, handler in by_method.items():
                yield method, path, handler

    def resolve(self, method: str, path: str) -> Handler:
        by_method = self._routes.get(path)
        if by_method is None:
            if self._fallback is not None and path.startswith(self._fallback[0]):
                return self._guard(method, path, self._fallback[1])
            return self._guard(method, path, _not_found)
        handler = by_method.get(method) or (by_method.get("GET") if method == "HEAD" else None)
        if handler is None:
            allow = ", ".join(sorted({*by_method, *(("HEAD",) if "GET" in by_method else ())}))
            return self._guard(method, path, lambda ex: _not_allowed(ex, allow))
        return handler


async def _not_found(ex: Exchange) -> None:
    reply_json(ex, error_body(404, f"no route {ex.path}; GET /openapi.json lists the balancer's routes"), 404)


async def _not_allowed(ex: Exchange, allow: str) -> None:
    reply_json(ex, error_body(405, f"{ex.method} is not allowed on {ex.path}; use {allow}"), 405, {"Allow": allow})


class WebExchange:
    """An `Exchange` over an aiohttp request; `response` is what the route handler returns."""

    __slots__ = ("request", "response", "method", "path", "remote")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.method = request.method
        self.path = request.path
        self.remote = request.remote

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query

    @property
    def target(self) -> str:
        return self.request.raw_path

    def header(self, name: str) -> str | None:
        return self.request.headers.get(name)

    async def read(self) -> bytes:
        return await self.request.read()

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.response = web.Response(status=status, body=body, headers=headers)

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        out = web.StreamResponse(status=status, headers=headers)
        self.response = out
        await out.prepare(self.request)

    async def write(self, data: bytes) -> None:
        await self.response.write(data)

    async def end(self) -> None:
        await self.response.write_eof()


def web_handler(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp route handler running `handler` on a `WebExchange`."""
    async def route(request: web.Request) -> web.StreamResponse:
        ex = WebExchange(request)
        await handler(ex)
        return ex.response

    return route
