"""Sticky sessions through the real balancer in front of `--engine sim` replica subprocesses (KV
events and load reports over ZMQ, HTTP in between).

The policy is round_robin, which sends consecutive requests to different replicas: whatever
keeps a conversation together is the session logic. One conversation grows turn by turn (each
prompt carries the previous one), as a chat client's does.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from balancer.sessions import SessionConfig
from harness import fleet, procs

pytestmark = pytest.mark.slow

MODEL = "sim"
REPLICA = ["replica", "--engine", "sim", "--preset", "llama3-8b-h100", "--port", "0", "--served-model-name", MODEL,
           "--num-blocks", "2000", "--kv-events-endpoint", "tcp://127.0.0.1:0",
           "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
SYSTEM = "System: you are a careful assistant who answers in one short paragraph. " * 3


class Conversation:
    """One chat, as completions prompts: each turn appends a question to the last prompt."""

    def __init__(self, key: str) -> None:
        self.key, self.prompt, self.turn = key, SYSTEM, 0

    async def send(self, s: aiohttp.ClientSession, base: str) -> str:
        """The next turn through the balancer at `base`; the replica that served it."""
        self.turn += 1
        self.prompt += f"User: question {self.turn}? Assistant: answer {self.turn}. "
        async with s.post(base + "/v1/completions", headers={"X-Session-Id": self.key},
                          json={"model": MODEL, "prompt": self.prompt, "max_tokens": 2}) as r:
            body = await r.json()
            assert r.status == 200, body
            return r.headers["X-Kvfleet-Replica"]


async def settle(b, timeout: float = 20.0) -> None:
    """Until the balancer's view is idle: events applied, nothing in flight, fresh reports."""
    loop = asyncio.get_running_loop()
    deadline, after = loop.time() + timeout, loop.time()
    while True:
        states = [r for r in b.registry if r.healthy]
        if all(r.load_at > after and r.inflight_requests == 0 and r.load.num_running == 0 for r in states) \
                and all(sub.in_sync for sub in b.subscribers.values()):
            return
        assert loop.time() < deadline, "the balancer's view did not settle"
        await asyncio.sleep(0.05)


async def metric(s: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


@pytest.fixture
def replicas():
    started = procs.start_all([REPLICA] * 3)
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def test_a_session_stays_moves_when_overloaded_or_killed_and_is_released(replicas):
    asyncio.run(_stays_moves_released(replicas))


async def _stays_moves_released(reps):
    cfg = SessionConfig(enabled=True)
    async with fleet.balancer([r.replica_arg for r in reps], model=MODEL, policy="round_robin",
                              sessions=cfg) as (base, b), aiohttp.ClientSession() as s:
        await settle(b)
        chat = Conversation("conv-1")
        home = await chat.send(s, base)
        assert [await chat.send(s, base) for _ in range(3)] == [home] * 3
        # without a key the policy rotates
        unkeyed = set()
        for i in range(3):
            async with s.post(base + "/v1/completions", json={"model": MODEL, "prompt": f"x{i}", "max_tokens": 1}) as r:
                unkeyed.add(r.headers["X-Kvfleet-Replica"])
        assert len(unkeyed) == 3

        # Overload the home: six long streams sent to it directly (not through the balancer),
        # seen in its load reports; the next turn goes elsewhere and is remembered there.
        streams = [asyncio.create_task(_long_stream(s, home)) for _ in range(6)]
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while b.registry.get(home).load.num_running + b.registry.get(home).load.num_waiting < 6:
                assert asyncio.get_running_loop().time() < deadline, "the home's load report never showed 6"
                await asyncio.sleep(0.05)
            moved = await chat.send(s, base)
            assert moved != home
            assert await metric(s, base, "kvfleet_session_routed_total", outcome="moved_overloaded") == 1
        finally:
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        await settle(b)
        assert [await chat.send(s, base) for _ in range(2)] == [moved] * 2
        async with s.get(base + "/admin/sessions", params={"key": "conv-1"}) as r:
            assert (await r.json())["replica"] == moved

        # Kill the new home: the next turn moves again (moved_gone) and stays there.
        victim = next(p for p in reps if p.url == moved)
        victim.popen.kill()
        victim.popen.wait()
        third = await chat.send(s, base)
        assert third not in (moved,)
        assert await chat.send(s, base) == third
        assert await metric(s, base, "kvfleet_session_routed_total", outcome="moved_gone") == 1
        assert await metric(s, base, "kvfleet_sessions_active") == 1

        # Release: forgotten; the next turn is a new session (it finds its blocks again by the events).
        new_before = await metric(s, base, "kvfleet_session_routed_total", outcome="new")
        async with s.delete(base + "/admin/sessions", params={"key": "conv-1"}) as r:
            assert r.status == 200 and (await r.json()) == {"released": "conv-1", "replica": third}
        async with s.get(base + "/admin/sessions", params={"key": "conv-1"}) as r:
            assert r.status == 404 and "GET /admin/sessions" in (await r.json())["error"]["message"]
        async with s.delete(base + "/admin/sessions", params={"key": "conv-1"}) as r:
            assert r.status == 404
        async with s.delete(base + "/admin/sessions") as r:
            assert r.status == 400 and "?key=" in (await r.json())["error"]["message"]
        assert await metric(s, base, "kvfleet_sessions_ended_total", reason="released") == 1
        assert await chat.send(s, base) == third
        assert await metric(s, base, "kvfleet_session_routed_total", outcome="new") == new_before + 1
        async with s.get(base + "/admin/sessions") as r:
            listing = await r.json()
        assert listing["active"] == 1 and listing["sessions"][0]["key"] == "conv-1"
        for bad, says in (("0", "at least 1"), ("ten", "whole number of sessions")):  # admin.py's _limit
            async with s.get(base + "/admin/sessions", params={"limit": bad}) as r:
                assert r.status == 400 and says in (await r.json())["error"]["message"]

        # The last turn can end the session itself (X-Session-Release: true); a bad value is a 400.
        body = {"model": MODEL, "prompt": chat.prompt + "User: bye.", "max_tokens": 1}
        async with s.post(base + "/v1/completions", json=body,
                          headers={"X-Session-Id": "conv-1", "X-Session-Release": "maybe"}) as r:
            assert r.status == 400 and "true or false" in (await r.json())["error"]["message"]
        async with s.post(base + "/v1/completions", json=body,
                          headers={"X-Session-Id": "conv-1", "X-Session-Release": "true"}) as r:
            assert r.status == 200 and r.headers["X-Kvfleet-Replica"] == third
        assert await metric(s, base, "kvfleet_sessions_ended_total", reason="released") == 2
        assert await metric(s, base, "kvfleet_sessions_active") == 0


async def _long_stream(s: aiohttp.ClientSession, url: str) -> None:
    body = {"model": MODEL, "prompt": "a long story " * 20, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    async with s.post(url + "/v1/completions", json=body) as r:
        async for _ in r.content:
            pass


def test_two_balancers_fed_by_the_same_events_route_a_session_to_the_same_replica(replicas):
    """Two balancer processes, no coordination: the turns of one conversation alternate between
    them and every turn lands on one replica; when it is killed, both move the session to the
    same new replica (the first to move finds it by its policy, the other by the KV events)."""
    args = ["balancer", "--port", "0", "--model", MODEL, "--policy", "round_robin", "--sessions"]
    for r in replicas:
        args += ["--replica", r.replica_arg]
    balancers = [procs.start(args), procs.start(args)]
    try:
        asyncio.run(_two_balancers(replicas, [p.url for p in balancers]))
    finally:
        for p in balancers:
            p.stop()


async def _two_balancers(reps, bases: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for base in bases:
            await _wait_in_sync(s, base, len(reps))
        chat = Conversation("shared-conv")
        served = [await _turn(s, chat, bases[i % 2]) for i in range(6)]
        assert len(set(served)) == 1, served
        # the second balancer never saw the first turn: it found the home by the events
        assert await metric(s, bases[1], "kvfleet_session_routed_total", outcome="new") == 1
        home = served[0]
        victim = next(p for p in reps if p.url == home)
        victim.popen.kill()
        victim.popen.wait()
        after = [await _turn(s, chat, bases[i % 2]) for i in range(6)]
        assert len(set(after)) == 1 and after[0] != home, after
        outcomes = []
        for base in bases:
            async with s.get(base + "/admin/sessions") as r:
                outcomes.append((await r.json())["routed"])
        # The first balancer found its home gone; the second either did too, or (its health
        # checks not yet failed) saw the first's new home hold more of the conversation: followed,
        # or judged the dead home overloaded: its last report, made before it died, can hold the
        # last turn still queued or running (a report counts what its inbox holds), which the
        # second balancer did not send. Either way it moved the session once, to the same home.
        assert outcomes[0]["moved_gone"] == 1, outcomes
        moved = outcomes[1]["moved_gone"] + outcomes[1]["followed"] + outcomes[1]["moved_overloaded"]
        assert moved == 1, outcomes


async def _turn(s: aiohttp.ClientSession, chat: Conversation, base: str, timeout: float = 20.0) -> str:
    """The conversation's next turn through `base`, once that balancer's index holds the last
    turn's prompt somewhere (its KV events arrived: a user reads the answer before replying)."""
    if chat.turn:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            async with s.post(base + "/admin/explain", json={"model": MODEL, "prompt": chat.prompt}) as r:
                out = await r.json()
            if max(out["matched_blocks"].values(), default=0) == out["full_blocks"]:
                break
            assert loop.time() < deadline, f"{base} never indexed the last turn: {out}"
            await asyncio.sleep(0.02)
    return await chat.send(s, base)


async def _wait_in_sync(s: aiohttp.ClientSession, base: str, n: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with s.get(base + "/admin/replicas") as r:
            reps = (await r.json())["replicas"]
        if len(reps) == n and all(x["events_in_sync"] and x["healthy"] and x["load_age_s"] is not None for x in reps):
            return
        assert loop.time() < deadline, json.dumps(reps)[:2000]
        await asyncio.sleep(0.1)
