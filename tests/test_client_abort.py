"""A client that closes its connection in the middle of a streamed answer is a client abort, not
an error: real replica and balancer subprocesses on loopback, a raw-socket client that reads the
first SSE chunk and hangs up. The replica aborts the request in the engine (its batch slot and KV
blocks come back, its gauges say so at once), logs one INFO line and no traceback; the balancer
closes its upstream connection (so the replica aborts) and logs the request as 499."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request

import pytest

from kvfleet import procs

pytestmark = pytest.mark.slow

# The sim engine: the real scheduler, block pool and server, modelled step times (a few ms per
# decode step), so a 3000-token answer is still running long after its first chunk.
REPLICA = ["replica", "--host", "127.0.0.1", "--port", "0", "--engine", "sim"]
BODIES = {
    "/v1/completions": {"model": "tiny", "prompt": "a prompt to drop " * 20, "max_tokens": 3000,
                        "ignore_eos": True, "stream": True},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "drop me " * 20}],
                             "max_tokens": 3000, "ignore_eos": True, "stream": True},
}
ABORTED = "the client closed the connection"


def drop_after_first_chunk(url: str, path: str) -> None:
    """POST a streaming request, read until the first SSE event has arrived, close the socket."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(BODIES[path]).encode()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: {" not in got or b"}\n\n" not in got.partition(b"data: {")[2]:  # the first event, whole
            data = s.recv(65536)
            assert data, f"the server closed the stream first: {got[-300:]!r}"
            got += data
        assert got.startswith(b"HTTP/1.1 200"), got[:300]


def running(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def load(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/load", timeout=10) as r:
        return json.loads(r.read())


def wait_idle(url: str, timeout: float = 30.0) -> None:
    """Until the replica runs nothing and holds no KV block for a request, by both its /load and
    its Prometheus gauges (which an abort between engine steps left stale before)."""
    deadline = time.monotonic() + timeout
    while True:
        lo = load(url)
        idle = lo["num_running"] == lo["num_waiting"] == 0 and lo["free_blocks"] == lo["total_blocks"]
        if idle and running(url) == 0:
            return
        assert time.monotonic() < deadline, f"still busy after the client left: /load {lo}, gauge {running(url)}"
        time.sleep(0.1)


def complete(url: str) -> dict:
    body = json.dumps({"model": "tiny", "prompt": "still serving?", "max_tokens": 4, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def clean(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_a_replica_aborts_a_stream_whose_client_left(tmp_path):
    err = tmp_path / "replica.log"
    replica = procs.start(REPLICA, stderr=err)
    try:
        for path in BODIES:
            drop_after_first_chunk(replica.url, path)
            wait_idle(replica.url)
        assert complete(replica.url)["choices"][0]["finish_reason"] == "length"
    finally:
        assert replica.stop() == 0
    log = err.read_text()
    clean(log)
    lines = [line for line in log.splitlines() if ABORTED in line]
    assert len(lines) == len(BODIES) and all(" INFO kvfleet.replica: " in line for line in lines), lines


@contextlib.contextmanager
def behind_a_balancer(tmp_path, replica_args: list[str], balancer_args: tuple[str, ...] = ()):
    """A replica and a balancer in front of it, each logging to a file; yields (replica,
    balancer, replica log, balancer log). Both stop cleanly, and neither logged an error."""
    rlog, blog = tmp_path / "replica.log", tmp_path / "balancer.log"
    replica = procs.start(replica_args, stderr=rlog)
    balancer = None
    try:
        balancer = procs.start(["balancer", "--host", "127.0.0.1", "--port", "0", "--model", "tiny",
                                "--replica", replica.url, *balancer_args], stderr=blog)
        yield replica, balancer, rlog, blog
    finally:
        if balancer is not None:
            assert balancer.stop() == 0
        assert replica.stop() == 0
    clean(blog.read_text())
    clean(rlog.read_text())


def access_lines(log, logger: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if logger in line]


def test_the_balancer_passes_a_client_drop_on_to_the_replica(tmp_path):
    with behind_a_balancer(tmp_path, REPLICA) as (replica, balancer, rlog, blog):
        for path in BODIES:
            drop_after_first_chunk(balancer.url, path)
            wait_idle(replica.url)  # the balancer closed its upstream connection: the replica aborted
        assert complete(balancer.url)["choices"][0]["finish_reason"] == "length"
    access = access_lines(blog, "kvfleet.balancer.access")
    assert sum("status=499" in line for line in access) == len(BODIES), access
    assert sum(ABORTED in line for line in rlog.read_text().splitlines()) == len(BODIES)


# ------------------------------------------------------------------ gone before the first token
# A slow prefill (a 3601-token prompt in 256-token chunks, at a tenth of the modelled GPU's
# speed): the client leaves while it runs. The request must be aborted then, during the prefill
# (the access line's output_tokens=0), not once its first token fails to go out; a non-streamed
# one must not run its 3000 tokens for nobody.
SLOW = [*REPLICA, "--time-scale", "0.1", "--max-num-batched-tokens", "256"]
LONG = {"model": "tiny", "prompt": "hello world " * 300, "max_tokens": 3000, "ignore_eos": True}


def leave_while_prefilling(url: str, replica_url: str, stream: bool) -> None:
    """Send LONG, wait until the replica has it in its batch, close the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({**LONG, "stream": stream}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while load(replica_url)["num_running"] == 0:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_replica_aborts_a_request_whose_client_left_before_its_first_token(tmp_path, stream):
    err = tmp_path / "replica.log"
    replica = procs.start(SLOW, stderr=err)
    try:
        leave_while_prefilling(replica.url, replica.url, stream)
        wait_idle(replica.url)
    finally:
        assert replica.stop() == 0
    log = err.read_text()
    clean(log)
    (access,) = access_lines(err, "kvfleet.replica.access")
    assert "finish=abort" in access and "output_tokens=0 " in access, access
    assert sum(ABORTED in line and " INFO " in line for line in log.splitlines()) == 1


@pytest.mark.parametrize("front", ["fast-path", "aiohttp"])
def test_the_balancer_aborts_upstream_when_its_client_leaves_before_the_first_byte(tmp_path, front):
    with behind_a_balancer(tmp_path, SLOW, ("--no-fast-path",) if front == "aiohttp" else ()) as (
            replica, balancer, rlog, blog):
        for stream in (True, False):
            leave_while_prefilling(balancer.url, replica.url, stream)
            wait_idle(replica.url)  # the balancer closed its upstream connection: the replica aborted
    access = access_lines(blog, "kvfleet.balancer.access")
    assert len(access) == 2 and all("status=499" in line for line in access), access
    lines = access_lines(rlog, "kvfleet.replica.access")
    assert len(lines) == 2 and all("finish=abort" in x and "output_tokens=0 " in x for x in lines), lines
