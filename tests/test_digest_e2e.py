"""Compact cache digests end to end (issue #17 part 2): real replica subprocesses publish digests
of their prefix caches, a balancer with `index_source = "digests"` follows no KV-event stream and
routes a repeated prefix to the replica that holds it, from the digests alone."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from harness import procs
from harness.fleet import REPLICA_ARGS, balancer, http

pytestmark = pytest.mark.slow

HELD_BEFORE = "A system prompt that one replica cached before the balancer started. " * 12  # ~800 tokens
LEARNED = "Another long prompt, first sent through the balancer, then repeated. " * 12


async def _complete(s: aiohttp.ClientSession, url: str, prompt: str) -> str:
    async with s.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1,
                                                     "temperature": 0}) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Kvfleet-Replica"]


async def _until(cond, timeout: float = 60.0) -> None:  # an upper bound for a loaded machine
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _sample(metrics: str, name: str, replica: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and f'replica="{replica}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {replica}")


DIGEST_EVERY = ["--kv-digest-interval", "0.5"]


@contextlib.contextmanager
def _two_replicas(args: list[str]):
    """Two replica subprocesses started with `args`; the second has cached HELD_BEFORE before
    any balancer exists (sent to it directly): yields (replicas, that holder)."""
    reps = procs.start_all([args] * 2)
    try:
        holder = reps[1]
        status, _, body = http("POST", holder.url + "/v1/completions",
                               {"model": "tiny", "prompt": HELD_BEFORE, "max_tokens": 1, "temperature": 0})
        assert status == 200, body
        yield reps, holder
    finally:
        for r in reps:
            r.stop()


def test_balancer_in_digest_mode_routes_a_repeated_prefix_to_its_holder():
    with _two_replicas(REPLICA_ARGS + DIGEST_EVERY) as (reps, holder):  # a late balancer must learn it
        async def main():
            async with balancer([r.replica_arg for r in reps], policy="precise_prefix",
                                index_source="digests") as (url, b):
                assert b.subscribers == {} and set(b.digest_feeds) == {r.url for r in reps}
                await _until(lambda: all(b.digests.fresh(r.url) for r in reps))
                async with aiohttp.ClientSession() as s:
                    late = [await _complete(s, url, HELD_BEFORE) for _ in range(3)]
                    first = await _complete(s, url, LEARNED)
                    seen = b.digests.stats.received
                    for _ in range(600):  # until a periodic digest of `first` holds the prompt's blocks
                        async with s.post(url + "/admin/explain", json={"model": "tiny", "prompt": LEARNED}) as r:
                            explain = await r.json()
                        if explain["matched_blocks"].get(first, 0) >= 40:
                            break
                        await asyncio.sleep(0.1)
                    assert explain["matched_blocks"].get(first, 0) >= 40, (explain, b.digests.stats)
                    assert b.digests.stats.received > seen  # periodic ones, unasked
                    repeated = [await _complete(s, url, LEARNED) for _ in range(4)]
                    async with s.get(url + "/admin/replicas") as r:
                        listed = {x["id"]: x["digest"] for x in (await r.json())["replicas"]}
                    assert listed[first]["in_use"] and listed[first]["blocks"] >= 40, listed
                    assert listed[first]["filter"] == "binary_fuse8" and listed[first]["bytes"] > 40
                    await asyncio.sleep(1.2)  # the stats export runs every second
                    async with s.get(url + "/metrics") as r:
                        metrics = await r.text()
                return late, first, repeated, explain, metrics

        late, first, repeated, explain, metrics = asyncio.run(main())
    assert late == [holder.url] * 3
    assert repeated == [first] * 4
    assert explain["decision"] == first, explain
    # ~800 tokens: 50 full blocks, of which the replica cached all but the last one it computed
    assert explain["matched_blocks"][first] >= 40, explain
    for r in reps:
        assert _sample(metrics, "kvfleet_digest_received_total", r.url) >= 2
        assert _sample(metrics, "kvfleet_digest_in_use", r.url) == 1
        assert 0 <= _sample(metrics, "kvfleet_digest_age_seconds", r.url) < 30
    assert _sample(metrics, "kvfleet_digest_size_bytes", first) > 100
    assert _sample(metrics, "kvfleet_digest_blocks", first) >= 40


def test_with_both_a_late_balancer_routes_from_digests_until_its_event_index_is_exact():
    """Replicas without a replay socket: a balancer that joins late cannot snapshot their caches,
    so its event index never holds what they cached before it joined (not exact). With
    `index_source = "both"` it routes those replicas from their periodic digests, which do."""
    with _two_replicas(REPLICA_ARGS[: REPLICA_ARGS.index("--kv-events-replay-endpoint")] + DIGEST_EVERY) \
            as (reps, holder):
        assert holder.replay is None

        async def main():
            async with balancer([r.replica_arg for r in reps], policy="precise_prefix",
                                index_source="both") as (url, b):
                assert set(b.subscribers) == set(b.digest_feeds) == {r.url for r in reps}
                await _until(lambda: all(b.digests.fresh(r.url) for r in reps))
                exact = {rid: s.exact for rid, s in b.subscribers.items()}
                in_use = {r.url: b.uses_digest(r.url) for r in reps}
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/admin/explain", json={"model": "tiny", "prompt": HELD_BEFORE}) as r:
                        explain = await r.json()
                    routed = [await _complete(s, url, HELD_BEFORE) for _ in range(3)]
                return exact, in_use, explain, routed, b.index.num_blocks(holder.url)

        exact, in_use, explain, routed, indexed = asyncio.run(main())
    assert exact == {r.url: False for r in reps} and in_use == {r.url: True for r in reps}
    assert indexed == 0  # the events said nothing of the blocks cached before the balancer joined
    assert explain["matched_blocks"].get(holder.url, 0) >= 40, explain
    assert routed == [holder.url] * 3


def test_with_both_the_event_index_takes_over_once_it_is_exact():
    """Replicas with a replay socket: the late balancer's event index becomes exact from their
    snapshots, and from then on routing reads it, not the digests it still receives."""
    with _two_replicas(REPLICA_ARGS + DIGEST_EVERY) as (reps, holder):
        async def main():
            async with balancer([r.replica_arg for r in reps], policy="precise_prefix",
                                index_source="both") as (url, b):
                await _until(lambda: all(s.exact for s in b.subscribers.values())
                             and all(b.digests.fresh(r.url) for r in reps))
                async with aiohttp.ClientSession() as s:
                    routed = [await _complete(s, url, HELD_BEFORE) for _ in range(2)]
                    async with s.get(url + "/admin/replicas") as r:
                        listed = {x["id"]: x["digest"] for x in (await r.json())["replicas"]}
                return routed, listed, {r.url: b.uses_digest(r.url) for r in reps}, b.index.num_blocks(holder.url)

        routed, listed, uses, indexed = asyncio.run(main())
    assert uses == {r.url: False for r in reps}
    assert all(d is not None and not d["in_use"] and d["blocks"] is not None for d in listed.values()), listed
    assert indexed >= 40 and routed == [holder.url] * 2
