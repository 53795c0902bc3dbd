"""The client's side of one generation request, as the Proxy sees it.

The Proxy reads the request's headers and body and writes one response — a whole body, or a
stream of chunks — through an `Exchange`; it does not know which HTTP server carries it. Two
servers do: aiohttp (`WebExchange`, below: every route, and the generation routes when the
lean front-end is off) and the balancer's own front-end for the two generation routes
(`balancer/front.py`).
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web


class Exchange(Protocol):
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


class WebExchange:
    """An `Exchange` over an aiohttp request; `response` is what the route handler returns."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

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
