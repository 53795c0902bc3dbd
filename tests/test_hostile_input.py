"""Malformed and abusive requests against a replica and a balancer (real subprocesses).

Every request must get a 4xx (or a 2xx where the input is odd but valid) or a clean close -
never a 5xx, never a hang past its bound, never a crash: afterwards both processes are alive
and answer /health with 200. Requests go over raw sockets so that broken HTTP reaches the
server as sent. Every exchange is bounded (socket timeouts, trickles of fixed length).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from harness import procs

pytestmark = pytest.mark.slow

SIM_REPLICA = ["replica", "--port", "0", "--engine", "sim", "--preset", "llama3-8b-h100", "--time-scale", "20",
               "--model", "tiny", "--num-blocks", "1024", "--max-model-len", "2048",
               "--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
CLOSED = 0  # the status recorded when the server closed the connection without a response


@pytest.fixture(scope="module")
def targets():
    rep = procs.start(SIM_REPLICA)
    try:
        bal = procs.start(["balancer", "--port", "0", "--model", "tiny", "--replica", rep.replica_arg,
                           "--body-timeout", "2"])
    except Exception:
        rep.stop()
        raise
    yield {"replica": rep, "balancer": bal}
    bal.stop()
    rep.stop()


def _addr(proc: procs.Proc) -> tuple[str, int]:
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def exchange(proc: procs.Proc, data: bytes, timeout: float = 20.0, trickle_s: float = 0.0) -> tuple[int, bytes]:
    """Send raw bytes (optionally one byte per `trickle_s`), return (status, body); CLOSED when the
    server closed without answering. Raises TimeoutError if it neither answers nor closes."""
    s = socket.create_connection(_addr(proc), timeout=timeout)
    try:
        try:
            if trickle_s:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(trickle_s)
            else:
                s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on us mid-send: read what it said
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise TimeoutError(f"no answer and no close within {timeout} s") from None
            if not chunk:
                break
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
    finally:
        s.close()
    if not out.startswith(b"HTTP/1."):
        return CLOSED, out
    return int(out.split(b" ", 2)[1]), out.partition(b"\r\n\r\n")[2]


def post(proc: procs.Proc, path: str, body: bytes | str, ctype: str = "application/json", extra: str = "",
         **kw) -> tuple[int, bytes]:
    body = body.encode() if isinstance(body, str) else body
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{extra}Content-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return exchange(proc, head + body, **kw)


def ok(status: int) -> bool:
    return status == CLOSED or 200 <= status < 500


def health(proc: procs.Proc) -> int:
    with urllib.request.urlopen(proc.url + "/health", timeout=10) as r:
        return r.status


# The bodies: (name, body, statuses that are right). A bare "4xx" means any 4xx.
P = '"prompt":"hi","max_tokens":2'
BODIES: list[tuple[str, bytes | str]] = [
    ("truncated json", '{"prompt":'),
    ("invalid utf-8", b'{"prompt":"\xff\xfe"}'),
    ("empty body", ""),
    ("top-level array", "[1,2,3]"),
    ("top-level string", '"prompt"'),
    ("null", "null"),
    ("prompt int", '{"prompt":5}'),
    ("prompt object", '{"prompt":{"a":1}}'),
    ("prompt empty", '{"prompt":""}'),
    ("prompt empty list", '{"prompt":[]}'),
    ("prompt batch with an empty one", '{"prompt":[[1,2],[]]}'),
    ("prompt batch with an int", '{"prompt":["a",5]}'),
    ("prompt one empty batch", '{"prompt":[[]]}'),
    ("token id negative", '{"prompt":[-1],"max_tokens":2}'),
    ("token id 2**32", '{"prompt":[4294967296],"max_tokens":2}'),
    ("token id beyond vocab", '{"prompt":[4294967295],"max_tokens":2}'),
    ("token ids bools", '{"prompt":[true,false]}'),
    ("max_tokens negative", '{"prompt":"hi","max_tokens":-5}'),
    ("max_tokens zero", '{"prompt":"hi","max_tokens":0}'),
    ("max_tokens string", '{"prompt":"hi","max_tokens":"10"}'),
    ("max_tokens 10**30", '{"prompt":"hi","max_tokens":1000000000000000000000000000000}'),
    ("max_tokens 5000 digits", '{"prompt":"hi","max_tokens":' + "9" * 5000 + "}"),
    ("max_tokens NaN", '{"prompt":"hi","max_tokens":NaN}'),
    ("max_tokens Infinity", '{"prompt":"hi","max_tokens":Infinity}'),
    ("max_tokens -Infinity", '{"prompt":"hi","max_tokens":-Infinity}'),
    ("max_tokens 1e400", '{"prompt":"hi","max_tokens":1e400}'),
    ("max_tokens 2.5", '{"prompt":"hi","max_tokens":2.5}'),
    ("temperature NaN", "{" + P + ',"temperature":NaN}'),
    ("temperature negative", "{" + P + ',"temperature":-1}'),
    ("temperature string", "{" + P + ',"temperature":"hot"}'),
    ("top_p zero", "{" + P + ',"top_p":0}'),
    ("top_k -5", "{" + P + ',"top_k":-5}'),
    ("seed 2**64", "{" + P + ',"seed":18446744073709551616}'),
    ("stop 17 strings", "{" + P + ',"stop":' + json.dumps(["x"] * 17) + "}"),
    ("stop empty string", "{" + P + ',"stop":[""]}'),
    ("stop ints", "{" + P + ',"stop":[1,2]}'),
    ("n 0", "{" + P + ',"n":0}'),
    ("n 10**6", "{" + P + ',"n":1000000}'),
    ("logprobs 21", "{" + P + ',"logprobs":21}'),
    ("top_logprobs without logprobs", "{" + P + ',"top_logprobs":2}'),
    ("best_of above n", "{" + P + ',"best_of":4}'),
    ("response_format json", "{" + P + ',"response_format":{"type":"json_object"}}'),
    ("stream string", "{" + P + ',"stream":"yes"}'),
    ("stream_options list", "{" + P + ',"stream":true,"stream_options":[]}'),
    ("min_tokens above max", "{" + P + ',"min_tokens":10}'),
    ("stop_token_ids negative", "{" + P + ',"stop_token_ids":[-1]}'),
    ("model int", "{" + P + ',"model":5}'),
    ("model unknown", "{" + P + ',"model":"gpt-9"}'),
    ("cache_salt int", "{" + P + ',"cache_salt":5}'),
    ("lone surrogate in prompt", '{"prompt":"\\ud800abc","max_tokens":2}'),
    ("lone surrogate in a key", '{"prompt":"hi","max_tokens":2,"\\udc00":1}'),
    ("lone surrogate in salt", "{" + P + ',"cache_salt":"\\udfff"}'),
    ("nested 100k arrays", "[" * 100_000 + "]" * 100_000),
    ("nested 100k in a field", '{"prompt":"hi","x":' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("nested 900 in a field", '{"prompt":"hi","max_tokens":1,"x":' + "[" * 900 + "]" * 900 + "}"),
    ("messages not a list", '{"messages":"hi"}'),
    ("messages empty", '{"messages":[]}'),
    ("message role bad", '{"messages":[{"role":"god","content":"hi"}]}'),
    ("message content int", '{"messages":[{"role":"user","content":5}]}'),
    ("message content parts bad", '{"messages":[{"role":"user","content":[{"type":"image"}]}]}'),
    ("lone surrogate in a message", '{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2}'),
    ("enormous token prompt", '{"max_tokens":2,"prompt":' + json.dumps([7] * 1_000_000) + "}"),
    ("enormous text prompt (8 MB)", '{"max_tokens":2,"prompt":"' + "a" * 8_000_000 + '"}'),
    ("body over the size limit (17 MB)", '{"prompt":"' + "a" * 17_000_000 + '"}'),
]


@pytest.mark.parametrize("target", ["replica", "balancer"])
def test_malformed_bodies_get_4xx(targets, target):
    proc = targets[target]
    bad = []
    n = 0
    for path in ("/v1/completions", "/v1/chat/completions"):
        for name, body in BODIES:
            status, text = post(proc, path, body)
            n += 1
            if not ok(status):
                bad.append((path, name, status, text[:200]))
    for ctype, body in (("text/plain", '{"prompt":"hi","max_tokens":1}'),
                        ("application/x-www-form-urlencoded", "prompt=hi&max_tokens=1"),
                        ("multipart/form-data; boundary=x", "--x\r\n\r\nhi\r\n--x--")):
        status, text = post(proc, "/v1/completions", body, ctype=ctype)
        n += 1
        if not ok(status):
            bad.append(("/v1/completions", ctype, status, text[:200]))
    assert n >= 100 and not bad, bad
    assert proc.popen.poll() is None and health(proc) == 200


RAW: list[tuple[str, bytes]] = [
    ("unknown route", b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("unknown method", b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    ("DELETE /health", b"DELETE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("GET a POST route", b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("made-up method", b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("huge header value", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"),
    ("header flood", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
     + b"\r\n"),
    ("huge request line", b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("garbage", b"\x00\x01\x02 not http at all \xff\r\n\r\n"),
    ("HTTP/0.9", b"GET /\r\n\r\n"),
    ("bad version", b"GET /health HTTP/7.3\r\nHost: x\r\n\r\n"),
    ("null byte in path", b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("negative content-length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("two content-lengths", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9"
     b"\r\n\r\n{}"),
    ("content-length and chunked", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n"
     b"0\r\n\r\n"),
    ("short body then close", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pr"),
    ("content-length 10**20", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000000000000"
     b"\r\n\r\n{}"),
    ("bad header line", b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"),
    ("gzip that is not", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4"
     b"\r\nConnection: close\r\n\r\nabcd"),
]


@pytest.mark.parametrize("target", ["replica", "balancer"])
def test_broken_http_gets_4xx_or_a_close(targets, target):
    proc = targets[target]
    bad = []
    for name, data in RAW:
        if name == "short body then close":
            s = socket.create_connection(_addr(proc), timeout=5)
            s.sendall(data)
            s.close()  # the server must notice and drop the request
            continue
        status, text = exchange(proc, data, timeout=10)
        if not ok(status):
            bad.append((name, status, text[:200]))
    assert not bad, bad
    assert proc.popen.poll() is None and health(proc) == 200


def test_admin_routes_refuse_wrong_types(targets):
    bal = targets["balancer"]
    bad = []
    for body in ('{"url":"http://a:1","events":5}', '{"url":"http://a:1","topic":5}', '{"url":"http://a:99999"}',
                 '{"url":"http://a:1","events":"tcp://a:1","replay":5}', '{"url":5}', '{"url":"ftp://x"}',
                 '{"url":"http://a:1","curve_server_key":"/etc/passwd"}', "[]", '{"url":"http://[::1"}'):
        status, text = post(bal, "/admin/replicas", body)
        if not 400 <= status < 500:
            bad.append(("add", body, status, text[:200]))
    for path, body in (("/admin/replicas/drain", '{"replica":["x"]}'), ("/admin/replicas/undrain", "5"),
                       ("/admin/explain", '{"prompt":"\\ud800"}'), ("/admin/explain", '{"messages":5}')):
        status, text = post(bal, path, body)
        if not 400 <= status < 500:
            bad.append((path, body, status, text[:200]))
    for query in ("replica=nope&timeout=nan", "timeout=1", "replica=" + "x" * 5000):
        status, text = exchange(bal, f"DELETE /admin/replicas?{query} HTTP/1.1\r\nHost: x\r\n"
                                     f"Connection: close\r\n\r\n".encode())
        if not 400 <= status < 500:
            bad.append(("remove", query, status, text[:200]))
    status, _ = exchange(bal, b"GET /admin/index?replica=nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404
    assert not bad, bad
    rep = targets["replica"]
    for path, body in (("/tokenize", '{"prompt":"\\ud800"}'), ("/tokenize", '{"prompt":5}'),
                       ("/detokenize", '{"tokens":[1e400]}'), ("/detokenize", '{"tokens":[-1]}'),
                       ("/detokenize", '{"tokens":' + json.dumps(list(range(10**5, 10**5 + 10))) + "}")):
        status, text = post(rep, path, body)
        assert 400 <= status < 500, (path, body, status, text[:200])


@pytest.mark.parametrize("target", ["replica", "balancer"])
def test_slow_clients_do_not_block_others(targets, target):
    """Slowloris: three clients trickle a request's headers (and one its body) a byte at a time
    for ~2.5 s; meanwhile /health answers at once. The balancer (--body-timeout 2) answers the
    slow body with 408; the replica has no body timeout and just waits (bounded here)."""
    proc = targets[target]
    results: dict[str, object] = {}

    def slow_headers(i: int) -> None:
        data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 25 + b"\r\nConnection: close\r\n\r\n"
        try:
            results[f"h{i}"] = exchange(proc, data, timeout=15, trickle_s=0.03)[0]
        except OSError as e:
            results[f"h{i}"] = e

    def slow_body() -> None:
        body = b'{"prompt":"hi","max_tokens":1}'
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        s = socket.create_connection(_addr(proc), timeout=15)
        try:
            s.sendall(head)
            t0 = time.monotonic()
            sent = 0
            while sent < len(body) and time.monotonic() - t0 < 2.5:
                try:
                    s.sendall(body[sent:sent + 1])
                except OSError:
                    break
                sent += 1
                time.sleep(0.25)
            s.settimeout(3 if target == "balancer" else 0.5)  # the replica has no body timeout
            try:
                results["body"] = s.recv(4096).split(b" ", 2)[1:2]
            except OSError as e:
                results["body"] = e
        finally:
            s.close()

    threads = [threading.Thread(target=slow_headers, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=slow_body))
    for t in threads:
        t.start()
    t0 = time.monotonic()
    latencies = []
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 30:
        s = time.monotonic()
        assert health(proc) == 200
        latencies.append(time.monotonic() - s)
        time.sleep(0.2)
    for t in threads:
        t.join(30)
    assert all(results.get(f"h{i}") == 200 for i in range(3)), results
    if target == "balancer":
        assert results["body"] == [b"408"], results
    assert len(latencies) >= 5 and max(latencies) < 2.0, latencies


@pytest.mark.parametrize("target", ["replica", "balancer"])
def test_connection_flood_leaves_no_descriptors_behind(targets, target):
    proc = targets[target]
    pid = proc.popen.pid

    def fds() -> int:
        import os

        return len(os.listdir(f"/proc/{pid}/fd"))

    before = fds()
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(_addr(proc), timeout=5))
        assert health(proc) == 200
        for s in socks[:100]:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half a request, then gone
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while fds() > before + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= before + 5, (before, fds())
    assert proc.popen.poll() is None and health(proc) == 200


def test_client_that_leaves_mid_stream_does_not_count_against_the_replica(targets):
    """A client that drops its stream is not a replica failure: no failover, no retry, the
    breaker stays closed, and the replica's request is aborted (its engine goes idle)."""
    bal, rep = targets["balancer"], targets["replica"]
    body = json.dumps({"model": "tiny", "prompt": "go on", "max_tokens": 1500, "ignore_eos": True,
                       "stream": True}).encode()
    for _ in range(3):
        s = socket.create_connection(_addr(bal), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert b" 200 " in s.recv(4096).split(b"\r\n", 1)[0]
        s.recv(4096)
        s.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with urllib.request.urlopen(rep.url + "/load", timeout=5) as r:
            load = json.loads(r.read())
        if load["num_running"] == 0 and load["num_waiting"] == 0:
            break
        time.sleep(0.1)
    assert load["num_running"] == 0 and load["num_waiting"] == 0, load
    with urllib.request.urlopen(bal.url + "/admin/replicas", timeout=5) as r:
        replica = json.loads(r.read())["replicas"][0]
    assert replica["breaker"] == "closed" and replica["inflight_requests"] == 0, replica
    with urllib.request.urlopen(bal.url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    for name in ("kvfleet_failovers_total", "kvfleet_retries_total"):
        assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in metrics.splitlines()
                   if line.startswith(name + "{")), name
