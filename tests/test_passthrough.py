"""Issue #20: the balancer forwards every request its replicas can serve, as the client sent it.

The real balancer in front of vLLM-shaped echo servers (harness/echo_server.py, real
subprocesses on loopback, two models in one fleet): every body arrives byte for byte — fields
the balancer does not know, `n`, `logprobs`, `best_of`, batched prompts, long stop lists, image
parts, tools — the upstream's refusals reach the client unchanged, every vLLM route and unknown
`/v1/*` routes are forwarded with their method and query, and each model goes only to the
replicas that serve it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import aiohttp
import openai
import pytest

from harness import procs
from harness.fleet import balancer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def echoes():
    started = []
    try:
        for model in ("m-a", "m-a", "m-b"):
            started.append(procs.launch([sys.executable, "-m", "harness.echo_server", "--model", model],
                                        name=f"echo {model}"))
        yield started
    finally:
        for p in started:
            p.stop()


def arrived(echo: dict) -> bytes:
    return base64.b64decode(echo["body_b64"])


async def ready(b) -> None:
    """Until the health polls have read every replica's /v1/models."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while b.served_models() != ["m-a", "m-b"] or any(not r.models for r in b.registry):
        assert loop.time() < deadline, b.served_models()
        await asyncio.sleep(0.05)


async def send(s: aiohttp.ClientSession, method: str, url: str, raw: bytes | None = None,
               headers: dict | None = None) -> tuple[int, dict, bytes]:
    async with s.request(method, url, data=raw, headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, dict(r.headers), await r.read()


def run(echoes, scenario, **cfg):
    async def main():
        cfg.setdefault("model", None)
        async with balancer([e.url for e in echoes], **cfg) as (url, b):
            await ready(b)
            async with aiohttp.ClientSession() as s:
                await scenario(url, b, s, {e.url: e for e in echoes})
    asyncio.run(main())


# Bodies a client of vLLM sends that the balancer must not narrow: (path, raw bytes).
WIDE = [
    ("/v1/completions", b'{"model": "m-b", "prompt": "hi", "n": 2, "best_of": 3, "logprobs": 5, "echo": true,'
                        b' "some_future_field": {"x": [1, 2.50, null]}, "max_tokens": 7}'),
    ("/v1/completions", b'{"model":"m-b","prompt":["first prompt","second prompt",[1,2,3]],"max_tokens":3}'),
    ("/v1/completions", json.dumps({"model": "m-b", "prompt": "x", "stop": [f"s{i}" for i in range(40)]}).encode()),
    ("/v1/chat/completions", json.dumps({
        "model": "m-b", "top_logprobs": 3, "logprobs": True, "n": 4, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "messages": [{"role": "critic", "content": "an unknown role"},
                     {"role": "user", "content": [{"type": "text", "text": "look"},
                                                  {"type": "image_url", "image_url": {"url": "data:,"}}]}],
        "response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, indent=1).encode()),
    ("/v1/completions", b'{"model": "m-b", "prompt": 42}'),  # not hashable: routed by load, the replica judges it
]


def test_bodies_arrive_byte_for_byte_on_a_replica_of_their_model(echoes):
    async def scenario(url, b, s, by_url):
        for path, raw in WIDE:
            status, headers, out = await send(s, "POST", url + path, raw)
            assert status == 200, (raw, out[:300])
            echo = json.loads(out)["echo"]
            assert echo["served_by"] == "m-b" and headers["X-Kvfleet-Replica"] == echoes[2].url
            assert arrived(echo) == raw, (raw, arrived(echo))
            assert echo["target"] == path and echo["method"] == "POST"
        # No model named: any replica, by load; the body still arrives unchanged.
        raw = b'{"prompt": "no model", "frequency_penalty": 0.5}'
        status, _, out = await send(s, "POST", url + "/v1/completions", raw)
        assert status == 200 and arrived(json.loads(out)["echo"]) == raw
    run(echoes, scenario)


def test_streams_are_relayed_and_only_greedy_ones_ask_for_token_ids(echoes):
    async def scenario(url, b, s, by_url):
        sampled = b'{"model":"m-a","prompt":"tell","stream":true,"temperature":0.8,"max_tokens":4}'
        greedy = b'{"model":"m-a","prompt":"tell","stream":true,"temperature":0,"max_tokens":4}'
        for raw, expect in ((sampled, sampled), (greedy, b'{"return_token_ids":true,' + greedy[1:])):
            status, headers, out = await send(s, "POST", url + "/v1/completions", raw)
            assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
            events = [e for e in out.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]"
            echo = json.loads(events[0][len(b"data: "):])["echo"]
            # Exact failover needs token ids: the balancer adds that one field, every other byte is the client's.
            assert arrived(echo) == expect
            assert json.loads(arrived(echo)) == {**json.loads(raw), **({"return_token_ids": True} if raw is greedy
                                                                        else {})}
        # A Responses API stream has typed events and no [DONE]: relayed as it is, nothing added.
        raw = b'{"model":"m-b","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"stream":true}'
        status, headers, out = await send(s, "POST", url + "/v1/responses", raw)
        assert status == 200 and headers["X-Kvfleet-Replica"] == echoes[2].url
        events = [e for e in out.split(b"\n\n") if e]
        assert [e.split(b"\n")[0] for e in events] == [b"event: response.output_text.delta",
                                                       b"event: response.completed"]
        assert arrived(json.loads(events[0].split(b"data: ", 1)[1])["echo"]) == raw
    run(echoes, scenario)


def test_upstream_refusals_reach_the_client_unchanged(echoes):
    async def scenario(url, b, s, by_url):
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            raw = json.dumps({"model": "m-b", "prompt": "x", "messages": [{"role": "user", "content": "x"}],
                              "input": "x", "echo_status": 422, "echo_message": "the replica says no"}).encode()
            status, headers, out = await send(s, "POST", url + path, raw)
            assert status == 422, (path, out)
            assert json.loads(out)["error"] == {"message": "the replica says no", "type": "BadRequestError",
                                                "param": None, "code": 422}
            assert headers["X-Kvfleet-Replica"] == echoes[2].url
        # A model no replica serves: the balancer answers, naming what the fleet serves.
        status, _, out = await send(s, "POST", url + "/v1/completions", b'{"model": "m-z", "prompt": "x"}')
        err = json.loads(out)["error"]
        assert status == 404 and "`m-z` does not exist" in err["message"] and "`m-a`, `m-b`" in err["message"]
        status, _, out = await send(s, "POST", url + "/v1/embeddings", b'{"model": "m-z", "input": "x"}')
        assert status == 404
        # Not JSON at all: refused by the balancer itself, OpenAI-style.
        status, _, out = await send(s, "POST", url + "/v1/completions", b"{not json")
        assert status == 400 and json.loads(out)["error"]["code"] == 400
    run(echoes, scenario)


def test_every_vllm_route_and_unknown_v1_routes_are_forwarded(echoes):
    async def scenario(url, b, s, by_url):
        status, _, out = await send(s, "GET", url + "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(out)["data"]] == ["m-a", "m-b"]
        status, _, out = await send(s, "GET", url + "/version")
        assert status == 200 and json.loads(out)["version"].startswith("echo-")
        for method, target, raw in (
            ("POST", "/v1/embeddings", b'{"model": "m-b", "input": ["a", "b"], "encoding_format": "float"}'),
            ("POST", "/v1/responses", b'{"model": "m-b", "input": "hello", "max_output_tokens": 5}'),
            ("POST", "/tokenize", b'{"model": "m-b", "prompt": "hello"}'),
            ("POST", "/detokenize", b'{"model": "m-b", "tokens": [1, 2]}'),
            ("POST", "/rerank", b'{"model": "m-b", "query": "q", "documents": ["a", "b"]}'),
            ("POST", "/pooling", b'{"model": "m-b", "input": "x"}'),
            ("POST", "/v1/audio/some-new-thing?x=1&y=%20z", b'{"model": "m-b", "anything": true}'),
            ("GET", "/v1/models/m-b/extra?verbose=true", None),
            ("DELETE", "/v1/files/file-123", None),
        ):
            status, headers, out = await send(s, method, url + target, raw)
            assert status == 200, (target, out[:200])
            echo = json.loads(out)["echo"]
            assert (echo["method"], echo["target"]) == (method, target)
            assert arrived(echo) == (raw or b"")
            if raw is not None:  # a body naming a model goes to a replica serving it
                assert echo["served_by"] == "m-b"
        # Forwarded by load: an idle fleet takes turns.
        seen = set()
        for _ in range(6):
            _, headers, _ = await send(s, "POST", url + "/tokenize", b'{"model": "m-a", "prompt": "x"}')
            seen.add(headers["X-Kvfleet-Replica"])
        assert seen == {echoes[0].url, echoes[1].url}
    run(echoes, scenario)


def test_the_openai_client_through_the_balancer(echoes):
    async def scenario(url, b, s, by_url):
        extra = {"some_future_field": [1, 2], "n": 2, "logprobs": 2}
        sync = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = await asyncio.to_thread(sync.completions.create, model="m-b", prompt=["p1", "p2"], max_tokens=3,
                                    extra_body=extra)
        sent = json.loads(arrived(r.model_extra["echo"]))
        assert sent["prompt"] == ["p1", "p2"] and sent["some_future_field"] == [1, 2] and sent["n"] == 2
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        chat = await client.chat.completions.create(model="m-a", messages=[{"role": "user", "content": "hi"}],
                                                    top_logprobs=3, logprobs=True, extra_body={"top_k": 5})
        sent = json.loads(arrived(chat.model_extra["echo"]))
        assert sent["top_logprobs"] == 3 and sent["top_k"] == 5 and chat.model_extra["echo"]["served_by"] == "m-a"
        stream = await client.chat.completions.create(model="m-b", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True, n=3)
        chunks = [c async for c in stream]
        sent = json.loads(arrived(chunks[0].model_extra["echo"]))
        assert sent["n"] == 3 and sent["stream"] is True and chunks[-1].choices[0].finish_reason == "stop"
        emb = await client.embeddings.with_raw_response.create(model="m-b", input="x")
        assert json.loads(emb.text)["echo"]["target"] == "/v1/embeddings"
        await client.close()
    run(echoes, scenario)
