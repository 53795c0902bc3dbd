"""The load client, run in its own process pinned to the load core (measure.run_client starts it):

    python -m bench.balancer.loadclient SPEC_JSON     # prints one JSON line of results

SPEC: {"mode": "latency" | "closed" | "sse", "url": ..., "body": ..., "headers": {...}, ...}:
latency sends at a fixed rate whatever comes back (open loop) and times each request from its
send to the end of its body; closed keeps `concurrency` requests in flight; sse runs `streams`
concurrent streams and counts the events relayed (each stream must end with [DONE]).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def pct(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


async def _client_latency(url: str, body: bytes, headers: dict, rate: float, duration: float, warmup: float) -> dict:
    import aiohttp

    n_warm, n = int(rate * warmup), int(rate * (warmup + duration))
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def one(i: int) -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if not ok:
                errors += 1
            elif i >= n_warm:
                lat.append(time.perf_counter() - t)

        tasks = []
        t0 = time.perf_counter() + 0.01
        for i in range(n):  # open loop: request i is due at t0 + i / rate, whatever came back
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        sent_rate = (n - 1) / (time.perf_counter() - t0) if n > 1 else 0.0
    lat.sort()
    if not lat:
        return {"errors": errors, "n": 0}
    return {"n": len(lat), "errors": errors, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "mean_ms": sum(lat) / len(lat) * 1e3, "rate": rate, "achieved_rate": sent_rate}


async def _client_closed(url: str, body: bytes, headers: dict, concurrency: int, duration: float,
                         max_requests: int) -> dict:
    import aiohttp

    done = errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline and done + errors < max_requests:
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        await r.read()
                        if r.status == 200:
                            done += 1
                        else:
                            errors += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"rps": done / elapsed, "errors": errors, "n": done}


async def _client_sse(url: str, body: bytes, headers: dict, streams: int, chunks: int, duration: float,
                      max_streams: int) -> dict:
    import aiohttp

    events = completed = bad = 0
    per_stream: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal events, completed, bad
            while time.perf_counter() < deadline and completed + bad < max_streams:
                t = time.perf_counter()
                n, last, tail = 0, b"", b""
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        async for data in r.content.iter_any():
                            # events end with a blank line; one may straddle two reads
                            n += (last + data).count(b"\n\n")
                            last = data[-1:]
                            tail = (tail + data)[-64:]
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                events += n
                if ok and n == chunks + 1 and tail.rstrip().endswith(b"data: [DONE]"):
                    completed += 1
                    per_stream.append(time.perf_counter() - t)
                else:
                    bad += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        elapsed = time.perf_counter() - t0
    per_stream.sort()
    return {"chunks_per_s": events / elapsed, "streams": completed, "bad_streams": bad, "events": events,
            "stream_p50_ms": pct(per_stream, 0.5) * 1e3 if per_stream else None}


def client_main(spec: dict) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = spec["body"].encode()
    headers = {"Content-Type": "application/json", **spec.get("headers", {})}
    if spec["mode"] == "latency":
        out = asyncio.run(_client_latency(spec["url"], body, headers, spec["rate"], spec["duration"], spec["warmup"]))
    elif spec["mode"] == "closed":
        out = asyncio.run(_client_closed(spec["url"], body, headers, spec["concurrency"], spec["duration"],
                                         spec["max_requests"]))
    else:
        out = asyncio.run(_client_sse(spec["url"], body, headers, spec["streams"], spec["chunks"], spec["duration"],
                                      spec["max_streams"]))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    client_main(json.loads(sys.argv[1]))
