"""Prefill/decode disaggregation with real replica subprocesses: a prefill replica computes the
prompt, the decode replica pulls its KV block by block over ZMQ and continues; the balancer runs
the two legs (vLLM's proxy shape) and falls back to one replica when a member fails."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest

from harness import procs
from harness.fleet import REPLICA_ARGS, balancer, http, read_stream, wait_for

pytestmark = pytest.mark.slow

HOOKS = {"KVFLEET_TEST_HOOKS": "1"}
# ~10 blocks of 16 tokens (byte tokenizer): a hand-over of several blocks, then a partial one.
PROMPT = "Disaggregated serving splits prefill from decode, block by block. "


def _args(role: str) -> list[str]:
    return REPLICA_ARGS + ["--role", role, "--kv-transfer-timeout", "1"]


def _replica(role: str) -> procs.Proc:
    return procs.start(_args(role), env=HOOKS)


@pytest.fixture(scope="module")
def pair():
    started = procs.start_all([_args("prefill"), _args("decode")], env=HOOKS)
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def _metric(url: str, name: str) -> float:
    text = http("GET", url + "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _body(kind: str, text: str, stream: bool) -> tuple[str, dict]:
    body = {"model": "tiny", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": stream,
            "return_token_ids": True}
    if kind == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


def _reference(url: str, path: str, body: dict) -> tuple[list[int], str]:
    """The request served start to end by one replica (every replica has the same weights)."""
    status, _, raw = http("POST", url + path, {**body, "stream": False})
    assert status == 200, raw
    choice = json.loads(raw)["choices"][0]
    return choice["token_ids"], choice.get("text", (choice.get("message") or {}).get("content"))


async def _ask(url: str, path: str, body: dict) -> tuple[list[int], str, str]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            assert r.status == 200, await r.text()
            if body["stream"]:
                ids, text, finish, error = await read_stream(r)
                assert error is None and finish == "length"
            else:
                choice = (await r.json())["choices"][0]
                ids, text = choice["token_ids"], choice.get("text", (choice.get("message") or {}).get("content"))
            return ids, text, r.headers["X-Kvfleet-Replica"]


async def _roles_known(b, replicas) -> None:
    await wait_for(lambda: all(b.registry.get(p.url).role != "both" for p in replicas))


def _count(b, outcome: str) -> float:
    return b.metrics.disagg.labels(outcome)._value.get()


@pytest.mark.parametrize("kind,stream", [("completion", False), ("chat", True)])
def test_pair_output_is_token_identical_to_a_single_replica(pair, kind, stream):
    prefill, decode = pair
    path, body = _body(kind, f"[{kind}] " + PROMPT * 2, stream)
    ref_ids, ref_text = _reference(prefill.url, path, body)
    pulled = _metric(decode.url, "vllm:nixl_bytes_transferred_sum")

    async def main():
        async with balancer([p.replica_arg for p in pair]) as (url, b):
            await _roles_known(b, pair)
            ids, text, served_by = await _ask(url, path, body)
            assert (ids, text) == (ref_ids, ref_text)
            assert served_by == decode.url
            assert _count(b, "disaggregated") == 1
            assert sum(_count(b, o) for o in ("fallback_prefill", "fallback_decode", "fallback_no_pair")) == 0
            async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
                assert 'kvfleet_disagg_requests_total{outcome="disaggregated"} 1.0' in await r.text()

    asyncio.run(main())
    # The decode replica pulled the prompt's full blocks (64 KiB each for the tiny model) rather than
    # computing them.
    assert _metric(decode.url, "vllm:nixl_bytes_transferred_sum") - pulled >= 8 * 65536


def test_a_corrupted_block_is_recomputed_and_the_answer_is_the_same(pair):
    prefill, decode = pair
    path, body = _body("completion", "[corrupt] " + PROMPT * 2, False)
    ref_ids, ref_text = _reference(prefill.url, path, body)
    failed = _metric(decode.url, "vllm:nixl_num_failed_transfers_total")
    assert http("POST", prefill.url + "/_test/kv_transfer?fault=corrupt")[0] == 200

    async def main():
        async with balancer([p.replica_arg for p in pair]) as (url, b):
            await _roles_known(b, pair)
            assert (await _ask(url, path, body))[:2] == (ref_ids, ref_text)
            assert _count(b, "disaggregated") == 1

    asyncio.run(main())
    assert _metric(decode.url, "vllm:nixl_num_failed_transfers_total") == failed + 1
    assert _metric(decode.url, "kvfleet_kv_transfer_recomputed_blocks_total") > 0


async def _kill_mid_handover(url: str, path: str, body: dict, prefill_url: str, victim: procs.Proc):
    """Send the request, wait until the prefill replica's transfer hangs after its first block
    (the stall hook), SIGKILL `victim`, and return what the client got."""
    before = json.loads(http("GET", prefill_url + "/_test/kv_transfer")[2])["stalled"]
    assert http("POST", prefill_url + "/_test/kv_transfer?fault=stall")[0] == 200
    task = asyncio.create_task(_ask(url, path, body))
    loop = asyncio.get_running_loop()

    def stalled() -> bool:
        return json.loads(http("GET", prefill_url + "/_test/kv_transfer")[2])["stalled"] > before

    deadline = loop.time() + 30
    while not await loop.run_in_executor(None, stalled):
        assert loop.time() < deadline and not task.done(), "the hand-over never started"
        await asyncio.sleep(0.05)
    os.kill(victim.popen.pid, signal.SIGKILL)
    return await task


def test_killing_the_prefill_replica_during_the_handover_loses_no_request(pair):
    _, decode = pair
    victim = _replica("prefill")
    try:
        path, body = _body("completion", "[kill prefill] " + PROMPT * 2, True)
        ref_ids, ref_text = _reference(pair[0].url, path, body)
        path2, body2 = _body("completion", "[after the kill] " + PROMPT * 2, False)
        ref2 = _reference(pair[0].url, path2, body2)
        failed = _metric(decode.url, "vllm:nixl_num_failed_transfers_total")

        async def main():
            async with balancer([victim.replica_arg, decode.replica_arg]) as (url, b):
                await _roles_known(b, [victim, decode])
                # The decode replica's pull times out; it computes the prompt itself.
                assert await _kill_mid_handover(url, path, body, victim.url, victim) == (ref_ids, ref_text,
                                                                                       decode.url)
                # Later requests find no prefill replica: served by the decode replica alone.
                assert (await _ask(url, path2, body2))[:2] == ref2
                assert _count(b, "fallback_prefill") + _count(b, "fallback_no_pair") == 1

        asyncio.run(main())
        assert _metric(decode.url, "vllm:nixl_num_failed_transfers_total") == failed + 1
    finally:
        victim.stop(sig=signal.SIGKILL)


def test_killing_the_decode_replica_during_the_handover_loses_no_request(pair):
    prefill, _ = pair
    victim = _replica("decode")
    try:
        path, body = _body("chat", "[kill decode] " + PROMPT * 2, False)
        ref_ids, ref_text = _reference(prefill.url, path, body)

        async def main():
            async with balancer([prefill.replica_arg, victim.replica_arg]) as (url, b):
                await _roles_known(b, [prefill, victim])
                # The decode leg breaks before any byte: the prefill replica serves the whole request.
                assert await _kill_mid_handover(url, path, body, prefill.url, victim) == (ref_ids, ref_text,
                                                                                        prefill.url)
                assert _count(b, "fallback_decode") == 1 and _count(b, "disaggregated") == 0

        asyncio.run(main())
    finally:
        victim.stop(sig=signal.SIGKILL)


def test_the_balancer_speaks_vllms_disaggregated_proxy_protocol():
    """In front of vLLM-shaped servers with configured roles (`prefill@URL`): the prefill leg gets
    max_tokens 1, no stream and `do_remote_decode`; the decode leg gets the client's body with the
    prefill's kv_transfer_params (vLLM's toy_proxy_server.py shape)."""
    import base64
    import sys

    echoes = [procs.launch([sys.executable, "-m", "harness.echo_server", "--model", "m"], name=f"echo {i}")
              for i in range(2)]
    try:
        async def main():
            specs = [f"prefill@{echoes[0].url}", f"decode@{echoes[1].url}"]
            async with balancer(specs, model="m", block_size=4) as (url, b):
                await wait_for(lambda: all(r.models for r in b.registry))
                sent = {"model": "m", "prompt": "a prompt of a few blocks", "max_tokens": 9, "min_tokens": 2,
                        "stream": True, "stream_options": {"include_usage": True}}
                async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=sent) as r:
                    assert r.status == 200 and r.headers["X-Kvfleet-Replica"] == echoes[1].url
                    first = json.loads((await r.content.readline()).decode()[6:])
                    assert (await r.read()).rstrip().endswith(b"data: [DONE]")
                decoded = json.loads(base64.b64decode(first["echo"]["body_b64"]))
                params = decoded.pop("kv_transfer_params")
                decoded.pop("return_token_ids", None)  # the balancer's own, for exact failover
                assert decoded == sent
                assert params["do_remote_prefill"] is True and params["remote_block_ids"] == [0, 1]
                prefilled = json.loads(base64.b64decode(params["echo"]["body_b64"]))
                assert prefilled["max_tokens"] == 1 and prefilled["stream"] is False
                assert "stream_options" not in prefilled and "min_tokens" not in prefilled
                assert prefilled["kv_transfer_params"]["do_remote_decode"] is True
                assert prefilled["prompt"] == sent["prompt"]
                assert _count(b, "disaggregated") == 1

        asyncio.run(main())
    finally:
        for e in echoes:
            e.stop()


def test_killing_a_prefill_replica_under_load_loses_no_request(pair):
    """The fault suite's kill -9 (harness/chaos.py) on a disaggregated fleet: a second prefill
    replica is SIGKILLed while requests stream through the pairs; every request completes."""
    from harness.chaos import classify, workload
    from loadgen.client import LoadConfig, run_load_sync
    from loadgen.prompts import PromptConfig

    victim = _replica("prefill")
    try:
        async def main():
            async with balancer([p.replica_arg for p in (*pair, victim)]) as (url, b):
                await _roles_known(b, [*pair, victim])
                requests = workload(duration_s=4.0, rate=4.0, seed=1, input_len=160, output_len=24)
                cfg = LoadConfig(model="tiny", prompt=PromptConfig(seed=1), request_timeout_s=60.0, progress=False)
                loop = asyncio.get_running_loop()
                load = loop.run_in_executor(None, lambda: run_load_sync(url, requests, cfg))
                await wait_for(lambda: b.registry.get(victim.url).requests_total >= 2, timeout=30)
                os.kill(victim.popen.pid, signal.SIGKILL)
                run = await load
                completed, errored, lost, _, detail = classify(run.records)
                assert (completed, errored, lost) == (len(requests), 0, 0), detail
                assert _count(b, "disaggregated") >= 1

        asyncio.run(main())
    finally:
        victim.stop(sig=signal.SIGKILL)


def _kv_params(host: str, port: int = 5599) -> dict:
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e", "remote_request_id": "r",
            "remote_block_ids": [0, 1, 2], "remote_block_hashes": [], "remote_host": host, "remote_port": port,
            "remote_block_size": 16}


def test_a_decode_replica_pulls_only_from_its_peers(pair):
    """kv_transfer_params come from the client's side: a remote_host outside the replica's peers
    (loopback, --kv-transfer-host, --kv-transfer-peers) is refused with 403, not dialled."""
    _, decode = pair
    path, body = _body("completion", "[peers] " + PROMPT * 2, False)
    status, _, raw = http("POST", decode.url + path, {**body, "kv_transfer_params": _kv_params("10.1.2.3")})
    assert status == 403, raw
    err = json.loads(raw)["error"]
    assert err["param"] == "kv_transfer_params" and "--kv-transfer-peers" in err["message"]
    assert "10.1.2.3" in err["message"] and err["type"] == "PermissionDeniedError"
    # Loopback is a peer: that request is taken (its hashes match nothing, so it computes the prompt).
    assert http("POST", decode.url + path, {**body, "kv_transfer_params": _kv_params("127.0.0.1")})[0] == 200


def test_a_prompt_too_large_for_the_decode_replica_falls_back_to_one_that_holds_it_or_ends_in_a_400():
    """Mixed KV sizes: the decode replica's whole cache (8 blocks) cannot hold a 300-token prompt.
    It refuses with a definite code; the balancer serves the request on the prefill replica, which
    can, without counting it against the decode replica; a prompt no replica can hold ends in one
    clear 400."""
    started = [procs.start(REPLICA_ARGS + ["--role", "prefill", "--num-blocks", "40"], env=HOOKS),
               procs.start(REPLICA_ARGS + ["--role", "decode", "--num-blocks", "8"], env=HOOKS)]
    prefill, decode = started
    try:
        path, body = _body("completion", "[large] " + PROMPT * 5, False)  # ~340 tokens
        status, _, raw = http("POST", decode.url + path, body)
        assert status == 400 and json.loads(raw)["error"]["code"] == "kv_cache_capacity_exceeded", raw
        ref_ids, ref_text = _reference(prefill.url, path, body)
        huge_path, huge = _body("completion", "[huge] " + PROMPT * 11, False)  # ~730 tokens: 46 blocks

        async def main():
            async with balancer([p.replica_arg for p in started]) as (url, b):
                await _roles_known(b, started)
                async with aiohttp.ClientSession() as s, s.post(url + "/admin/explain", json=body) as r:
                    explained = await r.json()  # the pair the routing transaction would book
                assert explained["pair"]["prefill"] == prefill.url and explained["decision"] == decode.url
                assert "prefill on" in explained["reason"] and set(explained["pair"]["prefill_scores"]) == {prefill.url}
                assert await _ask(url, path, body) == (ref_ids, ref_text, prefill.url)
                assert _count(b, "fallback_decode") == 1 and _count(b, "disaggregated") == 0
                assert b.registry.get(decode.url).consecutive_failures == 0  # it answered: not a failure
                async with aiohttp.ClientSession() as s, s.post(url + huge_path, json=huge) as r:
                    assert r.status == 400
                    err = (await r.json())["error"]
                assert err["code"] == "kv_cache_capacity_exceeded" and "no replica can hold" in err["message"]
                assert sum(r.inflight_requests for r in b.registry) == 0

        asyncio.run(main())
    finally:
        for p in started:
            p.stop()


def test_the_hand_over_skips_what_the_decode_replica_holds_in_its_host_tier(pair):
    """The decode replica's lookup is its KV cache manager's (device pool, then the host tier):
    a prompt whose prefix was evicted into its host memory is loaded from there, and only the
    rest is pulled from the prefill replica."""
    prefill, _ = pair
    decode = procs.start(REPLICA_ARGS + ["--role", "decode", "--num-blocks", "24", "--kv-offload-host-blocks", "256"],
                         env=HOOKS)
    try:
        head = "[host tier] " + PROMPT * 3  # ~200 tokens: 12 full blocks
        path, body = _body("completion", head + "and a new question at the end of it?", False)
        ref_ids, ref_text = _reference(prefill.url, path, body)
        assert http("POST", decode.url + path, {**body, "prompt": head, "max_tokens": 1})[0] == 200
        for i in range(3):  # other prompts push the head's blocks out of the 24-block pool, into host memory
            assert http("POST", decode.url + path, {**body, "prompt": f"[filler {i}] " + PROMPT * 4,
                                                    "max_tokens": 1})[0] == 200
        pulled = _metric(decode.url, "vllm:nixl_bytes_transferred_sum")

        async def main():
            async with balancer([prefill.replica_arg, decode.replica_arg]) as (url, b):
                await _roles_known(b, [prefill, decode])
                assert await _ask(url, path, body) == (ref_ids, ref_text, decode.url)

        asyncio.run(main())
        moved = _metric(decode.url, "vllm:nixl_bytes_transferred_sum") - pulled
        assert 0 < moved <= 3 * 65536  # the blocks after the head's 12, not the whole prompt
    finally:
        decode.stop()


def test_a_client_that_leaves_a_pairs_stream_mid_way_aborts_it_on_both_replicas(pair, caplog):
    """The client reads the first event of a split request's stream and hangs up: the balancer
    closes the decode leg (the decode replica aborts the request and frees its blocks), counts
    nothing against either replica and logs no error."""
    prefill, decode = pair
    path, body = _body("completion", "[drop] " + PROMPT * 2, True)
    body = {**body, "max_tokens": 1500}

    def idle(p: procs.Proc) -> bool:
        lo = json.loads(http("GET", p.url + "/load")[2])
        return lo["num_running"] == lo["num_waiting"] == 0

    generated = _metric(decode.url, "vllm:generation_tokens_total")

    async def main():
        async with balancer([p.replica_arg for p in pair]) as (url, b):
            await _roles_known(b, pair)
            async with aiohttp.ClientSession() as s:
                r = await s.post(url + path, json=body)
                assert r.status == 200 and r.headers["X-Kvfleet-Replica"] == decode.url
                await r.content.readuntil(b"\n\n")  # the first event
                r.close()
            await wait_for(lambda: idle(decode) and idle(prefill))
            assert _metric(decode.url, "vllm:generation_tokens_total") - generated < body["max_tokens"]  # cut short
            assert all(b.registry.get(p.url).consecutive_failures == 0 for p in pair)

    with caplog.at_level("INFO"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]
    assert any("status=499" in r.getMessage() for r in caplog.records if r.name == "kvfleet.balancer.access")
