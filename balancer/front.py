"""The balancer's HTTP/1.1 server: every route of its `RouteTable`, on one connection stack.

aiohttp's server (request and response objects, router, middlewares, payload streams) costs
about as much as the routing decision itself, so the balancer serves HTTP with this small
server instead: an asyncio protocol with the `httptools` (llhttp) request parser, one transport
write per unary response, chunked framing for streams. It answers every request itself, from
the route table (balancer/exchange.py: the generation routes, /health, /metrics, /v1/models,
/openapi.json, the admin API), so a connection never changes hands:

    connection ─▶ _Connection: parse (httptools) ─▶ RouteTable.resolve(method, path)
                  ─▶ the handler, on a `FrontExchange` ─▶ one response, in request order

Requests on one connection are answered in order (HTTP/1.1 pipelining); a client that sends
`Expect: 100-continue` gets the interim response; a client that closes its connection (or
only its sending side) while its request waits for a replica has left: the request is cancelled
(499) and its upstream connection closed, so the replica aborts it; a body over the size limit
gets 413 and the connection is closed; a malformed request gets 400 and is closed; a body in gzip or deflate is
decoded (within the size limit), another Content-Encoding gets 415; HTTP/1.0 clients get
streams without chunked framing, ended by the close; HEAD is answered by a GET route without
its body; an idle connection is closed after `keepalive_timeout_s` (aiohttp's default, 75 s);
with `body_timeout_s`, a request whose body has not arrived that long after its headers gets 408
and the connection is closed (checked by the idle sweep, to within a few seconds). The guard
(API keys, limits, admission queue, balancer/guard.py) is part of the handlers in the table.
With `--no-fast-path` aiohttp serves the same table instead (for comparison).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from types import MappingProxyType
from urllib.parse import parse_qsl, unquote

import httptools

from balancer.exchange import Handler, RouteTable
from protocol.openai_api import APIError, error_body

log = logging.getLogger(__name__)

_STATUS_LINES = MappingProxyType({s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus})
# Content-Encoding -> zlib's wbits for it (RFC 9110 §8.4.1: gzip, deflate = zlib format; aiohttp
# also accepts raw deflate, as `wbits=-15` after a failed zlib header: kept out, no client sends it).
_DECODERS = MappingProxyType({b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS})


@dataclass(frozen=True)
class FrontConfig:
    max_body_bytes: int = 16 * 1024 * 1024
    keepalive_timeout_s: float = 75.0  # aiohttp's default `keepalive_timeout`
    max_queued: int = 32  # pipelined requests read ahead of the one being answered; reading pauses above
    shutdown_grace_s: float = 10.0  # requests in flight at shutdown get this long to finish
    body_timeout_s: float = 0.0  # a request must arrive whole within this long (0: no limit)


class FrontServer:
    """Protocol factory for `loop.create_server`: serves `routes`."""

    def __init__(self, cfg: FrontConfig, routes: RouteTable, on_reject: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.on_reject = on_reject  # told the reason of each request this server refuses itself (body_timeout)
        self.routes = routes
        self.connections: set[_Connection] = set()
        self._date = (0, b"")
        self._sweeper: asyncio.Task | None = None

    def __call__(self) -> "_Connection":
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="front:idle-sweep")
        return _Connection(self)

    def date(self) -> bytes:
        """The Date header's value, formatted once per second (RFC 9110 §6.6.1)."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    async def _sweep(self) -> None:
        cfg = self.cfg
        period = min(5.0, cfg.keepalive_timeout_s / 2, cfg.body_timeout_s / 2 if cfg.body_timeout_s > 0 else 5.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            limit = now - cfg.keepalive_timeout_s
            for conn in [c for c in self.connections if c.task is None and c.active < limit]:
                conn.close()
            if cfg.body_timeout_s > 0:
                late = now - cfg.body_timeout_s
                for conn in [c for c in self.connections if c.msg is not None and not c.failed and c.msg.started < late]:
                    conn._fail(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s; send it "
                                    "at once, or ask for a longer --body-timeout")
                    if self.on_reject is not None:
                        self.on_reject("body_timeout")

    async def close(self) -> None:
        """Stop the idle sweep, let requests in flight finish (up to the grace period, then
        cancel them), close every connection still here."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.cfg.shutdown_grace_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()


class _Message:
    """One request while it is read."""

    __slots__ = ("url", "headers", "body", "handler", "method", "path", "keep_alive", "http10", "encoding", "size",
                 "started")

    def __init__(self) -> None:
        self.started = float("inf")  # when its headers were complete: the body timeout runs from here
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-case name, value)
        self.body: list[bytes] = []
        self.handler: Handler | None = None
        self.method = ""
        self.path = ""
        self.keep_alive = True
        self.http10 = False  # an HTTP/1.0 client: no chunked framing
        self.encoding: bytes | None = None  # the body's Content-Encoding, when not identity
        self.size = 0


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them one at a time, in order."""

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.msg: _Message | None = None  # the request being read (None between requests)
        self.queue: deque[_Message | _Failure] = deque()  # complete requests waiting their turn
        self.task: asyncio.Task | None = None  # the request being answered
        self.active = time.monotonic()  # when it last received bytes or finished an answer
        self.closed = False
        self.failed = False  # a request could not be parsed: an error is on its way, then the close
        self.eof = False  # the client has half-closed: answer what it sent, then close
        self.paused = False  # reading paused (too many requests queued, or a failure being answered)
        self.drained: asyncio.Future | None = None  # set while the transport's write buffer is full

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if self.task is not None and not self.task.done():
            self._client_left()

    def _client_left(self) -> None:
        """The client left while its request was being answered: cancel the handler, which gives
        up what it waits for (its admission turn, the replica's answer, whose connection it
        closes, so the replica aborts the request) and logs 499. (A stream's next write would
        see it too, but only once the replica sends something.)"""
        self.queue.clear()  # pipelined requests behind it: nobody to answer
        self.task.cancel()

    def pause_writing(self) -> None:
        if self.drained is None or self.drained.done():
            self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def eof_received(self) -> bool:
        # The client will send no more. While one of its requests waits for something (the
        # replica's answer, its admission turn) that means it left, as nginx takes a client's
        # close during a proxied request ("client prematurely closed connection", 499; nginx's
        # proxy_ignore_client_abort, off by default): cancel it, as connection_lost does. Else
        # answer what it sent (the transport stays open for writing), then close.
        self.eof = True
        if self.task is not None and not self.task.done():
            self._client_left()
        elif self.task is None and not self.queue:
            self.close()
        return True

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported on this route")
            return
        except httptools.HttpParserError as e:
            # An exception raised in a callback comes back as HttpParserCallbackError with the
            # original as its context.
            if isinstance(e.__context__, _TooLarge):
                self._fail(413, f"request body too large ({e.__context__.size} bytes; the limit is "
                                f"{self.server.cfg.max_body_bytes}); send a smaller body")
            else:
                self._fail(400, f"malformed HTTP request ({e}); send a valid HTTP/1.1 request")
            return
        if len(self.queue) > self.server.cfg.max_queued:
            self._pause()
        self._next()

    # ------------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        self.msg = _Message()

    def on_url(self, url: bytes) -> None:
        self.msg.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.msg.headers.append((name.lower(), value))  # names compared lower-case from here on

    def on_headers_complete(self) -> None:
        msg, parser = self.msg, self.parser
        msg.started = time.monotonic()
        msg.keep_alive = parser.should_keep_alive()
        msg.http10 = parser.get_http_version() == "1.0"
        length = expect = encoded = None
        for name, value in msg.headers:
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value
            elif name == b"content-encoding":
                encoded = value.strip().lower()
        if length is not None and length.strip().isdigit() and int(length) > self.server.cfg.max_body_bytes:
            raise _TooLarge(int(length))
        if encoded is not None and encoded != b"identity":
            msg.encoding = encoded
        path = msg.url.partition(b"?")[0].decode("latin-1")
        msg.path = unquote(path) if "%" in path else path
        msg.method = parser.get_method().decode("latin-1")
        msg.handler = self.server.routes.resolve(msg.method, msg.path)
        if expect is not None and expect.strip().lower() == b"100-continue" and self.task is None and not self.queue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        msg = self.msg
        msg.size += len(body)
        if msg.size > self.server.cfg.max_body_bytes:
            raise _TooLarge(msg.size)
        msg.body.append(body)

    def on_message_complete(self) -> None:
        msg, self.msg = self.msg, None
        self.queue.append(msg)

    # ------------------------------------------------------------------ answering
    def _next(self) -> None:
        """Start answering the next queued request, if none is being answered."""
        if self.task is not None or self.closed:
            return
        if not self.queue:
            if self.eof:
                self.close()
            else:
                self._resume()
            self.active = time.monotonic()
            return
        msg = self.queue.popleft()
        if isinstance(msg, _Failure):
            self._send_error_and_close(msg.status, msg.message)
            return
        self.task = asyncio.get_running_loop().create_task(self._answer(msg))

    async def _answer(self, msg: _Message) -> None:
        ex = FrontExchange(self, msg)
        try:
            await msg.handler(ex)
        except APIError as e:
            ex.error(e.status, e.body())
        except asyncio.CancelledError:
            ex.abort()
            raise
        except Exception:  # a bug: the client gets a 500, the connection and the server go on
            log.exception("unhandled error answering %s", msg.url.decode("latin-1"))
            ex.error(500, error_body(500, "internal error in the balancer; see its log"))
        finally:
            self.task = None
            if not ex.finished:  # an open stream the handler left unfinished: the framing is lost
                ex.abort()
            elif not msg.keep_alive:
                self.close()
            self._next()

    def _pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _fail(self, status: int, message: str) -> None:
        """Bytes that cannot be read as a request: the requests read before them are answered,
        then this error, then the connection closes (no request after them can be framed)."""
        self.failed = True
        self.msg = None
        self._pause()
        self.queue.append(_Failure(status, message))
        self._next()

    def _send_error_and_close(self, status: int, message: str) -> None:
        if not self.closed:
            body = json.dumps(error_body(status, message)).encode()
            self.transport.write(_head(self.server, status, {"Content-Type": "application/json"}, len(body), True)
                                 + body)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.connections.discard(self)
            self.transport.close()


@dataclass(frozen=True, slots=True)
class _Failure:
    """In the queue: the error answer for bytes that could not be parsed."""

    status: int
    message: str


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _decode_body(msg: _Message, limit: int) -> None:
    """Decode the body of `msg` in place from its Content-Encoding (at most `limit` bytes
    decoded), or raise the APIError that answers it."""
    wbits = _DECODERS.get(msg.encoding)
    if wbits is None:
        raise APIError(415, f"Content-Encoding {msg.encoding.decode('latin-1')!r} is not supported; send the "
                            "body uncompressed, or in gzip or deflate")
    decoder = zlib.decompressobj(wbits)
    try:
        body = decoder.decompress(b"".join(msg.body), limit + 1)
        if not decoder.eof and len(body) <= limit:
            raise zlib.error("the compressed body ends early")
    except zlib.error as e:
        raise APIError(400, f"the request body could not be decoded as {msg.encoding.decode('latin-1')} ({e}); "
                            "send it uncompressed or correctly encoded") from None
    if len(body) > limit:
        raise APIError(413, f"request body too large once decoded (over {limit} bytes); send a smaller body")
    msg.body = [body]
    msg.encoding = None


def _head(server: FrontServer, status: int, headers: dict[str, str], length: int | None, close: bool) -> bytes:
    """Status line and headers; `length` None means a chunked body, -1 one ended by the close."""
    out = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    for name, value in headers.items():
        out.append(f"{name}: {value}\r\n".encode("latin-1"))
    if length is None:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif length >= 0:
        out.append(b"Content-Length: %d\r\n" % length)
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"Date: %s\r\n\r\n" % server.date())
    return b"".join(out)


class FrontExchange:
    """The `Exchange` (balancer/exchange.py) of one request on this server."""

    __slots__ = ("conn", "msg", "method", "path", "started", "finished", "_query")
    body_complete = True  # the whole body is here before the handler runs

    def __init__(self, conn: _Connection, msg: _Message) -> None:
        self.conn = conn
        self.msg = msg
        self.method = msg.method
        self.path = msg.path
        self.started = False
        self.finished = False
        self._query: Mapping[str, str] | None = None

    @property
    def query(self) -> Mapping[str, str]:
        if self._query is None:
            q: dict[str, str] = {}
            for name, value in parse_qsl(self.msg.url.partition(b"?")[2].decode("latin-1"), keep_blank_values=True):
                q.setdefault(name, value)  # the first value, as aiohttp's `query.get`
            self._query = MappingProxyType(q)
        return self._query

    @property
    def target(self) -> str:
        return self.msg.url.decode("latin-1")

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for n, v in self.msg.headers:  # a handful of headers: a scan beats building a mapping
            if n == key:
                return v.decode("latin-1")
        return None

    @property
    def remote(self) -> str | None:
        """The client's address (as aiohttp's `request.remote`)."""
        peer = self.conn.transport.get_extra_info("peername") if self.conn.transport is not None else None
        return peer[0] if isinstance(peer, (tuple, list)) and peer else None

    async def read(self) -> bytes:
        msg = self.msg
        if msg.encoding is not None:  # decoded when read: after the guard's key check
            _decode_body(msg, self.conn.server.cfg.max_body_bytes)
        body = msg.body
        return body[0] if len(body) == 1 else b"".join(body)

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        conn = self.conn
        self.started = self.finished = True
        if not conn.closed:
            head = _head(conn.server, status, headers, len(body), not self.msg.keep_alive)
            conn.transport.write(head if self.method == "HEAD" else head + body)

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        conn, msg = self.conn, self.msg
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        self.started = True
        if msg.http10:  # no chunked framing in HTTP/1.0: the body ends with the connection
            msg.keep_alive = False
            conn.transport.write(_head(conn.server, status, headers, -1, True))
        else:
            conn.transport.write(_head(conn.server, status, headers, None, not msg.keep_alive))

    async def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        if data:
            conn.transport.write(data if self.msg.http10 else b"%x\r\n%s\r\n" % (len(data), data))
        if conn.drained is not None and not conn.drained.done():
            await conn.drained
            if conn.closed:
                raise ConnectionResetError("the client closed the connection")

    async def end(self) -> None:
        conn = self.conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        self.finished = True
        if not self.msg.http10:
            conn.transport.write(b"0\r\n\r\n")

    def error(self, status: int, body: dict) -> None:
        """An error response: in full if nothing was sent yet; in a started stream, as a last
        event (the status line has gone out) and the stream ends."""
        conn = self.conn
        if conn.closed:
            self.finished = True
            return
        if not self.started:
            self.reply(status, json.dumps(body).encode(), {"Content-Type": "application/json"})
            return
        if not self.finished:
            data = b"data: " + json.dumps(body).encode() + b"\n\n"
            conn.transport.write(data if self.msg.http10 else b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            self.finished = True

    def abort(self) -> None:
        """The response cannot be completed (cancelled): close the connection so the client
        does not wait for the rest."""
        self.finished = True
        self.conn.close()
