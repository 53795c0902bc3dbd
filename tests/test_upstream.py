"""The balancer's upstream HTTP/1.1 client (balancer/upstream.py) against a real socket server
whose every answer is scripted: framing, keep-alive, stale connections, timeouts, back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from balancer.upstream import ConnectFailed, UpstreamConfig, UpstreamError, UpstreamPool


class Server:
    """A TCP server on loopback; `handler(reader, writer, n)` answers the n-th connection."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and Content-Length body), or None at the connection's end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        req = head + await reader.readexactly(length)
        self.requests.append(req)
        return req


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + \
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


async def keep_alive_echo(srv: Server, reader, writer, n: int) -> None:
    while (req := await srv.read_request(reader)) is not None:
        writer.write(ok(req.split(b"\r\n\r\n", 1)[1]))
        await writer.drain()


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def serving(handler, cfg: UpstreamConfig | None = None):
    """(server, its URL, a pool) for one test; the pool is closed before the server."""
    srv = Server(handler)
    async with srv as url:
        pool = UpstreamPool(cfg or UpstreamConfig())
        try:
            yield srv, url, pool
        finally:
            await pool.close()


def test_keep_alive_connection_is_reused_and_bodies_arrive_intact():
    async def main():
        cfg = UpstreamConfig(headers=(("Authorization", "Bearer k"),))
        async with serving(keep_alive_echo, cfg) as (srv, url, pool):
            for i in range(5):
                r = await pool.post(url, "/v1/completions", b'{"n": %d}' % i, {"X-Request-Id": f"r{i}"})
                assert r.status == 200 and r.headers["content-type"] == "application/json"
                assert await r.read() == b'{"n": %d}' % i
                r.release()
        assert srv.connections == 1
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer k\r\n" in first and b"\r\nX-Request-Id: r0\r\n" in first
        assert b"\r\nHost: 127.0.0.1:" in first

    run(main())


def test_chunked_body_is_dechunked_and_streamed_as_it_arrives():
    go_on = None

    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await go_on.wait()  # the client must have the first event before the second exists
        writer.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await srv.read_request(reader)

    async def main():
        nonlocal go_on
        go_on = asyncio.Event()
        async with serving(handler) as (_, url, pool):
            r = await pool.post(url, "/v1/completions", b"{}", {})
            pieces = []
            async for piece in r.iter_any():
                pieces.append(piece)
                go_on.set()
            r.release()
            assert b"".join(pieces) == b"data: first\n\ndata: second\n\n"
            assert pieces[0] == b"data: first\n\n"

    run(main())


def test_close_delimited_body_and_connection_close_are_not_reused():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        if n == 1:  # no length, no chunking: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        else:
            writer.write(ok(b"bye", b"Connection: close\r\n"))
        await writer.drain()

    async def main():
        async with serving(handler) as (srv, url, pool):
            for expected in (b"until the end", b"bye", b"bye"):
                r = await pool.post(url, "/x", b"", {})
                assert await r.read() == expected
                r.release()
        assert srv.connections == 3

    run(main())


def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        writer.write(ok(b"one"))
        await writer.drain()
        if n == 1:  # takes the next request on the same connection, then closes without an answer
            await srv.read_request(reader)
            return
        await srv.read_request(reader)

    async def main():
        async with serving(handler) as (srv, url, pool):
            for _ in range(2):
                r = await pool.post(url, "/x", b"{}", {})
                assert r.status == 200 and await r.read() == b"one"
                r.release()
        assert srv.connections == 2

    run(main())


def test_a_new_connection_that_closes_unanswered_is_an_error():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)

    async def main():
        async with serving(handler) as (_, url, pool):
            with pytest.raises(UpstreamError, match="closed the connection"):
                await pool.post(url, "/x", b"{}", {})

    run(main())


def test_connection_refused_is_connect_failed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

        async def main():
            pool = UpstreamPool()
            try:
                with pytest.raises(ConnectFailed, match="cannot connect"):
                    await pool.post(f"http://127.0.0.1:{port}", "/x", b"{}", {})
                with pytest.raises(ConnectFailed, match="only http"):
                    await pool.post("https://127.0.0.1:1", "/x", b"{}", {})
            finally:
                await pool.close()

        run(main())


def test_a_silent_replica_hits_the_read_timeout_mid_body():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async def main():
        async with serving(handler, UpstreamConfig(read_timeout_s=0.3, watchdog_period_s=0.05)) as (_, url, pool):
            r = await pool.post(url, "/x", b"{}", {})
            got = []
            with pytest.raises(UpstreamError, match="read timeout"):
                async for piece in r.iter_any():
                    got.append(piece)
            r.release()
            assert got == [b"hello"]

    run(main())


def test_bad_http_is_an_upstream_error():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def main():
        async with serving(handler) as (_, url, pool):
            with pytest.raises(UpstreamError):
                await pool.post(url, "/x", b"{}", {})

    run(main())


def test_a_slow_consumer_pauses_the_socket_and_loses_nothing():
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 65536):
            writer.write(body[i:i + 65536])
            await writer.drain()

    async def main():
        async with serving(handler, UpstreamConfig(buffer_limit=64 * 1024)) as (_, url, pool):
            r = await pool.post(url, "/x", b"{}", {})
            for _ in range(200):  # let the replica send while nobody reads
                await asyncio.sleep(0.005)
                if r._conn.paused:
                    break
            assert r._conn.paused, "the socket should be paused above buffer_limit"
            got = bytearray()
            async for piece in r.iter_any():
                got += piece
            r.release()
            assert bytes(got) == body

    run(main())


def test_releasing_an_unfinished_response_closes_its_connection():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # until the client closes

    async def main():
        async with serving(handler) as (srv, url, pool):
            r = await pool.post(url, "/x", b"{}", {})
            async for _ in r.iter_any():
                break
            r.release()
            await asyncio.wait_for(srv.closed.wait(), 5)
            r2 = await pool.post(url, "/x", b"{}", {})  # a new connection, not the broken one
            r2.release()
        assert srv.connections == 2

    run(main())


def test_cancelling_a_request_closes_its_connection_and_leaves_the_pool_clean():
    async def handler(srv, reader, writer, n):
        await srv.read_request(reader)
        await reader.read()

    async def main():
        async with serving(handler) as (srv, url, pool):
            task = asyncio.create_task(pool.post(url, "/x", b"{}", {}))
            while not srv.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(srv.closed.wait(), 5)
            await asyncio.sleep(0.05)
            assert not pool._busy and not any(pool._idle.values())

    run(main())


def test_idle_connections_are_closed_after_the_idle_timeout():
    async def main():
        cfg = UpstreamConfig(idle_timeout_s=0.2, watchdog_period_s=0.05)
        async with serving(keep_alive_echo, cfg) as (srv, url, pool):
            r = await pool.post(url, "/x", b"{}", {})
            await r.read()
            r.release()
            await asyncio.wait_for(srv.closed.wait(), 5)
            r = await pool.post(url, "/x", b"{}", {})
            r.release()
        assert srv.connections == 2

    run(main())


def test_config_is_checked():
    with pytest.raises(ValueError, match="positive"):
        UpstreamConfig(read_timeout_s=0)
