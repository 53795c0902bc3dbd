"""The balancer with real replica subprocesses on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import aiohttp
import openai
import pytest

from balancer.policies import policy_names
from harness import procs
from harness.fleet import balancer, http, read_stream, start_replicas, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet():
    reps = start_replicas(3)
    yield reps
    for r in reps:
        r.stop()


def dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


async def post_json(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, dict]:
    async with session.post(url, json=body) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def test_shared_prefix_lands_on_holder_and_explain_says_why(fleet):
    shared = "System: you are a careful assistant who answers briefly. " * 12  # ~700 tokens

    async def main():
        async with balancer([r.replica_arg for r in fleet], policy="precise_prefix") as (url, b):
            async with aiohttp.ClientSession() as s:
                status, h, first = await post_json(s, url + "/v1/completions",
                                                   {"model": "tiny", "prompt": shared + "Q0", "max_tokens": 2,
                                                    "temperature": 0})
                assert status == 200
                holder = h["X-Kvfleet-Replica"]
                await asyncio.sleep(0.3)  # let the BlockStored events arrive
                status, ex_h, explain = await post_json(s, url + "/admin/explain",
                                                        {"model": "tiny", "prompt": shared + "Q1", "max_tokens": 2})
                assert explain["decision"] == holder
                assert explain["matched_blocks"][holder] >= len(shared) // 16 - 1
                assert "longest" in explain["reason"]
                for i in range(1, 6):
                    status, h, body = await post_json(s, url + "/v1/completions",
                                                      {"model": "tiny", "prompt": shared + f"Q{i}", "max_tokens": 2,
                                                       "temperature": 0})
                    assert status == 200 and h["X-Kvfleet-Replica"] == holder
                    shared_tokens = len(shared.encode()) + 1
                    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.9 * shared_tokens
    asyncio.run(main())


def test_predictor_learns_output_lengths_from_finished_requests(fleet):
    """`predictive` reads predicted output lengths; the balancer trains the predictor on what
    finished requests generated (usage of JSON bodies and of streams), so a prompt whose earlier
    runs all stopped after 3 tokens is predicted short even when it asks for up to 200."""
    prompt = "Summarise the incident report in one word. " * 8

    async def main():
        async with balancer([r.replica_arg for r in fleet], policy="predictive") as (url, b):
            probe = {"model": "tiny", "prompt": prompt, "max_tokens": 200}
            async with aiohttp.ClientSession() as s:
                status, _, before = await post_json(s, url + "/admin/explain", probe)
                assert status == 200 and before["predicted_output_tokens"] is not None
                for i in range(8):
                    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0,
                            "ignore_eos": True}
                    if i % 2:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                        async with s.post(url + "/v1/completions", json=body) as resp:
                            assert resp.status == 200
                            await resp.read()
                    else:
                        status, _, out = await post_json(s, url + "/v1/completions", body)
                        assert status == 200 and out["usage"]["completion_tokens"] == 3
                await asyncio.sleep(0.1)  # learning runs right after each response is written
                status, _, after = await post_json(s, url + "/admin/explain", probe)
            assert after["predicted_output_tokens"] <= 6, (before, after)
            assert before["predicted_output_tokens"] > 6, before
            # Policies that do not read predictions never run the predictor.
        async with balancer([r.replica_arg for r in fleet], policy="precise_prefix") as (url, b):
            async with aiohttp.ClientSession() as s:
                status, _, ex = await post_json(s, url + "/admin/explain", {"model": "tiny", "prompt": prompt})
            assert status == 200 and ex["predicted_output_tokens"] is None
    asyncio.run(main())


@pytest.mark.parametrize("policy", policy_names())
def test_policy_contract(fleet, policy):
    """Never an unhealthy replica; load spread when nothing is shared; a clean 503 with none."""
    dead = dead_url()

    async def main():
        async with balancer([r.replica_arg for r in fleet] + [dead], policy=policy) as (url, b):
            await wait_for(lambda: not b.registry.get(dead).healthy)  # health polls mark it
            async with aiohttp.ClientSession() as s:
                async def one(i):
                    prompt = f"{i * 7919} unrelated prompt number {i} " + chr(65 + i % 26) * (i % 40)
                    return await post_json(s, url + "/v1/completions",
                                           {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True})
                results = await asyncio.gather(*(one(i) for i in range(24)))
            served = [h["X-Kvfleet-Replica"] for status, h, _ in results]
            assert all(status == 200 for status, _, _ in results)
            assert dead not in served
            assert len(set(served)) >= 2, served  # spread, not herded onto one
        async with balancer([dead], policy=policy) as (url, b):
            await wait_for(lambda: not b.registry.usable())
            async with aiohttp.ClientSession() as s:
                status, _, body = await post_json(s, url + "/v1/completions", {"model": "tiny", "prompt": "x"})
            assert status == 503 and body["error"]["message"]
    asyncio.run(main())


def test_openai_client_streams_through_balancer(fleet):
    bal = procs.start(["balancer", "--port", "0"] +
                      [a for r in fleet for a in ("--replica", r.replica_arg)])
    try:
        c = openai.OpenAI(base_url=f"{bal.url}/v1", api_key="unused", max_retries=0)
        direct = openai.OpenAI(base_url=f"{fleet[0].url}/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Tell me a story"}]
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True) if ch.choices)
        ref = direct.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
        assert text == ref.choices[0].message.content
        chunks = list(c.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0, stream=True))
        ref = direct.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
        assert "".join(ch.choices[0].text for ch in chunks) == ref.choices[0].text
        assert c.models.list().data[0].id == "tiny"
    finally:
        assert bal.stop() == 0


def test_n_logprobs_and_batches_through_the_balancer_equal_a_replica_alone(fleet):
    """Issue #20: the openai client (sync, async, streaming) through the real balancer process
    gets what it gets from a replica directly, for the parameters a vLLM client uses."""
    bal = procs.start(["balancer", "--port", "0"] + [a for r in fleet for a in ("--replica", r.replica_arg)])
    try:
        via = openai.OpenAI(base_url=f"{bal.url}/v1", api_key="unused", max_retries=0)
        direct = openai.OpenAI(base_url=f"{fleet[1].url}/v1", api_key="unused", max_retries=0)
        kw = dict(model="tiny", prompt=["Once upon a time", "In a galaxy"], n=2, max_tokens=5, temperature=0,
                  logprobs=2, extra_body={"ignore_eos": True, "stop_token_ids": [3]})
        a, b = via.completions.create(**kw), direct.completions.create(**kw)
        assert [(c.index, c.text, c.logprobs.tokens) for c in a.choices] == \
            [(c.index, c.text, c.logprobs.tokens) for c in b.choices]
        assert a.usage.completion_tokens == b.usage.completion_tokens == 20

        async def streamed():
            client = openai.AsyncOpenAI(base_url=f"{bal.url}/v1", api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=4, temperature=0.9,
                seed=5, logprobs=True, top_logprobs=1, stream=True, extra_body={"ignore_eos": True})
            texts: dict[int, str] = {}
            async for ch in stream:
                for c in ch.choices:
                    texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            await client.close()
            return texts

        texts = asyncio.run(streamed())
        ref = direct.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3,
                                             max_tokens=4, temperature=0.9, seed=5, extra_body={"ignore_eos": True})
        assert texts == {c.index: c.message.content for c in ref.choices}
    finally:
        assert bal.stop() == 0


BAD = [
    b"{not json",
    b"\xff\xfe",
    json.dumps({"model": "tiny", "prompt": 42}).encode(),
    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(),
    json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"model": "other", "prompt": "x"}).encode(),
    json.dumps({"model": "tiny", "prompt": "x" * 3000}).encode(),
    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 5000}).encode(),
]


def test_bad_input_same_4xx_as_replica_and_413(fleet):
    async def main():
        async with balancer([r.replica_arg for r in fleet], max_body_bytes=64 * 1024) as (url, b):
            loop = asyncio.get_running_loop()
            for body in BAD:
                via = await loop.run_in_executor(None, http, "POST", url + "/v1/completions", body)
                direct = await loop.run_in_executor(None, http, "POST", fleet[0].url + "/v1/completions", body)
                assert 400 <= via[0] < 500, (body, via)
                assert via[0] == direct[0], (body, via, direct)
                if b'"other"' in body:  # no replica serves it: the balancer answers, naming what the fleet serves
                    assert "`other` does not exist" in json.loads(via[2])["error"]["message"]
                    assert "`tiny`" in json.loads(via[2])["error"]["message"]
                    continue
                # Anything else is the replica's own answer, relayed unchanged.
                assert json.loads(via[2])["error"]["message"] == json.loads(direct[2])["error"]["message"]
            big = json.dumps({"model": "tiny", "prompt": "y" * 100_000}).encode()
            status, _, payload = await loop.run_in_executor(None, http, "POST", url + "/v1/completions", big)
            assert status == 413 and json.loads(payload)["error"]["code"] == 413
            status, _, _ = await loop.run_in_executor(None, http, "GET", url + "/health")
            assert status == 200
    asyncio.run(main())


def test_kill9_during_20_streams():
    reps = start_replicas(3)
    try:
        async def main():
            async with balancer([r.replica_arg for r in reps], policy="round_robin") as (url, b):
                victim = reps[0]
                started = asyncio.Event()
                counted = {"n": 0}

                async def stream(s, i):
                    body = {"model": "tiny", "prompt": f"stream {i}: tell me", "max_tokens": 60, "temperature": 0,
                            "ignore_eos": True, "stream": True}

                    # Kill once the victim's own streams are under way (chunks from the others do
                    # not count: a victim killed before its first event is a retry, not a failover).
                    async def count(_):
                        counted["n"] += 1
                        if counted["n"] >= 12:
                            started.set()

                    async with s.post(url + "/v1/completions", json=body) as r:
                        assert r.status == 200
                        on_victim = r.headers["X-Kvfleet-Replica"] == victim.url
                        _, _, finish, error = await read_stream(r, count if on_victim else None)
                    return finish, error

                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                    tasks = [asyncio.create_task(stream(s, i)) for i in range(20)]
                    await asyncio.wait_for(started.wait(), 60)
                    os.kill(victim.popen.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
                    # every stream completed (failover) or ended with an explicit error
                    assert all(f == "length" or e is not None for f, e in results), results
                    assert sum(f == "length" for f, _ in results) >= 18
                    # the balancer stops routing to the dead replica within 2 s
                    while b.registry.get(victim.url) in b.registry.usable():
                        assert time.monotonic() - killed_at < 2.0
                        await asyncio.sleep(0.05)
                    for i in range(6):
                        status, h, _ = await post_json(s, url + "/v1/completions",
                                                       {"model": "tiny", "prompt": f"after {i}", "max_tokens": 2})
                        assert status == 200 and h["X-Kvfleet-Replica"] != victim.url
                assert b.metrics.failovers.labels(victim.url)._value.get() >= 1
        asyncio.run(main())
    finally:
        for r in reps:
            r.stop()
