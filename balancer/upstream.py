"""The balancer's HTTP/1.1 client to its replicas: keep-alive connections, llhttp parsing.

The data path's one client. aiohttp's `ClientSession` spends ~140 µs of CPU per small POST on
this machine (request and response objects, multidicts, timers, traces, a connector round); a
connection here is one `asyncio.Protocol` with `httptools`' response parser (llhttp, the parser
of Node.js), and a request is one `transport.write`: ~40 µs. It speaks just what a proxy in
front of OpenAI-style servers needs:

- POST with a body, response framed by Content-Length, chunked transfer coding or the end of the
  connection; the body comes back de-chunked, as one `bytes` (`read`) or piece by piece as it
  arrives (`iter_any`), with read back-pressure (the socket is paused while a slow consumer has
  more than `buffer_limit` bytes unread);
- a pool of idle keep-alive connections per replica (LIFO, so idle ones age out), each closed
  after `idle_timeout_s` unused, or when the replica says `Connection: close`;
- a request whose reused connection turns out to have been closed by the replica before any
  byte of the response came back is sent again, once, on a new connection (the replica closed an
  idle connection just as it was taken: the request never reached it);
- `connect_timeout_s` for a new connection and `read_timeout_s`, the longest silence allowed from a
  replica while a response is awaited (aiohttp's `sock_read`), enforced by one watchdog task per
  pool that looks at every busy connection `watchdog_period_s` apart: no timer per read.

Errors: `ConnectFailed` (no connection: refused, unreachable, connect timeout) and
`UpstreamError` (the connection broke, timed out or spoke bad HTTP after it was made).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """A replica's response could not be had: the connection broke, went silent or spoke bad HTTP."""


class ConnectFailed(UpstreamError):
    """No connection to the replica could be made (refused, unreachable, timed out)."""


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0  # longest silence from a replica while a response is awaited
    idle_timeout_s: float = 30.0  # an unused keep-alive connection is closed after this
    buffer_limit: int = 1 << 20  # unread response bytes above which the socket is paused
    watchdog_period_s: float = 1.0  # how often timeouts are checked (their resolution)
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (e.g. Authorization)

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.read_timeout_s, self.idle_timeout_s, self.watchdog_period_s) <= 0:
            raise ValueError("upstream timeouts and the watchdog period must be positive")


_NO_BODY_STATUS = frozenset((204, 304))


class UpstreamResponse:
    """One response: `status` and `headers` (lower-case names) once `post` returns; the body by
    `read()` or `iter_any()`; `release()` when done with it (always: it returns the connection to
    the pool, or closes it if the body was not read to the end)."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_size", "_complete", "_error", "_waiter", "_released",
                 "_unbounded")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None  # the consumer waiting for anything to change
        self._released = False
        self._unbounded = False  # read() takes the whole body: no back-pressure

    # --------------------------------------------------------------- fed by the connection
    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._conn.pool.cfg.buffer_limit and not self._unbounded:
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._complete:
            self._error = error
        self._wake()

    # --------------------------------------------------------------- for the consumer
    async def _wait(self) -> None:
        self._waiter = self._conn.pool.loop.create_future()
        await self._waiter

    def _take(self) -> bytes:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body (waits for its end)."""
        self._unbounded = True
        self._conn.resume_reading()
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._take()

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever came in since the last piece (never empty)."""
        while True:
            if self._chunks:
                yield self._take()
                continue
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._conn.done_with(self)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one replica, and the parser of its responses."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.reused = False  # has served a response before the current one
        self.got_bytes = False  # any byte of the current response arrived
        self.keep_alive = False
        self.close_delimited = False
        self.closed = False
        self.paused = False
        self.last_active = 0.0  # loop time of the last byte in (busy) or of the release (idle)

    # --------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_active = self.pool.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._broken(UpstreamError(f"bad HTTP from the replica: {e}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        r = self.response
        if r is not None and not r._complete:
            if self.close_delimited and exc is None:  # the body ran until the connection's end
                r._finish()
            else:
                r._fail(UpstreamError(f"the replica closed the connection"
                                      f"{'' if exc is None else f' ({exc})'} before the response ended"))

    # --------------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        r = self.response
        r.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        h = r.headers
        self.close_delimited = ("content-length" not in h and "transfer-encoding" not in h
                                and r.status not in _NO_BODY_STATUS)
        r._wake()  # `UpstreamPool._exchange` waits for the status

    def on_body(self, body: bytes) -> None:
        if body:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        self.response._finish()

    # --------------------------------------------------------------- state
    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.last_active = self.pool.loop.time()
            self.transport.resume_reading()

    def _broken(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes, response: UpstreamResponse) -> None:
        self.response = response
        self.got_bytes = False
        self.last_active = self.pool.loop.time()
        self.transport.write(data)

    def done_with(self, response: UpstreamResponse) -> None:
        if response is not self.response:
            return
        self.response = None
        if response._complete and response._error is None and self.keep_alive and not self.closed:
            self.reused = True
            self.resume_reading()
            self.pool._idle_again(self)
        else:
            self.close()


class UpstreamPool:
    """Keep-alive connections to any number of replicas; `request` (mostly `post`) sends one."""

    def __init__(self, cfg: UpstreamConfig = UpstreamConfig()) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._targets: dict[str, tuple[tuple[str, int], bytes]] = {}  # base URL -> (host, port), Host line
        self._extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in cfg.headers)
        self._watchdog = asyncio.create_task(self._watch(), name="upstream-watchdog")

    def _target(self, base_url: str) -> tuple[tuple[str, int], bytes]:
        t = self._targets.get(base_url)
        if t is None:
            u = urlsplit(base_url)
            if u.scheme != "http" or not u.hostname:
                raise ConnectFailed(f"{base_url!r}: only http://HOST:PORT replicas are supported")
            port = u.port or 80
            host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
            t = self._targets[base_url] = ((u.hostname, port), f"Host: {host}:{port}\r\n".encode("latin-1"))
        return t

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST body to base_url + path; returns once the status line and headers are in."""
        return await self.request("POST", base_url, path, body, headers)

    async def request(self, method: str, base_url: str, target: str, body: bytes,
                      headers: dict[str, str]) -> UpstreamResponse:
        """`method` base_url + target (a path and maybe a query), as `post`."""
        key, host_line = self._target(base_url)
        head = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), host_line, self._extra]
        for k, v in headers.items():
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        head.append(f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1"))
        data = b"".join(head) + body
        conn = await self._connection(key, reuse=True)
        try:
            return await self._exchange(conn, data)
        except UpstreamError:
            if not conn.reused or conn.got_bytes:
                raise
        # A stale keep-alive connection (closed by the replica as it was taken): once more, new.
        return await self._exchange(await self._connection(key, reuse=False), data)

    async def _exchange(self, conn: _Connection, data: bytes) -> UpstreamResponse:
        response = UpstreamResponse(conn)
        self._busy.add(conn)
        try:
            conn.send(data, response)
            # Until the headers are in, or the connection failed (both wake `response`).
            while response.status == 0 and response._error is None and not conn.closed:
                await response._wait()
        except BaseException:
            response.release()
            raise
        if response.status == 0:  # woken without headers: the connection failed first
            error = response._error or UpstreamError("the replica closed the connection before answering")
            response.release()
            raise error
        return response

    async def _connection(self, key: tuple[str, int], reuse: bool) -> _Connection:
        idle = self._idle.get(key) if reuse else None
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self, key), key[0], key[1]),
                self.cfg.connect_timeout_s)
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connecting to {key[0]}:{key[1]} timed out after "
                                f"{self.cfg.connect_timeout_s:g} s") from None
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {e.strerror or e}") from None
        return conn

    def _idle_again(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.last_active = self.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def _watch(self) -> None:
        """Time out silent replicas and close connections idle too long."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(min(cfg.watchdog_period_s, cfg.read_timeout_s / 2, cfg.idle_timeout_s / 2))
            try:
                self._check(self.loop.time())
            except Exception:  # a bug here must not end the timeouts for good
                log.exception("upstream watchdog: check failed; continuing")

    def _check(self, now: float) -> None:
        """One watchdog pass: read timeouts of busy connections, idle timeouts of pooled ones."""
        cfg = self.cfg
        for conn in list(self._busy):
            if (conn.response is not None and not conn.paused and not conn.response._complete
                    and now - conn.last_active > cfg.read_timeout_s):
                conn._broken(UpstreamError(f"the replica sent nothing for {cfg.read_timeout_s:g} s "
                                           f"(read timeout)"))
        for conns in self._idle.values():
            for conn in [c for c in conns if now - c.last_active > cfg.idle_timeout_s]:
                conns.remove(conn)
                conn.close()

    async def close(self) -> None:
        self._watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watchdog
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        for conn in list(self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()
