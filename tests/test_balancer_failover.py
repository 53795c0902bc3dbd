"""Failover, draining and agreement between balancers, with real replica subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest

from balancer.config import BalancerConfig
from harness.fleet import balancer, http, read_stream, start_replicas

pytestmark = pytest.mark.slow


class KillAt:
    """A `read_stream` callback that SIGKILLs `victim` once the stream has `n` token ids."""

    def __init__(self, victim, n: int) -> None:
        self.victim, self.n, self.done = victim, n, False

    async def __call__(self, ids: int) -> None:
        if ids >= self.n and not self.done:
            self.done = True
            os.kill(self.victim.popen.pid, signal.SIGKILL)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_midstream_failover_is_token_identical_for_greedy(kind):
    reps = start_replicas(2)
    try:
        async def main():
            if kind == "chat":
                body = {"model": "tiny", "messages": [{"role": "user", "content": "Count for me"}]}
                path = "/v1/chat/completions"
            else:
                body = {"model": "tiny", "prompt": "Count for me: "}
                path = "/v1/completions"
            body.update(max_tokens=120, temperature=0, ignore_eos=True)
            loop = asyncio.get_running_loop()
            async with balancer([r.replica_arg for r in reps], policy="round_robin") as (url, b):
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + path, json={**body, "stream": True}) as r:
                        victim = next(p for p in reps if p.url == r.headers["X-Kvfleet-Replica"])
                        kill = KillAt(victim, 30)
                        ids, text, finish, error = await read_stream(r, kill)
            assert kill.done and error is None and finish == "length"
            # The reference: the same greedy request served start to end by the survivor
            # (all replicas are built from the same seed, so any of them is the truth).
            survivor = next(p for p in reps if p is not victim)
            status, _, ref = await loop.run_in_executor(
                None, lambda: http("POST", survivor.url + path, {**body, "return_token_ids": True}))
            assert status == 200
            ref_choice = json.loads(ref)["choices"][0]
            assert ids == ref_choice["token_ids"]
            ref_text = ref_choice.get("text", (ref_choice.get("message") or {}).get("content"))
            assert text == ref_text, (repr(text), repr(ref_text))
        asyncio.run(main())
    finally:
        for r in reps:
            r.stop()


def test_a_sampled_stream_that_loses_its_replica_ends_with_an_error_event():
    """Only a greedy stream can be continued exactly; a sampled one gets a clear SSE error."""
    reps = start_replicas(2)
    try:
        async def main():
            body = {"model": "tiny", "prompt": "Count for me: ", "max_tokens": 120, "temperature": 0.8, "seed": 3, "return_token_ids": True,
                    "ignore_eos": True, "stream": True}
            async with balancer([r.replica_arg for r in reps], policy="round_robin") as (url, b):
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/v1/completions", json=body) as r:
                        victim = next(p for p in reps if p.url == r.headers["X-Kvfleet-Replica"])
                        kill = KillAt(victim, 20)
                        ids, text, finish, error = await read_stream(r, kill)
                assert b.metrics.failovers.labels(victim.url)._value.get() == 0
            assert kill.done and finish is None and 20 <= len(ids) < 120
            assert error is not None and "cannot be continued exactly" in error["message"], error
        asyncio.run(main())
    finally:
        for r in reps:
            r.stop()


def test_drain_and_remove_without_dropping_inflight():
    reps = start_replicas(2)
    try:
        async def main():
            async with balancer([r.replica_arg for r in reps], policy="round_robin") as (url, b):
                async with aiohttp.ClientSession() as s:
                    body = {"model": "tiny", "prompt": "a long answer please", "max_tokens": 150, "temperature": 0,
                            "ignore_eos": True, "stream": True}
                    async with s.post(url + "/v1/completions", json=body) as r:
                        serving = r.headers["X-Kvfleet-Replica"]
                        # Freeze the serving replica so its stream stays in flight however fast the
                        # machine is (a 150-token stream can finish before any sleep would end).
                        frozen = next(p for p in reps if p.url == serving)
                        os.kill(frozen.popen.pid, signal.SIGSTOP)
                        try:
                            removal = asyncio.create_task(
                                s.delete(url + "/admin/replicas", params={"replica": serving, "timeout": "60"}))
                            for _ in range(500):
                                state = b.registry.get(serving)
                                if state is None or state.draining:
                                    break
                                await asyncio.sleep(0.01)
                            assert state is not None and state.draining, "removal must drain, not drop, in-flight"
                            assert not removal.done()
                            async with s.post(url + "/v1/completions",
                                              json={"model": "tiny", "prompt": "new", "max_tokens": 2}) as r2:
                                assert r2.headers["X-Kvfleet-Replica"] != serving
                        finally:
                            os.kill(frozen.popen.pid, signal.SIGCONT)
                        ids, text, finish, error = await read_stream(r)
                        assert finish == "length" and error is None and len(ids) == 150
                    resp = await removal
                    assert resp.status == 200 and (await resp.json())["inflight_at_removal"] == 0
                    assert b.registry.get(serving) is None
                    async with s.get(url + "/admin/replicas") as r3:
                        assert [x["id"] for x in (await r3.json())["replicas"]] == [
                            p.url for p in reps if p.url != serving]
        asyncio.run(main())
    finally:
        for r in reps:
            r.stop()


@pytest.mark.parametrize("policy", ["precise_prefix", "dynamo_kv", "llmd_scorer"])
def test_two_balancers_agree(policy):
    reps = start_replicas(3)
    try:
        async def main():
            specs = [r.replica_arg for r in reps]
            async with balancer(specs, policy=policy) as (url_a, a), balancer(specs, policy=policy) as (url_b, b):
                async with aiohttp.ClientSession() as s:
                    groups = ["Tenant alpha system prompt. " * 10, "Tenant beta instructions here. " * 10]
                    for i in range(6):
                        async with s.post(url_a + "/v1/completions",
                                          json={"model": "tiny", "prompt": groups[i % 2] + f"q{i}", "max_tokens": 2}):
                            pass
                    await asyncio.sleep(1.0)  # same events and load reports reach both
                    for i in range(8):
                        body = {"model": "tiny", "prompt": groups[i % 2] + f"probe {i}", "max_tokens": 2}
                        async with s.post(url_a + "/admin/explain", json=body) as ra, \
                                s.post(url_b + "/admin/explain", json=body) as rb:
                            ea, eb = await ra.json(), await rb.json()
                        assert ea["matched_blocks"] == eb["matched_blocks"]
                        assert ea["decision"] == eb["decision"], (ea, eb)
        asyncio.run(main())
    finally:
        for r in reps:
            r.stop()


def test_config_file_and_validation(tmp_path):
    f = tmp_path / "balancer.toml"
    f.write_text('port = 9000\npolicy = "dynamo_kv"\nreplicas = ["http://h1:8000=tcp://h1:5557,tcp://h1:5558", '
                 '{url = "http://h2:8000"}]\n[health]\ninterval_s = 2.0\n')
    cfg = BalancerConfig.from_file(f)
    assert cfg.port == 9000 and cfg.policy == "dynamo_kv" and cfg.health.interval_s == 2.0
    assert cfg.replicas[0].events == "tcp://h1:5557" and cfg.replicas[0].replay == "tcp://h1:5558"
    assert cfg.replicas[1].events is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"replicaz": []}))
    with pytest.raises(ValueError, match="unknown config keys"):
        BalancerConfig.from_file(bad)
    with pytest.raises(ValueError, match="http://host:port"):
        BalancerConfig.from_dict({"replicas": ["localhost:8000"]})


def test_dns_discovery_adds_and_admin_adds_replicas():
    reps = start_replicas(1)
    try:
        port = reps[0].url.rsplit(":", 1)[1]

        async def main():
            from balancer.config import DnsConfig

            async with balancer([], dns=(DnsConfig(name=f"localhost:{port}", interval_s=0.2),)) as (url, b):
                for _ in range(50):
                    if any(r.url.endswith(f":{port}") for r in b.registry):
                        break
                    await asyncio.sleep(0.1)
                assert any(r.url == f"http://127.0.0.1:{port}" for r in b.registry)
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                                     "max_tokens": 2}) as r:
                        assert r.status == 200
                    async with s.post(url + "/admin/replicas", json={"url": "not a url"}) as r:
                        assert r.status == 400 and "http://host:port" in (await r.json())["error"]["message"]
        asyncio.run(main())
    finally:
        for r in reps:
            r.stop()
