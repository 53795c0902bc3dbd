"""The balancer's front door (balancer/guard.py) and API keys on the replica (replica/auth.py).

Unit tests drive the rate limiter and the admission queue on a fake clock; the rest run a
simulated replica subprocess behind an in-process balancer and check what a client sees:
status, OpenAI-style error body, Retry-After, and what reached the replica.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from balancer.config import BalancerConfig
from balancer.guard import Admission, GuardConfig, Overloaded, RateLimiter
from harness import procs
from harness.fleet import balancer

SIM = ["replica", "--port", "0", "--engine", "sim", "--preset", "llama3-8b-h100", "--model", "tiny",
       "--num-blocks", "1024", "--max-model-len", "2048", "--kv-events-endpoint", "tcp://127.0.0.1:0",
       "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
REPLICA_KEY = "replica-secret"
BODY = {"model": "tiny", "prompt": "hello there", "max_tokens": 3, "temperature": 0}


# ---------------------------------------------------------------------------------- units


def test_rate_limiter_refills_at_the_configured_rate():
    now = [0.0]
    rl = RateLimiter(rps=2.0, burst=3, clock=lambda: now[0])
    assert [rl.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("k") == pytest.approx(0.5)  # one token back in 1/rps
    assert rl.take("other") == 0.0  # keys are independent
    now[0] = 0.5
    assert rl.take("k") == 0.0 and rl.take("k") > 0


def test_admission_is_fifo_bounded_and_times_out():
    async def main():
        cap = [1]
        adm = Admission(lambda: cap[0], max_waiting=2, timeout_s=0.3)
        await adm.acquire()
        order = []

        async def waiter(name):
            await adm.acquire()
            order.append(name)

        a = asyncio.create_task(waiter("a"))
        await asyncio.sleep(0)
        b = asyncio.create_task(waiter("b"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:
            await adm.acquire()  # two already wait
        assert e.value.reason == "queue_full"
        adm.release()  # a goes first
        await asyncio.sleep(0.01)
        assert order == ["a"] and adm.waiting == 1
        cap[0] = 2  # capacity grows without an event: the waiter re-checks on its own
        await asyncio.wait_for(b, 1.0)
        assert order == ["a", "b"] and adm.active == 2 and adm.waiting == 0
        with pytest.raises(Overloaded) as e:
            await adm.acquire()
        assert e.value.reason == "queue_timeout" and adm.waiting == 0
        c = asyncio.create_task(adm.acquire())  # a client that goes away while waiting
        await asyncio.sleep(0.01)
        c.cancel()
        await asyncio.gather(c, return_exceptions=True)
        assert adm.waiting == 0 and adm.active == 2
        adm.release()
        adm.release()
        assert adm.active == 0

    asyncio.run(main())


def test_guard_config_validation_and_file_keys(tmp_path):
    with pytest.raises(ValueError):
        GuardConfig(api_keys="one-string-not-a-list")
    with pytest.raises(ValueError):
        GuardConfig(api_keys=(" padded ",))
    with pytest.raises(ValueError):
        GuardConfig(rate_limit_rps=float("nan"))
    with pytest.raises(ValueError):
        GuardConfig(max_tokens_cap=-1)
    path = tmp_path / "b.toml"
    path.write_text('replicas = ["http://127.0.0.1:9"]\napi_keys = ["k1"]\n[guard]\nmax_tokens_cap = 7\n')
    cfg = BalancerConfig.from_file(path)
    assert cfg.guard.api_keys == ("k1",) and cfg.guard.max_tokens_cap == 7
    with pytest.raises(ValueError, match="unknown config keys"):
        BalancerConfig.from_dict({"api_key": ["typo"]})


# ---------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def replicas():
    open_rep = procs.start(SIM)
    try:
        keyed = procs.start(SIM + ["--api-key", REPLICA_KEY])
    except Exception:
        open_rep.stop()
        raise
    yield {"open": open_rep, "keyed": keyed}
    keyed.stop()
    open_rep.stop()


async def call(s: aiohttp.ClientSession, method: str, url: str, key: str | None = None, body: dict | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.request(method, url, json=body, headers=headers) as r:
        raw = await r.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw
        return r.status, r.headers, data


@pytest.mark.slow
def test_api_keys_on_balancer_and_replica(replicas):
    keyed = replicas["keyed"]

    async def main():
        async with aiohttp.ClientSession() as s:
            # The replica alone: its key needed for generation, not for probes.
            st, h, body = await call(s, "POST", keyed.url + "/v1/completions", body=BODY)
            assert st == 401 and body["error"]["code"] == 401 and h["WWW-Authenticate"] == "Bearer"
            assert (await call(s, "POST", keyed.url + "/v1/completions", "wrong", BODY))[0] == 401
            assert (await call(s, "POST", keyed.url + "/v1/completions", REPLICA_KEY, BODY))[0] == 200
            for path in ("/health", "/metrics", "/load"):
                assert (await call(s, "GET", keyed.url + path))[0] == 200
            assert (await call(s, "GET", keyed.url + "/kv_cache_state"))[0] == 401

        guard = GuardConfig(api_keys=("client-a", "client-b"), admin_keys=("admin",))
        async with balancer([keyed.replica_arg], guard=guard, replica_api_key=REPLICA_KEY) as (url, b), \
                aiohttp.ClientSession() as s:
            st, _, body = await call(s, "POST", url + "/v1/completions", body=BODY)
            assert st == 401 and body["error"]["type"] == "AuthenticationError"
            assert (await call(s, "POST", url + "/v1/completions", "client-c", BODY))[0] == 401
            assert (await call(s, "POST", url + "/v1/completions", "Client-A", BODY))[0] == 401
            # The client's key is replaced by the replica key on the way (else the replica says 401).
            st, h, body = await call(s, "POST", url + "/v1/completions", "client-b", BODY)
            assert st == 200 and body["usage"]["completion_tokens"] == 3
            st, _, _ = await call(s, "POST", url + "/v1/chat/completions", "client-a",
                                  {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert st == 200
            assert (await call(s, "GET", url + "/v1/models"))[0] == 401
            assert (await call(s, "GET", url + "/v1/models", "client-a"))[0] == 200
            for path in ("/health", "/metrics", "/openapi.json"):
                assert (await call(s, "GET", url + path))[0] == 200
            assert (await call(s, "GET", url + "/admin/replicas", "client-a"))[0] == 401  # not an admin key
            st, _, body = await call(s, "GET", url + "/admin/replicas", "admin")
            assert st == 200 and body["replicas"][0]["healthy"]
            assert (await call(s, "GET", url + "/nope"))[0] == 401  # unknown routes reveal nothing

        # Without a replica key the balancer's requests are refused by the keyed replica, and the
        # refusal reaches the client as the replica's 401 (not a 5xx, not a retry storm).
        async with balancer([keyed.replica_arg]) as (url, b), aiohttp.ClientSession() as s:
            assert (await call(s, "POST", url + "/v1/completions", body=BODY))[0] == 401
            # Pass-through: with no keys configured on the balancer, the client's header goes on.
            assert (await call(s, "POST", url + "/v1/completions", REPLICA_KEY, BODY))[0] == 200

    asyncio.run(main())


@pytest.mark.slow
def test_rate_and_concurrency_limits_answer_429_with_retry_after(replicas):
    rep = replicas["open"]
    guard = GuardConfig(api_keys=("k1", "k2"), rate_limit_rps=0.5, rate_limit_burst=2, max_concurrency_per_key=1)

    async def main():
        async with balancer([rep.replica_arg], guard=guard) as (url, b), aiohttp.ClientSession() as s:
            assert (await call(s, "POST", url + "/v1/completions", "k1", BODY))[0] == 200
            assert (await call(s, "POST", url + "/v1/completions", "k1", BODY))[0] == 200
            st, h, body = await call(s, "POST", url + "/v1/completions", "k1", BODY)
            assert st == 429 and body["error"]["type"] == "RateLimitError" and int(h["Retry-After"]) >= 1
            assert (await call(s, "POST", url + "/v1/completions", "k2", BODY))[0] == 200  # its own bucket
            _, _, metrics = await call(s, "GET", url + "/metrics")
            assert 'kvfleet_guard_rejected_requests_total{reason="rate_limited"} 1.0' in metrics.decode()
        guard_c = GuardConfig(api_keys=("k1", "k2"), max_concurrency_per_key=1)
        async with balancer([rep.replica_arg], guard=guard_c) as (url, b), aiohttp.ClientSession() as s:
            # Concurrency: k2's second request while its first (a long stream) is in flight.
            long = {**BODY, "max_tokens": 250, "ignore_eos": True, "stream": True}
            async with s.post(url + "/v1/completions", json=long, headers={"Authorization": "Bearer k2"}) as r1:
                assert r1.status == 200
                await r1.content.readline()
                st, h, body = await call(s, "POST", url + "/v1/completions", "k2", BODY)
                assert st == 429 and "concurrent" in body["error"]["message"] and h["Retry-After"] == "1"
                assert (await call(s, "POST", url + "/v1/completions", "k1", BODY))[0] == 200  # another key
                await r1.read()
            assert (await call(s, "POST", url + "/v1/completions", "k2", BODY))[0] == 200  # k2's slot is back
            _, _, metrics = await call(s, "GET", url + "/metrics")
            assert 'kvfleet_guard_rejected_requests_total{reason="concurrency_limited"} 1.0' in metrics.decode()

    asyncio.run(main())


@pytest.mark.slow
def test_admission_queue_waits_then_503_with_retry_after(replicas):
    rep = replicas["open"]
    guard = GuardConfig(max_inflight_per_replica=1, admission_queue=1, admission_timeout_s=0.5, retry_after_s=2)
    long = {**BODY, "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def main():
        async with balancer([rep.replica_arg], guard=guard) as (url, b), aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json=long) as r1:
                assert r1.status == 200
                await r1.content.readline()
                queued = asyncio.create_task(call(s, "POST", url + "/v1/completions", body=BODY))
                await asyncio.sleep(0.1)
                st, h, body = await call(s, "POST", url + "/v1/completions", body=BODY)  # the queue is full
                assert st == 503 and h["Retry-After"] == "2" and "queue is full" in body["error"]["message"]
                st, h, body = await queued  # waited 0.5 s, the long stream still running
                assert st == 503 and h["Retry-After"] == "2" and "no capacity" in body["error"]["message"]
                # A request that fits in the wait is served once the stream ends.
                served = asyncio.create_task(call(s, "POST", url + "/v1/completions", body=BODY))
                await r1.read()
            assert (await asyncio.wait_for(served, 10))[0] in (200, 503)
            assert (await call(s, "POST", url + "/v1/completions", body=BODY))[0] == 200
            assert (await call(s, "GET", url + "/health"))[0] == 200  # never queued

    asyncio.run(main())


@pytest.mark.slow
def test_max_tokens_cap(replicas):
    rep = replicas["open"]

    async def main():
        async with balancer([rep.replica_arg], guard=GuardConfig(max_tokens_cap=5)) as (url, b), \
                aiohttp.ClientSession() as s:
            st, _, body = await call(s, "POST", url + "/v1/completions", body={**BODY, "max_tokens": 6})
            assert st == 400 and body["error"]["param"] == "max_tokens" and "at most 5" in body["error"]["message"]
            st, _, body = await call(s, "POST", url + "/v1/chat/completions",
                                     body={"messages": [{"role": "user", "content": "hi"}],
                                           "max_completion_tokens": 50})
            assert st == 400
            # No max_tokens: the cap is filled in, so the replica stops at 5 (ignore_eos: no early stop).
            st, _, body = await call(s, "POST", url + "/v1/completions",
                                     body={"prompt": "tell me everything", "ignore_eos": True})
            assert st == 200 and body["usage"]["completion_tokens"] == 5
            st, _, body = await call(s, "POST", url + "/v1/completions", body={**BODY, "max_tokens": 4})
            assert st == 200 and body["usage"]["completion_tokens"] == 4
            # Invalid bodies still get the proxy's own 400s.
            st, _, body = await call(s, "POST", url + "/v1/completions", body={"prompt": "x", "max_tokens": "many"})
            assert st == 400 and "integer" in body["error"]["message"]

    asyncio.run(main())
