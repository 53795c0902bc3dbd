"""Several real `kvfleet balancer` subprocesses in front of the same `--engine sim` replica
subprocesses, and how often they agree (issue #18 part 3): the live half of
bench/bench_multi_balancer.py, and tests/test_multi_balancer_e2e.py.

Agreement is read through the side-effect-free decision path: `POST /admin/explain` with the
request's body on an instance answers the replica that instance would pick now, booking nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from harness import procs

MODEL = "tiny"


def sim_replica_args(blocks: int, time_scale: float, max_model_len: int) -> list[str]:
    """A simulated Llama-3-8B/H100 replica publishing KV events and load reports."""
    return ["replica", "--engine", "sim", "--preset", "llama3-8b-h100", "--model", MODEL, "--port", "0",
            "--num-blocks", str(blocks), "--time-scale", str(time_scale), "--max-model-len", str(max_model_len),
            "--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]


@contextlib.contextmanager
def fleet(replicas: int, balancers: int, policy: str, consistent: bool, blocks: int = 2048,
          time_scale: float = 1.0, max_model_len: int = 8192, arrival_reports: bool = False):
    """`replicas` sim replicas and `balancers` balancer instances in front of all of them, each
    subscribed to every replica's KV events and load reports and knowing nothing of the others
    (`consistent`: --consistent-routing; `arrival_reports`: the replicas' --load-report-on-arrival);
    yields (replica procs, balancer procs) and stops them all."""
    started: list[procs.Proc] = []
    try:
        reps = []
        for _ in range(replicas):
            reps.append(procs.start(sim_replica_args(blocks, time_scale, max_model_len)
                                    + (["--load-report-on-arrival"] if arrival_reports else [])))
            started.append(reps[-1])
        flags = [a for r in reps for a in ("--replica", r.replica_arg)]
        bals = []
        for _ in range(balancers):
            bals.append(procs.start(["balancer", "--port", "0", "--model", MODEL, "--policy", policy, *flags,
                                     *(["--consistent-routing"] if consistent else [])]))
            started.append(bals[-1])
        yield reps, bals
    finally:
        for p in reversed(started):
            p.stop()


async def explain(session: aiohttp.ClientSession, base: str, body: dict) -> str | None:
    """The replica the instance at `base` would pick for `body` now (None: none usable)."""
    async with session.post(base + "/admin/explain", json=body) as r:
        r.raise_for_status()
        return (await r.json())["decision"]


async def send(session: aiohttp.ClientSession, base: str, body: dict) -> tuple[str | None, float | None]:
    """Send `body` (streamed) through the instance at `base`: (the replica that served it, TTFT s)."""
    t0 = time.perf_counter()
    ttft = None
    async with session.post(base + "/v1/completions", json={**body, "stream": True}) as r:
        replica = r.headers.get("X-Kvfleet-Replica")
        async for line in r.content:
            if ttft is None and line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                ttft = time.perf_counter() - t0
        return (replica if r.status == 200 else None), ttft


async def wait_settled(session: aiohttp.ClientSession, bases: Sequence[str], replicas: int,
                       timeout: float = 60.0) -> None:
    """Until every instance has a load report from every replica and follows its events."""
    deadline = time.monotonic() + timeout
    while True:
        ok = True
        for base in bases:
            async with session.get(base + "/admin/replicas") as r:
                rows = (await r.json())["replicas"]
            ok &= len(rows) == replicas and all(row["load_age_s"] is not None and row["events_in_sync"]
                                                 for row in rows)
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the balancers did not get every replica's load reports and events")
        await asyncio.sleep(0.1)


def prompts(n: int, seed: int = 0, prefixes: int = 6, shared: float = 0.5) -> list[str]:
    """`n` prompts (byte tokens): a `shared` share of them start with one of `prefixes` long
    common prefixes (routed by cache), the rest are cold (routed by load)."""
    rng = random.Random(seed)
    heads = ["".join(rng.choice("abcdefghij ") for _ in range(rng.choice((800, 1600, 3200)))) for _ in range(prefixes)]
    out = []
    for i in range(n):
        tail = f"{i} " + "".join(rng.choice("klmnopqrst ") for _ in range(rng.randrange(100, 600)))
        out.append((rng.choice(heads) if rng.random() < shared else "") + tail)
    return out


@dataclass
class Outcome:
    sent: int = 0
    served: int = 0
    compared: int = 0
    agreed: int = 0
    ttfts: list[float] | None = None

    @property
    def agreement(self) -> float:
        return self.agreed / self.compared if self.compared else 1.0


async def replay(bases: Sequence[str], texts: Sequence[str], rate: float, max_tokens: int, seed: int = 0) -> Outcome:
    """Request i goes to instance i mod N at Poisson arrivals of `rate`/s; at the same moment
    every other instance is asked through /admin/explain where it would send it. Agreed: every
    other instance named the replica that served it."""
    rng = random.Random(seed)
    out = Outcome(ttfts=[])
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(i: int, text: str) -> None:
            body = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "ignore_eos": True}
            mine, others = bases[i % len(bases)], [b for j, b in enumerate(bases) if j != i % len(bases)]
            (served, ttft), *named = await asyncio.gather(send(session, mine, body),
                                                          *(explain(session, b, body) for b in others))
            out.served += served is not None
            if served is not None:
                out.compared += 1
                out.agreed += all(n == served for n in named)
                if ttft is not None:
                    out.ttfts.append(ttft)

        tasks = []
        for i, text in enumerate(texts):
            tasks.append(asyncio.create_task(one(i, text)))
            out.sent += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return out


async def agreement_at_steady_load(bases: Sequence[str], replicas: int, background: int, probes: int,
                                   background_tokens: int = 1500) -> Outcome:
    """The instances' agreement when they hold the same load reports: `background` long
    requests sent through the first instance (it then has requests of its own in flight, the
    others none), every instance waits for reports that show them running, then `probes` cold
    prompts are explained on every instance at once (nothing sent). Agreed: all named the same
    replica."""
    texts = prompts(background + probes, seed=7, shared=0.0)
    out = Outcome()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await wait_settled(session, bases, replicas)
        long = [asyncio.create_task(send(session, bases[0],
                                         {"model": MODEL, "prompt": texts[i], "max_tokens": background_tokens,
                                          "ignore_eos": True}))
                for i in range(background)]
        try:
            deadline = time.monotonic() + 60
            while True:  # every instance's reports show every background request running
                running = []
                for base in bases:
                    async with session.get(base + "/admin/replicas") as r:
                        running.append(sum(row["load"]["num_running"] for row in (await r.json())["replicas"]))
                if all(n == background for n in running):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the background requests are not all running: {running}")
                await asyncio.sleep(0.1)
            for text in texts[background:]:
                body = {"model": MODEL, "prompt": text, "max_tokens": 64}
                named = await asyncio.gather(*(explain(session, b, body) for b in bases))
                out.compared += 1
                out.agreed += len(set(named)) == 1
        finally:
            for t in long:
                t.cancel()
            await asyncio.gather(*long, return_exceptions=True)
    return out
