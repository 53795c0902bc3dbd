"""Decision accounting (issue #17 item 1): the balancer compares the cached prefix it predicted
on the chosen replica with what the replica delivered, and raises the alarm when they disagree.
Real replica subprocesses; the mismatch is made real by a replica with prefix caching off that
publishes no events, so the balancer's approximate index believes it holds what it was sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import pytest

from harness.fleet import balancer, start_replicas

pytestmark = pytest.mark.slow

PROMPT = "A long system prompt that the second request repeats word for word. " * 12  # ~800 tokens


async def _twice_then_decisions(url: str) -> tuple[dict, str]:
    async with aiohttp.ClientSession() as s:
        ids = []
        for i in range(2):
            async with s.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2,
                                                             "temperature": 0},
                              headers={"X-Request-Id": f"audit-{i}"}) as r:
                assert r.status == 200, await r.text()
                ids.append(r.headers["X-Request-Id"])
        for _ in range(100):  # audited once the response is out (one loop turn later)
            async with s.get(url + "/admin/decisions?limit=5") as r:
                body = await r.json()
            if len(body["decisions"]) == 2:
                break
            await asyncio.sleep(0.02)
        async with s.get(url + "/metrics") as r:
            metrics = await r.text()
        async with s.get(url + "/admin/decisions?limit=zero") as r:
            assert r.status == 400 and "limit" in (await r.json())["error"]["message"]
    return body, metrics


def _run(extra_flags: list[str], with_events: bool, caplog=None):
    """Start one replica with `extra_flags`, put a balancer (precise_prefix) in front of it, send
    the prompt twice: (decisions, metrics text, the replica's URL, audit warnings)."""
    (rep,) = start_replicas(1, extra_flags)
    try:
        async def main():
            async with balancer([rep.replica_arg if with_events else rep.url], policy="precise_prefix") as (url, b):
                return await _twice_then_decisions(url)
        with caplog.at_level(logging.WARNING, logger="kvfleet.balancer.audit") if caplog else contextlib.nullcontext():
            body, metrics = asyncio.run(main())
    finally:
        rep.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "kvfleet.balancer.audit"] if caplog else []
    return body["decisions"], metrics, rep.url, warnings


def _sample(metrics: str, name: str, replica: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and f'replica="{replica}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {replica}")


def test_delivered_cached_tokens_match_the_prediction_on_a_well_configured_replica():
    (newest, first), metrics, url, _ = _run([], with_events=True)
    assert (newest["request_id"], first["request_id"]) == ("audit-1", "audit-0")
    assert first["predicted_cached_tokens"] == 0 and newest["predicted_cached_tokens"] >= 512
    assert newest["delivered_cached_tokens"] >= newest["predicted_cached_tokens"] - 16
    assert newest["best_offered"] == {"replica": url, "cached_tokens": newest["predicted_cached_tokens"]}
    assert not newest["mismatch"] and newest["reason"] and url in newest["scores"]
    assert _sample(metrics, "kvfleet_cache_mismatch_total", url) == 0
    assert _sample(metrics, "kvfleet_cache_unseen_total", url) == 0
    assert _sample(metrics, "kvfleet_cache_accounted_requests_total", url) == 2
    assert _sample(metrics, "kvfleet_request_delivered_cached_tokens_count", url) == 2


def test_index_says_hit_engine_says_miss_raises_the_alarm(caplog):
    # No event stream given: the approximate index records what was sent there.
    decisions, metrics, url, warnings = _run(["--no-prefix-caching"], with_events=False, caplog=caplog)
    newest = decisions[0]
    assert newest["predicted_cached_tokens"] >= 512 and newest["delivered_cached_tokens"] == 0
    assert newest["mismatch"] is True
    assert _sample(metrics, "kvfleet_cache_mismatch_total", url) == 1
    (warning,) = warnings
    assert "audit-1" in warning and url in warning and "--block-size" in warning


def test_a_replica_with_another_block_size_is_caught_as_unseen(caplog):
    """Its KV events carry 32-token blocks, which the balancer's 16-token index skips: the index
    never predicts a hit there while the engine delivers one."""
    decisions, metrics, url, warnings = _run(["--block-size", "32"], with_events=True, caplog=caplog)
    newest = decisions[0]
    assert newest["predicted_cached_tokens"] == 0 and newest["delivered_cached_tokens"] >= 512
    assert _sample(metrics, "kvfleet_cache_unseen_total", url) == 1
    assert _sample(metrics, "kvfleet_cache_mismatch_total", url) == 0
    (warning,) = warnings
    assert "audit-1" in warning and "does not see" in warning
