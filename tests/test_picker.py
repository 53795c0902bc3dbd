"""`kvfleet picker`'s ext_proc phases, driven over a real gRPC channel on loopback.

The test plays Envoy: it opens `ExternalProcessor.Process` streams as Envoy does in the
endpoint-picker protocol's streaming mode (headers, then the body in chunks, then the response
phases), sends the request to the replica the picker named (real `--engine sim` replica
subprocesses, KV events on), and feeds the replica's real response back through the stream.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balancer.picker.config import PickerConfig
from balancer.picker.envoy import bootstrap
from harness import procs
from harness.envoy import picker
from harness.fleet import balancer, http, wait_for

SIM = ["replica", "--port", "0", "--engine", "sim", "--preset", "llama3-8b-h100", "--model", "tiny",
       "--num-blocks", "1024", "--max-model-len", "2048", "--kv-events-endpoint", "tcp://127.0.0.1:0",
       "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
DEST = "x-gateway-destination-endpoint"
SHARED = "System: you are a careful assistant who answers briefly and cites sources. " * 10  # ~740 tokens


@pytest.fixture(scope="module")
def fleet():
    reps = procs.start_all([SIM] * 2)
    yield reps
    for r in reps:
        r.stop()


def addr(proc) -> str:
    return proc.url.split("//", 1)[1]


def headers_msg(path: str, method: str = "POST", eos: bool = False, request_id: str | None = None,
                subset: list[str] | None = None, **extra: str) -> pb.ProcessingRequest:
    hs = {":path": path, ":method": method, ":authority": "gateway", ":scheme": "http",
          "content-type": "application/json", **({"x-request-id": request_id} if request_id else {}),
          **{k.replace("_", "-"): v for k, v in extra.items()}}
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]), end_of_stream=eos))
    if subset is not None:  # the data plane's subset hint (endpoint-picker protocol, "Endpoint Subset")
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return msg


def body_msg(data: bytes, eos: bool, response: bool = False) -> pb.ProcessingRequest:
    body = pb.HttpBody(body=data, end_of_stream=eos)
    return pb.ProcessingRequest(response_body=body) if response else pb.ProcessingRequest(request_body=body)


def response_headers_msg(status: int, content_type: str, **extra: str) -> pb.ProcessingRequest:
    hs = {":status": str(status), "content-type": content_type, **{k.replace("_", "-"): v for k, v in extra.items()}}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()])))


def set_headers(common: pb.CommonResponse) -> dict[str, tuple[str, int]]:
    return {h.header.key: (h.header.raw_value.decode(), h.append_action) for h in common.header_mutation.set_headers}


async def read_body_answers(call, which: str) -> bytes:
    """Streamed body answers until end_of_stream: their bytes."""
    out = b""
    while True:
        answer = await call.read()
        assert answer.WhichOneof("response") == which, answer
        streamed = getattr(answer, which).response.body_mutation.streamed_response
        out += streamed.body
        if streamed.end_of_stream:
            return out


async def pick(stub, body: dict, path: str = "/v1/completions", request_id: str | None = None, split: int = 2,
               subset: list[str] | None = None):
    """Open a stream, send headers and the body in `split` chunks; the open call, the answer to the
    headers, and the body as the picker sent it back (None for a refusal)."""
    call = stub.Process()
    raw = json.dumps(body).encode()
    await call.write(headers_msg(path, request_id=request_id, subset=subset))
    step = max(1, len(raw) // split)
    pieces = [raw[i:i + step] for i in range(0, len(raw), step)]
    for i, piece in enumerate(pieces):
        await call.write(body_msg(piece, eos=i == len(pieces) - 1))
    first = await call.read()
    if first.WhichOneof("response") == "immediate_response":
        return call, first, None
    return call, first, await read_body_answers(call, "request_body")


def send(endpoint: str, path: str, raw: bytes) -> tuple[int, str, bytes]:
    """What Envoy does next: the request, as the picker passed it back, to the picked endpoint."""
    req = urllib.request.Request(f"http://{endpoint}{path}", data=raw, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


async def through(stub, body: dict, path: str = "/v1/completions", chunks: int = 3, **kw) -> tuple[str, bytes]:
    """One request end to end with the test as Envoy: (picked endpoint, the response's bytes)."""
    call, first, raw = await pick(stub, body, path, **kw)
    endpoint = set_headers(first.request_headers.response)[DEST][0]
    status, ctype, data = await asyncio.to_thread(send, endpoint, path, raw)
    await call.write(response_headers_msg(status, ctype))
    assert (await call.read()).WhichOneof("response") == "response_headers"
    step = max(1, len(data) // chunks)
    pieces = [data[i:i + step] for i in range(0, len(data), step)]
    for i, piece in enumerate(pieces):  # Envoy in full duplex sends chunks without waiting for answers
        await call.write(body_msg(piece, eos=i == len(pieces) - 1, response=True))
    assert await read_body_answers(call, "response_body") == data
    await call.done_writing()
    return endpoint, data


async def ahttp(*args, **kw) -> tuple[int, dict, bytes]:
    """`http` off the event loop (the picker and balancer under test serve on this loop)."""
    return await asyncio.to_thread(http, *args, **kw)


def channel(p) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(p.grpc_target)


# ---------------------------------------------------------------------------------- tests

def test_phases_answered_in_order_and_booking_held_until_the_response_ends(fleet):
    body = {"model": "tiny", "prompt": SHARED + "Q0", "max_tokens": 4, "temperature": 0}

    async def main():
        async with picker([r.replica_arg for r in fleet], policy="precise_prefix") as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            b = p.balancer
            call, first, raw = await pick(stub, body, request_id="req-phases-1", split=3)
            # The headers' answer carries the pick (made from the body, so it waits for it):
            # the header (overwriting a client's own), the route cache cleared, the same in metadata.
            assert first.WhichOneof("response") == "request_headers"
            common = first.request_headers.response
            endpoint, action = set_headers(common)[DEST]
            assert endpoint in {addr(r) for r in fleet}
            assert action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
            assert common.clear_route_cache
            assert first.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value == endpoint
            assert raw == json.dumps(body).encode()  # the body goes on as it came
            replica = next(r for r in b.registry if r.url.endswith(endpoint))
            assert replica.inflight_requests == 1  # booked while the request is in flight

            status, ctype, data = await asyncio.to_thread(send, endpoint, "/v1/completions", raw)
            await call.write(response_headers_msg(status, ctype))
            answer = await call.read()
            assert set_headers(answer.response_headers.response)["x-kvfleet-replica"][0] == replica.replica_id
            # A JSON answer goes back one chunk behind: each chunk with the next, the last one at
            # the end of the stream (Envoy's own end-of-stream chunk is often empty).
            await call.write(body_msg(data[:10], eos=False, response=True))
            await call.write(body_msg(data[10:20], eos=False, response=True))
            part = (await call.read()).response_body.response.body_mutation.streamed_response
            assert (part.body, part.end_of_stream) == (data[:10], False)
            assert replica.inflight_requests == 1
            await call.write(body_msg(data[20:], eos=False, response=True))
            await call.write(body_msg(b"", eos=True, response=True))
            relayed = []
            for _ in range(2):
                part = (await call.read()).response_body.response.body_mutation.streamed_response
                relayed.append((part.body, part.end_of_stream))
            assert relayed == [(data[10:20], False), (data[20:], True)]
            await call.done_writing()
            await wait_for(lambda: replica.inflight_requests == 0)
            decision = b.audit.latest(1)[0]
            assert decision["request_id"] == "req-phases-1" and decision["replica"] == replica.replica_id
            usage = json.loads(data)["usage"]
            assert decision["delivered_cached_tokens"] == (usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0)
    asyncio.run(main())


def test_prefix_affinity_and_the_same_pick_as_the_balancer(fleet):
    """A shared prefix goes where its blocks are (KV events feed the picker's index), and the
    picker picks what `kvfleet balancer` over the same fleet would (its /admin/explain)."""
    async def main():
        async with picker([r.replica_arg for r in fleet], policy="precise_prefix") as p, channel(p) as ch, \
                balancer([r.replica_arg for r in fleet], policy="precise_prefix") as (burl, _):
            stub = pb_grpc.ExternalProcessorStub(ch)
            shared = "Affinity: " + SHARED
            holder, _ = await through(stub, {"model": "tiny", "prompt": shared + "Q0", "max_tokens": 2})
            holder_id = next(r.replica_id for r in p.balancer.registry if r.url.endswith(holder))
            blocks = len(shared.encode()) // 16 - 1
            await wait_for(lambda: p.balancer.index.num_blocks(holder_id) >= blocks)
            for i in range(1, 5):
                probe = {"model": "tiny", "prompt": shared + f"Q{i}", "max_tokens": 2, "temperature": 0}
                for _ in range(200):  # the balancer's index catches up with the same events
                    explained = json.loads((await ahttp("POST", burl + "/admin/explain", probe))[2])
                    if explained["decision"] == holder_id:
                        break
                    await asyncio.sleep(0.05)
                assert explained["decision"] == holder_id
                endpoint, data = await through(stub, probe)
                assert endpoint == holder
                assert json.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.9 * len(shared)
    asyncio.run(main())


def test_streams_pass_through_and_output_lengths_are_learned(fleet):
    """SSE responses go back chunk by chunk as they came; the picker learns each request's output
    length (from a stream without a usage chunk: its events, split anywhere by Envoy) and
    predicts the next one by it."""
    prompt = "Summarise the incident report in one word. " * 8

    async def main():
        async with picker([r.replica_arg for r in fleet], policy="predictive") as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            probe = {"model": "tiny", "prompt": prompt, "max_tokens": 200}
            before = json.loads((await ahttp("POST", p.http_url + "/admin/explain", probe))[2])["predicted_output_tokens"]
            for _ in range(8):  # no usage chunk asked for: the picker counts the stream's events
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                _, data = await through(stub, body, chunks=7)
                assert data.rstrip().endswith(b"data: [DONE]")
            await asyncio.sleep(0.1)
            after = json.loads((await ahttp("POST", p.http_url + "/admin/explain", probe))[2])["predicted_output_tokens"]
            assert before > 6 and after <= 6, (before, after)
    asyncio.run(main())


def test_refusals_are_immediate_openai_errors(fleet):
    async def main():
        async with picker([r.replica_arg for r in fleet], max_body_bytes=4096) as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)

            async def refused(path: str, raw: bytes) -> tuple[int, dict]:
                call = stub.Process()
                await call.write(headers_msg(path))
                await call.write(body_msg(raw, eos=True))
                answer = (await call.read()).immediate_response
                assert {h.header.key: h.header.raw_value for h in answer.headers.set_headers}["content-type"] \
                    == b"application/json"
                return answer.status.code, json.loads(answer.body)

            status, err = await refused("/v1/completions", b"{not json")
            assert status == 400 and "JSON" in err["error"]["message"]
            status, err = await refused("/v1/completions", json.dumps({"model": "nope", "prompt": "hi"}).encode())
            assert status == 404 and "tiny" in err["error"]["message"]  # says which models are served
            status, err = await refused("/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}')
            assert status == 413 and "smaller" in err["error"]["message"]
            # A request without a body (headers end the stream) is placed by load at once.
            call = stub.Process()
            await call.write(headers_msg("/v1/models", method="GET", eos=True))
            answer = await call.read()
            assert set_headers(answer.request_headers.response)[DEST][0] in {addr(r) for r in fleet}
            # Something to hash is missing: placed by load, the replica answers what is wrong.
            call, first, raw = await pick(stub, {"model": "tiny"})
            assert set_headers(first.request_headers.response)[DEST][0] in {addr(r) for r in fleet}
            assert raw == b'{"model": "tiny"}'
            metrics = (await ahttp("GET", p.http_url + "/metrics"))[2].decode()
            for outcome in ("bad_request", "not_found", "too_large", "load"):
                assert f'kvfleet_picker_picks_total{{outcome="{outcome}"}}' in metrics
    asyncio.run(main())


def test_subset_hint_and_no_replica_answer_503(fleet):
    dead = f"http://127.0.0.1:{procs.free_port()}"

    async def main():
        async with picker([r.replica_arg for r in fleet], policy="precise_prefix") as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            only = addr(fleet[1])
            for i in range(4):  # unrelated prompts would spread; the hint keeps them on one endpoint
                _, first, _ = await pick(stub, {"model": "tiny", "prompt": f"{i} unrelated {i * 31}"}, subset=[only])
                assert set_headers(first.request_headers.response)[DEST][0] == only
            _, first, _ = await pick(stub, {"model": "tiny", "prompt": "hi"}, subset=["10.9.9.9:80"])
            assert first.immediate_response.status.code == 503
            assert "subset" in json.loads(first.immediate_response.body)["error"]["message"]
        async with picker([dead]) as p, channel(p) as ch:
            await wait_for(lambda: not p.balancer.registry.get(dead).healthy)
            _, first, _ = await pick(pb_grpc.ExternalProcessorStub(ch), {"model": "tiny", "prompt": "hi"})
            assert first.immediate_response.status.code == 503
            check = health_pb2_grpc.HealthStub(ch).Check
            live = await check(health_pb2.HealthCheckRequest(service="liveness"))
            assert live.status == health_pb2.HealthCheckResponse.SERVING

            async def readiness():
                return (await check(health_pb2.HealthCheckRequest(service="readiness"))).status
            for _ in range(100):  # re-read every health_refresh_s
                if await readiness() == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await readiness() == health_pb2.HealthCheckResponse.NOT_SERVING
    asyncio.run(main())


def test_a_stream_that_ends_early_releases_its_booking(fleet):
    """Envoy cancels the ext_proc call when the client goes away mid-response: the booking ends
    (as failed), nothing stays counted in flight."""
    async def main():
        async with picker([r.replica_arg for r in fleet]) as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            call, first, _ = await pick(stub, {"model": "tiny", "prompt": "hello", "max_tokens": 50})
            endpoint = set_headers(first.request_headers.response)[DEST][0]
            replica = next(r for r in p.balancer.registry if r.url.endswith(endpoint))
            assert replica.inflight_requests == 1
            await call.write(response_headers_msg(200, "text/event-stream"))
            await call.read()
            call.cancel()
            await wait_for(lambda: replica.inflight_requests == 0)
            metrics = (await ahttp("GET", p.http_url + "/metrics"))[2].decode()
            assert "kvfleet_picker_aborted_total 1.0" in metrics
            assert "kvfleet_picker_streams 0.0" in metrics
    asyncio.run(main())


def test_config_file_and_envoy_bootstrap_validate(tmp_path, fleet):
    """The config file's `picker` table, and the bootstrap the picker prints passes the real
    Envoy's own validation (fail-open and fail-closed)."""
    import subprocess

    from harness.envoy import envoy_binary

    f = tmp_path / "picker.toml"
    f.write_text('policy = "precise_prefix"\nreplicas = ["http://127.0.0.1:8001"]\n[picker]\ngrpc_port = 9102\n')
    cfg = PickerConfig.from_file(f)
    assert (cfg.grpc_port, cfg.fleet.policy, cfg.fleet.port) == (9102, "precise_prefix", 9090)
    f.write_text('[picker]\ngrpc_prot = 1\n')
    with pytest.raises(ValueError, match="grpc_port"):
        PickerConfig.from_file(f)
    f.write_text('api_keys = ["k1"]\n')  # Envoy carries the requests: the gateway must check keys
    with pytest.raises(ValueError, match="ext_authz"):
        PickerConfig.from_file(f)
    configs = {f"{fail_open}-{mode}-{lb}": bootstrap("127.0.0.1:8080", "127.0.0.1:9002", [addr(r) for r in fleet],
                                                     fail_open=fail_open, admin="127.0.0.1:9901", body_mode=mode, lb=lb)
               for fail_open in (True, False) for mode in ("buffered", "full_duplex")
               for lb in ("original_dst", "override_host")}
    # what `kvfleet picker --print-envoy-config` prints (a host name resolved to the address)
    printed = subprocess.run([sys.executable, "-m", "kvfleet.cli", "picker", "--print-envoy-config",
                              "--replica", "http://localhost:8001", "--replica", fleet[0].url],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    configs["printed"] = json.loads(printed.stdout)
    fallback = next(c for c in configs["printed"]["static_resources"]["clusters"] if c["name"] == "fallback")
    listed = [e["endpoint"]["address"]["socket_address"] for e in fallback["load_assignment"]["endpoints"][0]
              ["lb_endpoints"]]
    assert listed[0]["address"] in ("127.0.0.1", "::1") and listed[0]["port_value"] == 8001
    assert listed[1] == {"address": "127.0.0.1", "port_value": int(addr(fleet[0]).rsplit(":", 1)[1])}
    for name, cfg_json in configs.items():
        path = tmp_path / f"envoy-{name}.json"
        path.write_text(json.dumps(cfg_json))
        out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (name, out.stderr[-2000:])


def test_buffered_mode_answers_headers_at_once_and_picks_on_the_body(fleet):
    """The fail-open configuration (request body BUFFERED, response STREAMED; Envoy says so in
    the first message's protocol_config): the headers are answered at once, the pick rides on
    the body's answer, and response chunks are acknowledged without a copy."""
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

    body = {"model": "tiny", "prompt": "Buffered: " + SHARED, "max_tokens": 3}
    raw = json.dumps(body).encode()

    def first(request_mode) -> pb.ProcessingRequest:
        msg = headers_msg("/v1/completions")
        msg.protocol_config.request_body_mode = request_mode
        msg.protocol_config.response_body_mode = ProcessingMode.STREAMED
        return msg

    async def main():
        async with picker([r.replica_arg for r in fleet]) as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            call = stub.Process()
            await call.write(first(ProcessingMode.BUFFERED))
            answer = await call.read()
            assert answer.WhichOneof("response") == "request_headers"
            assert not answer.request_headers.response.HasField("header_mutation")
            await call.write(body_msg(raw, eos=True))
            answer = await call.read()
            common = answer.request_body.response
            endpoint = set_headers(common)[DEST][0]
            assert common.clear_route_cache and not common.HasField("body_mutation")
            assert answer.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value == endpoint
            replica = next(r for r in p.balancer.registry if r.url.endswith(endpoint))
            status, ctype, data = await asyncio.to_thread(send, endpoint, "/v1/completions", raw)
            await call.write(response_headers_msg(status, ctype))
            await call.read()
            for i, piece in enumerate((data[:20], data[20:])):
                await call.write(body_msg(piece, eos=i == 1, response=True))
                ack = await call.read()
                assert ack.WhichOneof("response") == "response_body"
                assert not ack.response_body.response.HasField("body_mutation")  # Envoy sends its own copy
            await call.done_writing()
            await wait_for(lambda: replica.inflight_requests == 0)
            assert p.balancer.audit.latest(1)[0]["delivered_cached_tokens"] == \
                json.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"]

            call = stub.Process()  # a STREAMED request body cannot be picked from: said plainly
            await call.write(first(ProcessingMode.STREAMED))
            refusal = (await call.read()).immediate_response
            assert refusal.status.code == 500
            assert "FULL_DUPLEX_STREAMED or BUFFERED" in json.loads(refusal.body)["error"]["message"]
    asyncio.run(main())


def test_a_response_with_its_usage_in_its_headers_ends_there_without_its_body(fleet):
    """A kvfleet replica's non-streamed answer says its usage in X-Kvfleet-Usage: the booking ends
    at the response's headers (usage counted, decision audited), and, in the fail-open body modes,
    the answer asks Envoy for no response body or trailers (one message less each way); in full
    duplex (where Envoy ignores such an override) the body is still relayed."""
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode as Mode

    def send_keeping_usage(endpoint: str, raw: bytes) -> tuple[int, str, str, bytes]:
        req = urllib.request.Request(f"http://{endpoint}/v1/completions", data=raw,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.headers["X-Kvfleet-Usage"], r.read()

    async def main():
        async with picker([r.replica_arg for r in fleet]) as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            for i, (request_mode, response_mode) in enumerate(((Mode.BUFFERED, Mode.STREAMED),
                                                               (Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED))):
                raw = json.dumps({"model": "tiny", "prompt": f"Usage header {i}: " + SHARED, "max_tokens": 3}).encode()
                call = stub.Process()
                first = headers_msg("/v1/completions", request_id=f"req-usage-{i}")
                first.protocol_config.request_body_mode = request_mode
                first.protocol_config.response_body_mode = response_mode
                await call.write(first)
                if request_mode == Mode.BUFFERED:
                    await call.read()  # the headers' answer, at once
                await call.write(body_msg(raw, eos=True))
                answer = await call.read()
                common = answer.request_body.response if request_mode == Mode.BUFFERED else \
                    answer.request_headers.response
                endpoint = set_headers(common)[DEST][0]
                if request_mode != Mode.BUFFERED:
                    await read_body_answers(call, "request_body")
                replica = next(r for r in p.balancer.registry if r.url.endswith(endpoint))
                status, ctype, usage, data = await asyncio.to_thread(send_keeping_usage, endpoint, raw)
                assert json.loads(usage) == json.loads(data)["usage"]
                await call.write(response_headers_msg(status, ctype, x_kvfleet_usage=usage))
                reply = await call.read()
                answer = reply.response_headers.response
                assert replica.inflight_requests == 0  # ended at its headers
                decision = p.balancer.audit.latest(1)[0]
                assert decision["request_id"] == f"req-usage-{i}"
                cached = json.loads(usage)["prompt_tokens_details"]["cached_tokens"]
                assert decision["delivered_cached_tokens"] == cached
                assert "x-kvfleet-usage" in answer.header_mutation.remove_headers  # not for the client
                if request_mode == Mode.BUFFERED:
                    mode = reply.mode_override
                    assert (mode.response_body_mode, mode.response_trailer_mode) == (Mode.NONE, Mode.SKIP)
                else:
                    assert not reply.HasField("mode_override")
                    await call.write(body_msg(data, eos=True, response=True))
                    part = (await call.read()).response_body.response.body_mutation.streamed_response
                    assert (part.body, part.end_of_stream) == (data, True)
                await call.done_writing()
    asyncio.run(main())


def test_fallback_list_and_a_request_served_by_a_fallback(fleet):
    """With fallback_endpoints=1 the answer lists the pick and the policy's next choice
    (`ip:port,ip:port`, header and metadata alike); when the response says Envoy sent it to the
    fallback (its retry after the pick refused the connection), the picker books it there and
    releases the pick as failed."""
    async def main():
        async with picker([r.replica_arg for r in fleet], fallback_endpoints=1) as p, channel(p) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            call, first, raw = await pick(stub, {"model": "tiny", "prompt": "Fallback: " + SHARED, "max_tokens": 2})
            listed = set_headers(first.request_headers.response)[DEST][0]
            assert first.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value == listed
            picked, fallback = listed.split(",")
            assert {picked, fallback} == {addr(r) for r in fleet}
            reg = p.balancer.registry
            by_addr = {addr(r): reg.get(r.url) for r in fleet}
            assert (by_addr[picked].inflight_requests, by_addr[fallback].inflight_requests) == (1, 0)
            status, ctype, data = await asyncio.to_thread(send, fallback, "/v1/completions", raw)
            await call.write(response_headers_msg(status, ctype, x_kvfleet_upstream=fallback))
            answer = await call.read()
            assert set_headers(answer.response_headers.response)["x-kvfleet-replica"][0] == by_addr[fallback].replica_id
            assert (by_addr[picked].inflight_requests, by_addr[fallback].inflight_requests) == (0, 1)
            await call.write(body_msg(data, eos=True, response=True))
            await call.read()
            await call.done_writing()
            await wait_for(lambda: by_addr[fallback].inflight_requests == 0)
            assert p.balancer.audit.latest(1)[0]["replica"] == by_addr[fallback].replica_id
    asyncio.run(main())
