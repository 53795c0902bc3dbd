"""A client that closes its connection in the middle of a streamed answer is a client abort, not
an error: real replica and balancer subprocesses on loopback, a raw-socket client that reads the
first SSE chunk and hangs up. The replica aborts the request in the engine (its batch slot and KV
blocks come back, its gauges say so at once), logs one INFO line and no traceback; the balancer
closes its upstream connection (so the replica aborts) and logs the request as 499."""

from __future__ import annotations

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
ABORTED = "the client closed the stream"


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


def test_the_balancer_passes_a_client_drop_on_to_the_replica(tmp_path):
    rlog, blog = tmp_path / "replica.log", tmp_path / "balancer.log"
    replica = procs.start(REPLICA, stderr=rlog)
    balancer = None
    try:
        balancer = procs.start(["balancer", "--host", "127.0.0.1", "--port", "0", "--model", "tiny",
                                "--replica", replica.url], stderr=blog)
        for path in BODIES:
            drop_after_first_chunk(balancer.url, path)
            wait_idle(replica.url)  # the balancer closed its upstream connection: the replica aborted
        assert complete(balancer.url)["choices"][0]["finish_reason"] == "length"
    finally:
        if balancer is not None:
            assert balancer.stop() == 0
        assert replica.stop() == 0
    clean(blog.read_text())
    clean(rlog.read_text())
    access = [line for line in blog.read_text().splitlines() if "kvfleet.balancer.access" in line]
    assert sum("status=499" in line for line in access) == len(BODIES), access
    assert sum(ABORTED in line for line in rlog.read_text().splitlines()) == len(BODIES)
