"""The balancer's public HTTP/1.1 server: a lean path for the two generation routes, aiohttp for the rest.

Every request a client sends for a completion pays for the HTTP server in front of the Proxy.
aiohttp's server (request and response objects, router, middlewares, payload streams) costs
about as much as the routing decision itself, so the two routes that carry the traffic —
`POST /v1/completions` and `POST /v1/chat/completions` — are served by this small server
instead: an asyncio protocol with the `httptools` (llhttp) request parser, one transport write
per unary response, chunked framing for streams. Everything else (admin API, metrics, health,
OpenAPI, `/v1/models`, ...) stays with the aiohttp application, which gets the connection itself:

    connection ─▶ _Connection (this module)
        a request line for one of the two routes ─▶ parsed here ─▶ Proxy (via `FrontExchange`)
        anything else at a request boundary     ─▶ the connection is handed to aiohttp's own
                                                   protocol object with the bytes read so far
                                                   (exact: no re-encoding), and stays there
        anything else behind a pipelined fast request, inside one read ─▶ re-serialised from the
                                                   parsed request, then handed over as above

Requests on one connection are answered in order (HTTP/1.1 pipelining); a client that sends
`Expect: 100-continue` gets the interim response; a body over the size limit gets 413 and the
connection is closed; a malformed request gets 400 and is closed; an idle connection is closed
after `keepalive_timeout_s` (aiohttp's default, 75 s); with `body_timeout_s`, a request whose
body has not arrived that long after it began gets 408 and the connection is closed (checked
by the idle sweep, to within a few seconds). The guard (API keys, limits, admission queue,
balancer/guard.py) is a function the route handlers call, so it applies here as on aiohttp;
with `--no-fast-path` aiohttp serves every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from types import MappingProxyType

import httptools

from protocol.openai_api import APIError, error_body

log = logging.getLogger(__name__)

Handler = Callable[["FrontExchange"], Awaitable[None]]

# Request lines this server parses itself; any other request line at a request boundary sends the
# connection to aiohttp unparsed. (A line that starts so but names another path, e.g.
# `/v1/completions2`, is parsed, found not to be a fast route and re-serialised for aiohttp.)
_FAST_STARTS = (b"POST /v1/completions", b"POST /v1/chat/completions")
_PEEK = 26  # bytes needed to tell: len(b"POST /v1/chat/completions") + 1
_STATUS_LINES = MappingProxyType({s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus})
# Headers a re-serialised request must not carry: its body is re-framed with Content-Length, and
# the interim 100 response has been sent already.
_REFRAMED = frozenset((b"content-length", b"transfer-encoding", b"expect"))


@dataclass(frozen=True)
class FrontConfig:
    max_body_bytes: int = 16 * 1024 * 1024
    keepalive_timeout_s: float = 75.0  # aiohttp's default `keepalive_timeout`
    max_queued: int = 32  # pipelined requests read ahead of the one being answered; reading pauses above
    shutdown_grace_s: float = 10.0  # requests in flight at shutdown get this long to finish
    body_timeout_s: float = 0.0  # a request must arrive whole within this long (0: no limit)


class FrontServer:
    """Protocol factory for `loop.create_server`. `routes` maps a path to its handler;
    `fallback` makes aiohttp's protocol for a connection (`AppRunner.server`)."""

    def __init__(self, cfg: FrontConfig, routes: dict[bytes, Handler], fallback: Callable[[], asyncio.Protocol],
                 on_reject: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.on_reject = on_reject  # told the reason of each request this server refuses itself (body_timeout)
        self.routes = routes
        self.fallback = fallback
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
                    conn._fail(408, f"the request did not arrive within {cfg.body_timeout_s:g} s")
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

    __slots__ = ("url", "headers", "body", "fast", "keep_alive", "size", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-case name, value)
        self.body: list[bytes] = []
        self.fast: Handler | None = None
        self.keep_alive = True
        self.size = 0


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them one at a time, in order."""

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.msg: _Message | None = None  # the request being read (None between requests)
        # Complete requests waiting their turn: a `_Message` for this server, or bytes for aiohttp
        # (once bytes are queued, everything after them goes to aiohttp too).
        self.queue: deque[_Message | bytes | _Failure] = deque()
        self.handing_over = False
        self.head = b""  # the first bytes of a request line, too few to tell which route
        self.task: asyncio.Task | None = None  # the request being answered
        self.active = time.monotonic()  # when it last received bytes or finished an answer
        self.closed = False
        self.failed = False  # a request could not be parsed: an error is on its way, then the close
        self.eof = False  # the client has half-closed: answer what it sent, then close
        self.paused = False  # reading paused (too many requests queued, or waiting to hand over)
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

    def pause_writing(self) -> None:
        if self.drained is None or self.drained.done():
            self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def eof_received(self) -> bool:
        # The client will send no more: answer what it sent (the transport stays open for
        # writing), then close.
        self.eof = True
        if self.task is None and not self.queue:
            self.close()
        return True

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.active = time.monotonic()
        if self.msg is None and not self.handing_over:
            # At a request boundary: is this a request for one of our routes?
            if self.head:
                data, self.head = self.head + data, b""
            if not data.startswith(_FAST_STARTS):
                if len(data) < _PEEK and any(s.startswith(data[:len(s)]) for s in _FAST_STARTS):
                    self.head = data  # too short to tell yet
                    return
                self.queue.append(data)
                self._hand_over_when_ready()
                return
        if self.handing_over and self.msg is None:
            self.queue.append(data)  # raw bytes behind requests still to be answered here
            self._pause()
            return
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
        msg.keep_alive = parser.should_keep_alive()
        length = expect = encoded = None
        for name, value in msg.headers:
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value
            elif name == b"content-encoding":
                encoded = value
        if length is not None and length.strip().isdigit() and int(length) > self.server.cfg.max_body_bytes:
            raise _TooLarge(int(length))
        if (not self.handing_over and parser.get_method() == b"POST" and parser.get_http_version() == "1.1"
                and (encoded is None or encoded.strip().lower() == b"identity")):
            msg.fast = self.server.routes.get(msg.url.partition(b"?")[0])
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
        if msg.fast is not None and not self.handing_over:
            self.queue.append(msg)
        else:  # for aiohttp, behind what is queued here
            self.handing_over = True
            self.queue.append(_reserialise(self.parser, msg))

    # ------------------------------------------------------------------ answering
    def _next(self) -> None:
        """Start answering the next queued request, if none is being answered."""
        if self.task is not None or self.closed:
            return
        if not self.queue:
            if self.eof:
                self.close()
            elif not self.handing_over:
                self._resume()
            self.active = time.monotonic()
            return
        if isinstance(self.queue[0], bytes):
            self._hand_over_when_ready()
            return
        msg = self.queue.popleft()
        if isinstance(msg, _Failure):
            self._send_error_and_close(msg.status, msg.message)
            return
        self.task = asyncio.get_running_loop().create_task(self._answer(msg))

    async def _answer(self, msg: _Message) -> None:
        ex = FrontExchange(self, msg)
        try:
            await msg.fast(ex)
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

    def _hand_over_when_ready(self) -> None:
        """Give the connection to aiohttp once nothing is being answered or read here."""
        self.handing_over = True
        if self.closed:
            return
        if self.task is not None:
            self._pause()  # it goes over when the request being answered is done (`_next`)
            return
        if self.msg is not None:
            # A request is half read: read on; it goes over too once complete (`data_received`
            # re-serialises it and calls `_next`).
            self._resume()
            return
        data = b"".join(self.queue)  # only bytes are left: everything after the first bytes is bytes
        self.queue.clear()
        self.server.connections.discard(self)
        protocol = self.server.fallback()
        transport = self.transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        self._resume()
        if data:
            protocol.data_received(data)
        if self.eof:
            protocol.eof_received()

    def _fail(self, status: int, message: str) -> None:
        """Bytes that cannot be read as a request: the requests read before them are answered,
        then this error, then the connection closes (no request after them can be framed)."""
        self.failed = True
        self.msg = None
        self._pause()
        kept = [m for m in self.queue if isinstance(m, _Message)]  # bytes for aiohttp sit behind all of these
        self.queue.clear()
        self.queue.extend(kept)
        self.queue.append(_Failure(status, message))
        self.handing_over = False
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


def _reserialise(parser: httptools.HttpRequestParser, msg: _Message) -> bytes:
    """A parsed request as HTTP/1.1 bytes for aiohttp: same method, target and headers, the body
    re-framed with Content-Length."""
    body = b"".join(msg.body)
    lines = [b"%s %s HTTP/%s" % (parser.get_method(), msg.url, parser.get_http_version().encode())]
    lines += [b"%s: %s" % (n, v) for n, v in msg.headers if n not in _REFRAMED]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _head(server: FrontServer, status: int, headers: dict[str, str], length: int | None, close: bool) -> bytes:
    """Status line and headers; `length` None means a chunked body."""
    out = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    for name, value in headers.items():
        out.append(f"{name}: {value}\r\n".encode("latin-1"))
    out.append(b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length)
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"Date: %s\r\n\r\n" % server.date())
    return b"".join(out)


class FrontExchange:
    """The `Exchange` (balancer/exchange.py) of one request on this server."""

    __slots__ = ("conn", "msg", "started", "finished")
    body_complete = True  # the whole body is here before the handler runs

    def __init__(self, conn: _Connection, msg: _Message) -> None:
        self.conn = conn
        self.msg = msg
        self.started = False
        self.finished = False

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
        body = self.msg.body
        return body[0] if len(body) == 1 else b"".join(body)

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        conn = self.conn
        self.started = self.finished = True
        if not conn.closed:
            conn.transport.write(_head(conn.server, status, headers, len(body), not self.msg.keep_alive) + body)

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        conn = self.conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        self.started = True
        conn.transport.write(_head(conn.server, status, headers, None, not self.msg.keep_alive))

    async def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        if data:
            conn.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        if conn.drained is not None and not conn.drained.done():
            await conn.drained
            if conn.closed:
                raise ConnectionResetError("the client closed the connection")

    async def end(self) -> None:
        conn = self.conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        self.finished = True
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
            conn.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            self.finished = True

    def abort(self) -> None:
        """The response cannot be completed (cancelled): close the connection so the client
        does not wait for the rest."""
        self.finished = True
        self.conn.close()
