"""The balancer's lean HTTP front-end (balancer/front.py) on real sockets: a real balancer in this
process in front of a real OpenAI-shaped server in a subprocess (loadgen.fake_server).

Raw sockets where a client library would hide what is checked (framing, pipelining, order,
interim responses, connection close)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import subprocess
import sys
import zlib

import httptools
import pytest

from balancer import serving
from balancer.app import BALANCER, ROUTES, create_app
from balancer.config import BalancerConfig, HealthConfig, ReplicaSpec
from balancer.front import FrontConfig, FrontServer
from balancer.guard import GuardConfig
from harness.fleet import balancer

BODY = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
STREAM_BODY = json.dumps({"prompt": "hello", "max_tokens": 3, "stream": True}).encode()


@contextlib.contextmanager
def backend(*args: str):
    p = subprocess.Popen([sys.executable, "-m", "loadgen.fake_server", "--port", "0", "--ttft-ms", "0",
                          "--itl-ms", "1", *args], stdout=subprocess.PIPE, text=True)
    try:
        m = re.search(r"listening on (http://\S+)", p.stdout.readline())
        assert m, "fake server did not start"
        yield m.group(1)
    finally:
        p.terminate()
        p.wait(10)


@pytest.fixture(scope="module")
def replica():
    with backend() as url:
        yield url


@pytest.fixture(scope="module")
def slow_replica():
    with backend("--itl-ms", "40") as url:
        yield url


def post(path: bytes, body: bytes, *extra: bytes) -> bytes:
    head = [b"POST %s HTTP/1.1" % path, b"Host: t", b"Content-Type: application/json",
            b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"


class Responses:
    """Splits a byte stream into HTTP responses (httptools' response parser)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[dict] = []
        self.cur: dict | None = None

    def on_message_begin(self):
        self.cur = {"headers": {}, "body": b""}

    def on_header(self, name, value):
        self.cur["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self):
        self.cur["status"] = self.parser.get_status_code()

    def on_body(self, body):
        self.cur["body"] += body

    def on_message_complete(self):
        self.done.append(self.cur)


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_responses(reader: asyncio.StreamReader, n: int, timeout: float = 30) -> tuple[list[dict], bool]:
    """Read until n responses came back or the server closed; (responses, whether it closed)."""
    got = Responses()
    async with asyncio.timeout(timeout):
        while len(got.done) < n:
            chunk = await reader.read(65536)
            if not chunk:
                return got.done, True
            got.parser.feed_data(chunk)
    return got.done, False


async def exchange(url: str, data: bytes, n: int, timeout: float = 30) -> tuple[list[dict], bool]:
    """Send raw bytes, read until n responses came back; (responses, whether the server then closed)."""
    reader, writer = await connect(url)
    writer.write(data)
    try:
        done, closed = await read_responses(reader, n, timeout)
        if not closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    closed = await reader.read(1) == b""
    finally:
        writer.close()
    return done, closed


def run(coro, loop: str = "uvloop"):
    """On uvloop, as `kvfleet balancer` runs, or on asyncio's loop."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def test_unary_and_stream_on_the_front_end(replica):
    async def main():
        async with balancer([replica]) as (url, b):
            (r,), closed = await exchange(url, post(b"/v1/completions", BODY, b"X-Request-Id: abc-1"), 1)
            assert r["status"] == 200 and not closed
            assert r["headers"]["x-kvfleet-replica"] == replica and r["headers"]["x-request-id"] == "abc-1"
            assert "date" in r["headers"] and "server" not in r["headers"]  # not aiohttp's answer
            assert json.loads(r["body"])["choices"][0]["finish_reason"] == "length"
            (s,), _ = await exchange(url, post(b"/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}).encode()), 1)
            assert s["status"] == 200 and s["headers"]["transfer-encoding"] == "chunked"
            events = [e for e in s["body"].split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]" and len(events) == 4
            assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])
            assert b.registry.get(replica).inflight_requests == 0
    run(main())


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_route_on_one_connection_is_answered_by_the_front_end_in_order(replica, loop):
    async def main():
        async with balancer([replica]) as (url, _):
            # Pipelined in one write: generation and other routes mixed, all answered here, in order.
            data = (post(b"/v1/completions", BODY) + GET_MODELS + post(b"/v1/completions", STREAM_BODY) + GET_MODELS
                    + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
                    + b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
                    + b"GET /admin/replicas HTTP/1.1\r\nHost: t\r\n\r\n" + post(b"/v1/completions", BODY))
            rs, closed = await exchange(url, data, 9)
            assert [r["status"] for r in rs] == [200] * 9 and not closed
            assert all("server" not in r["headers"] for r in rs)  # none is aiohttp's answer
            assert "choices" in json.loads(rs[0]["body"]) and json.loads(rs[1]["body"])["data"][0]["id"] == "tiny"
            assert rs[2]["body"].rstrip().endswith(b"data: [DONE]")
            assert json.loads(rs[3]["body"])["object"] == "list"
            assert json.loads(rs[4]["body"])["usable_replicas"] == 1
            assert b"kvfleet_requests_total" in rs[5]["body"]
            assert json.loads(rs[6]["body"])["openapi"].startswith("3.")
            assert json.loads(rs[7]["body"])["replicas"][0]["id"] == replica
            assert "choices" in json.loads(rs[8]["body"])
            # Several generation requests pipelined are answered in order (the longest first:
            # answered at once, they would come back shortest first).
            bodies = [json.dumps({"prompt": "x", "max_tokens": k}).encode() for k in (40, 30, 20, 10, 1)]
            rs, _ = await exchange(url, b"".join(post(b"/v1/completions", x) for x in bodies), 5)
            assert [json.loads(r["body"])["usage"]["completion_tokens"] for r in rs] == [40, 30, 20, 10, 1]
    run(main(), loop)


def test_unknown_routes_methods_head_and_queries(replica):
    async def main():
        async with balancer([replica]) as (url, _):
            rs, closed = await exchange(url, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
                                        b"GET /v1/completions HTTP/1.1\r\nHost: t\r\n\r\n"
                                        b"GET /admin/index?replica=nope&replica=x HTTP/1.1\r\nHost: t\r\n\r\n"
                                        b"GET /admin/%69ndex?replica=" + replica.replace(":", "%3A").encode()
                                        + b" HTTP/1.1\r\nHost: t\r\n\r\n", 4)
            assert [r["status"] for r in rs] == [404, 405, 404, 200] and not closed
            assert json.loads(rs[0]["body"])["error"]["code"] == 404 and "/openapi.json" in rs[0]["body"].decode()
            assert rs[1]["headers"]["allow"] == "POST" and json.loads(rs[1]["body"])["error"]["code"] == 405
            assert "'nope'" in json.loads(rs[2]["body"])["error"]["message"]  # the first value counts
            assert json.loads(rs[3]["body"])["replica"] == replica  # path and query percent-decoded
            # HEAD: a GET route's head, no body (read raw: a response parser expects the body).
            reader, writer = await connect(url)
            writer.write(b"HEAD /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(-1), 30)
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and body == b""
    run(main())


def test_request_split_across_reads_and_short_first_read(replica):
    async def main():
        async with balancer([replica]) as (url, _):
            reader, writer = await connect(url)
            data = post(b"/v1/completions", BODY)
            for piece in (data[:3], data[3:30], data[30:-5], data[-5:]):  # "POS", the rest in pieces
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
            done, _ = await read_responses(reader, 1)
            writer.close()
            assert done[0]["status"] == 200
    run(main())


def test_bad_requests_get_json_errors(replica):
    async def main():
        async with balancer([replica], max_body_bytes=4096) as (url, _):
            # Bad JSON and a wrong model: the Proxy's own 4xx, connection kept.
            rs, closed = await exchange(url, post(b"/v1/completions", b"{not json") + post(
                b"/v1/completions", json.dumps({"model": "other", "prompt": "x"}).encode()), 2)
            assert [r["status"] for r in rs] == [400, 404] and not closed
            assert all(json.loads(r["body"])["error"]["code"] == r["status"] for r in rs)
            # Too large by Content-Length: 413 before the body is read, then the connection closes.
            rs, closed = await exchange(url, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 1)
            assert rs[0]["status"] == 413 and json.loads(rs[0]["body"])["error"]["code"] == 413 and closed
            # Too large in chunks (no Content-Length).
            chunk = b"x" * 3000
            data = (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")
            rs, closed = await exchange(url, data, 1)
            assert rs[0]["status"] == 413 and closed
            # Not HTTP: 400 (JSON), closed.
            rs, closed = await exchange(url, b"POST /v1/completions HTTP/1.1\r\nContent-Length: zz\r\n\r\n", 1)
            assert rs[0]["status"] == 400 and json.loads(rs[0]["body"])["error"]["code"] == 400 and closed
            # A good request pipelined ahead of garbage is still answered, then the 400.
            rs, closed = await exchange(url, post(b"/v1/completions", BODY) + b"POST /v1/completions HTTP/1.1\r\n"
                                        b"Content-Length: -1\r\n\r\n", 2)
            assert [r["status"] for r in rs] == [200, 400] and closed
    run(main())


def test_expect_continue_chunked_gzip_http10_and_connection_close(replica):
    async def main():
        async with balancer([replica]) as (url, _):
            reader, writer = await connect(url)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                         % len(BODY))
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100")
            writer.write(BODY)
            done, _ = await read_responses(reader, 1)
            writer.close()
            assert done[0]["status"] == 200

            chunked = (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"%x\r\n%s\r\n" % (10, BODY[:10]) + b"%x\r\n%s\r\n" % (len(BODY) - 10, BODY[10:]) + b"0\r\n\r\n")
            zipped = gzip.compress(BODY)
            rs, _ = await exchange(url, chunked + post(b"/v1/completions", zipped, b"Content-Encoding: gzip")
                                   + post(b"/v1/completions", zlib.compress(BODY), b"Content-Encoding: deflate"), 3)
            assert [r["status"] for r in rs] == [200, 200, 200]
            rs, closed = await exchange(url, post(b"/v1/completions", BODY).replace(b"HTTP/1.1", b"HTTP/1.0"), 1)
            assert rs[0]["status"] == 200 and closed
            # An HTTP/1.0 stream: no chunked framing, ended by the close.
            reader, writer = await connect(url)
            writer.write(post(b"/v1/completions", STREAM_BODY).replace(b"HTTP/1.1", b"HTTP/1.0"))
            raw = await asyncio.wait_for(reader.read(-1), 30)
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
            assert body.rstrip().endswith(b"data: [DONE]") and body.startswith(b"data: {")
            rs, closed = await exchange(url, post(b"/v1/completions", STREAM_BODY, b"Connection: close"), 1)
            assert rs[0]["status"] == 200 and rs[0]["headers"]["connection"] == "close" and closed
    run(main())


def test_compressed_bodies_that_cannot_be_served_get_4xx_and_the_connection_goes_on(replica):
    async def main():
        async with balancer([replica], max_body_bytes=4096) as (url, _):
            bomb = gzip.compress(b"{" + b" " * 100_000 + b"}")  # small on the wire, over the limit decoded
            rs, closed = await exchange(
                url, post(b"/v1/completions", bomb, b"Content-Encoding: gzip")
                + post(b"/v1/completions", b"abcd", b"Content-Encoding: gzip")
                + post(b"/v1/completions", gzip.compress(BODY)[:-6], b"Content-Encoding: gzip")
                + post(b"/v1/completions", BODY, b"Content-Encoding: br") + post(b"/v1/completions", BODY), 5)
            assert [r["status"] for r in rs] == [413, 400, 400, 415, 200] and not closed
            assert all(json.loads(r["body"])["error"]["code"] == r["status"] for r in rs[:4])
    run(main())


def test_client_gone_mid_stream_frees_the_request(slow_replica):
    async def main():
        async with balancer([slow_replica]) as (url, b):
            reader, writer = await connect(url)
            body = json.dumps({"prompt": "x", "max_tokens": 200, "stream": True}).encode()
            writer.write(post(b"/v1/completions", body))
            await asyncio.wait_for(reader.readuntil(b"data: "), 30)
            assert b.registry.get(slow_replica).inflight_requests == 1
            writer.close()
            async with asyncio.timeout(30):
                while b.registry.get(slow_replica).inflight_requests:
                    await asyncio.sleep(0.05)
            # The balancer goes on serving.
            (r,), _ = await exchange(url, post(b"/v1/completions", BODY), 1)
            assert r["status"] == 200
    run(main())


def test_idle_connections_close_and_shutdown_waits_for_requests_in_flight(slow_replica):
    async def main():
        cfg = BalancerConfig(port=0, replicas=(ReplicaSpec.parse(slow_replica),), model="tiny",
                             health=HealthConfig(interval_s=0.2, timeout_s=0.5))
        app = create_app(cfg)
        listening = await serving.start(app, "127.0.0.1", 0)
        # A front-end with a short keep-alive, on the same app (the default is 75 s).
        front = FrontServer(FrontConfig(keepalive_timeout_s=0.4), app[ROUTES])
        server = await asyncio.get_running_loop().create_server(front, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(1), 30) == b""  # closed by the idle sweep
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"/v1/completions", json.dumps({"prompt": "x", "max_tokens": 20}).encode()))
            async with asyncio.timeout(30):
                while not app[BALANCER].registry.get(slow_replica).inflight_requests:
                    await asyncio.sleep(0.01)
            server.close()
            await front.close()  # waits for the request in flight
            done, _ = await read_responses(reader, 1)
            assert done and done[0]["status"] == 200
            assert json.loads(done[0]["body"])["usage"]["completion_tokens"] == 20
            writer.close()
        finally:
            server.close()
            await front.close()
            await listening.close()
    run(main())


def test_no_fast_path_leaves_every_route_to_aiohttp_and_the_guard_does_not(replica):
    """--no-fast-path: aiohttp answers every route of the same table. With the guard on, the lean
    front-end still serves every route (the guard is part of the handlers), and its checks hold."""
    async def main():
        async with balancer([replica], fast_path=False) as (url, b):
            rs, _ = await exchange(url, post(b"/v1/completions", BODY) + GET_MODELS
                                   + b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 3)
            assert [r["status"] for r in rs] == [200, 200, 404]
            assert all(r["headers"]["server"].startswith("Python") for r in rs)  # aiohttp answered
            assert json.loads(rs[2]["body"])["error"]["code"] == 404
        guard = GuardConfig(api_keys=("k1",), rate_limit_rps=1000.0, max_tokens_cap=8)
        async with balancer([replica], guard=guard) as (url, b):
            auth = b"Authorization: Bearer k1"
            body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 50}).encode()
            (ok, no_key, too_many), _ = await exchange(
                url, post(b"/v1/completions", BODY, auth) + post(b"/v1/completions", BODY)
                + post(b"/v1/completions", body, auth), 3)
            assert ok["status"] == 200 and "server" not in ok["headers"]  # the front-end answered
            assert no_key["status"] == 401 and no_key["headers"]["www-authenticate"] == "Bearer"
            assert too_many["status"] == 400 and json.loads(too_many["body"])["error"]["param"] == "max_tokens"
            assert "server" not in no_key["headers"]
            rs, _ = await exchange(url, GET_MODELS + GET_MODELS.replace(b"\r\n\r\n", b"\r\n%s\r\n\r\n" % auth), 2)
            assert [r["status"] for r in rs] == [401, 200] and all("server" not in r["headers"] for r in rs)
            # A compressed body is decoded only past the key check: no key, 401 (not 415 or 413).
            (r,), _ = await exchange(url, post(b"/v1/completions", BODY, b"Content-Encoding: br"), 1)
            assert r["status"] == 401
    run(main())


def test_request_id_and_authorization_reach_the_replica():
    """The client's X-Request-Id and Authorization headers (any case) go on to the replica."""
    from aiohttp import web

    seen: list[dict] = []

    async def completions(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "x"}]})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with balancer([f"http://{host}:{port}"]) as (url, _):
                (r,), _ = await exchange(url, post(b"/v1/completions", BODY, b"authorization: Bearer sk-1",
                                                   b"x-request-ID: rid-7"), 1)
                assert r["status"] == 200 and r["headers"]["x-request-id"] == "rid-7"
                (r,), _ = await exchange(url, post(b"/v1/completions", BODY), 1)
                assert r["status"] == 200
        finally:
            await runner.cleanup()
        assert seen[0]["authorization"] == "Bearer sk-1" and seen[0]["x-request-id"] == "rid-7"
        assert "authorization" not in seen[1] and seen[1]["x-request-id"].startswith("kvf-")
    run(main())
