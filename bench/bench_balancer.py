"""Balancer overhead benchmark (issue: balancer, benchmark section).

Goals: added latency p50 <= 0.5 ms and p99 <= 2 ms at 500 req/s; >= 2,000 non-streaming req/s on
one core; >= 50,000 relayed SSE chunks/s; a routing decision (tokenize, hash, look up, score 16
replicas) <= 200 us p50 for an 8k-token prompt.

Every proxy sits in front of the same fake backend (bench/fake_backend.py: a raw asyncio
protocol that answers at once, or streams N SSE events). Side by side in one run:

    direct              the client talks to the backend
    kvfleet <policy>    `python -m kvfleet.cli balancer` (precise_prefix, round_robin); the
                        generation routes on its lean front-end (balancer/front.py)
    kvfleet ..., aiohttp front   the same with `--no-fast-path`: aiohttp serves every route
    aiohttp bare relay  reference: an aiohttp server + ClientSession passing bytes through, no
                        parsing or routing: the floor for any proxy built on aiohttp
    nginx               Debian's nginx, worker_processes 1, upstream keepalive, proxy_buffering off
    sglang-router       PyPI `sglang-router` (Rust), in its own venv, --policy round_robin

Cores: the proxy under test is pinned to core 0 (--proxy-core); the backend and the load
generator share core 1 (--load-core). "Direct" therefore has no proxy core: its rows are the rig's
own ceiling, and a proxy row near them is limited by the rig, not by the proxy.

1. Latency: an open-loop aiohttp client (own process) sends at a fixed rate (500 req/s) for a few
   seconds after a warm-up; latency is measured per request from its send to the end of its body.
   added = percentile(via proxy) - percentile(direct), for a short prompt and an 8k-token prompt,
   measured in --rounds rounds (direct, then every target) and given as the median over rounds of
   the difference within a round: this machine is a VM whose speed drifts from minute to minute.
2. Max throughput: `wrk -t1 -c64` with a POST body (aiohttp closed loop of 64 when wrk is absent);
   the proxy's CPU use during the run shows whether it was the bottleneck (100% = one core).
3. SSE relay: 4 concurrent streams of 1,000 events each, repeated for a few seconds: relayed
   events/s counted by the client (every stream is checked to end with [DONE]).
4. Upstream client (`--parts client`), in process: CPU per sequential small POST of the
   balancer's own client (balancer/upstream.py) and of aiohttp's ClientSession.
5. Routing decision, in process: Router.prepare (tokenize + hash) + routing_request (exact and
   approximate index look-up) + decide (registry.usable + policy over 16 replicas) for 8k-token
   prompts, against a PrefixIndex of 16 replicas holding ~1M blocks; each probe is cached fully on
   3 replicas and half on 3 more, so the look-up walks the whole chain.

    .venv/bin/python bench/bench_balancer.py [--duration 5] [--rate 500] [--nice -10 | --realtime] [--no-install]
    .venv/bin/python bench/bench_balancer.py --profile [--py-spy PATH]  # where the balancer's CPU goes

Every table has an "others on cores P/L" column: the share of the proxy's core (P) and of the
load core (L) that processes outside this benchmark took during that run (from /proc/stat, minus
the CPU of the proxy, backend and load generator). On a machine shared with other work it is not
0, and rows with high values are pessimistic. --nice -10 or --realtime (SCHED_RR, root) make the
benchmark's processes win most of that contention.

Missing tools are installed unless --no-install: `apt-get install wrk nginx` (as root) and
`pip install sglang-router` into a separate venv under ~/.cache/kvfleet-bench (never into the
project's venv). A tool that cannot be had gets "n/a (reason)" rows. Only 127.0.0.1 is contacted;
sglang-router is given HF_ENDPOINT=http://127.0.0.1:9 so its tokenizer fetch stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import report  # noqa: E402

MODEL = "tiny"
_READY = re.compile(r"listening on (http://\S+)")  # what kvfleet.procs.start waits for
SGLANG_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvfleet-bench" / "sglang-venv"
GOAL_ADDED_P50_MS = 0.5
GOAL_ADDED_P99_MS = 2.0
GOAL_RPS = 2000
GOAL_SSE = 50_000
GOAL_DECISION_US = 200


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase + "    ") for _ in range(n))


SHORT_PROMPT = "You are a helpful assistant. Summarise the following in one line: the quick brown fox."
LONG_PROMPT = _text(8191, 1)  # + BOS = 8,192 tokens with the balancer's byte tokenizer


def _body(prompt: str, stream: bool = False, max_tokens: int = 16) -> bytes:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------------- the client
# Runs in its own process (`--client SPEC`), pinned to the load core; prints one JSON line.

def _pct(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


async def _client_latency(url: str, body: bytes, rate: float, duration: float, warmup: float) -> dict:
    import aiohttp

    n_warm, n = int(rate * warmup), int(rate * (warmup + duration))
    lat: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
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
    return {"n": len(lat), "errors": errors, "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
            "mean_ms": sum(lat) / len(lat) * 1e3, "rate": rate, "achieved_rate": sent_rate}


async def _client_closed(url: str, body: bytes, concurrency: int, duration: float, max_requests: int) -> dict:
    import aiohttp

    done = errors = 0
    headers = {"Content-Type": "application/json"}
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


async def _client_sse(url: str, body: bytes, streams: int, chunks: int, duration: float, max_streams: int) -> dict:
    import aiohttp

    events = completed = bad = 0
    per_stream: list[float] = []
    headers = {"Content-Type": "application/json"}
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
            "stream_p50_ms": _pct(per_stream, 0.5) * 1e3 if per_stream else None}


def client_main(spec: dict) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = spec["body"].encode()
    if spec["mode"] == "latency":
        out = asyncio.run(_client_latency(spec["url"], body, spec["rate"], spec["duration"], spec["warmup"]))
    elif spec["mode"] == "closed":
        out = asyncio.run(_client_closed(spec["url"], body, spec["concurrency"], spec["duration"],
                                         spec["max_requests"]))
    else:
        out = asyncio.run(_client_sse(spec["url"], body, spec["streams"], spec["chunks"], spec["duration"],
                                      spec["max_streams"]))
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------- bare relay
# `--bare-relay URL`: the least an aiohttp proxy does (server + one ClientSession, body bytes passed
# through, SSE relayed as read): a floor for any proxy built on aiohttp, kvfleet's included.

async def _bare_relay(upstream: str) -> None:
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                    auto_decompress=False)
    ctype = {"Content-Type": "application/json"}

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(upstream + request.path, data=body, headers=ctype) as up:
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(), headers=ctype)
            out = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.router.add_post("/v1/completions", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"bare aiohttp relay listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


# ---------------------------------------------------------------------------------- upstream client cost

PARTS = ("latency", "throughput", "sse", "client", "routing")


def client_cost_rows(backend_url: str, core: int | None, n: int = 2000, rounds: int = 3) -> list[list]:
    """CPU and wall time per sequential non-streaming POST of the balancer's upstream client
    (balancer/upstream.py) and of an aiohttp ClientSession set up as the balancer set its own up
    before (keep-alive pool, no cookie jar, no decompression, connect and read timeouts)."""
    import aiohttp

    from balancer.upstream import UpstreamPool

    body = _body(SHORT_PROMPT)
    headers = {"Content-Type": "application/json", "X-Request-Id": "bench"}

    async def with_aiohttp(s: aiohttp.ClientSession) -> None:
        r = await s.post(backend_url + "/v1/completions", data=body, headers=headers)
        await r.read()
        r.release()

    async def with_upstream(pool: UpstreamPool) -> None:
        r = await pool.post(backend_url, "/v1/completions", body, headers)
        await r.read()
        r.release()

    async def run() -> dict[str, tuple[float, float]]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None, connect=2, sock_read=300))
        pool = UpstreamPool()
        best: dict[str, tuple[float, float]] = {}
        try:
            for _ in range(rounds):
                for name, one, client in (("aiohttp ClientSession", with_aiohttp, session),
                                          ("kvfleet upstream (httptools)", with_upstream, pool)):
                    for _ in range(50):
                        await one(client)
                    c, t = time.process_time(), time.perf_counter()
                    for _ in range(n):
                        await one(client)
                    cpu, wall = (time.process_time() - c) / n * 1e6, (time.perf_counter() - t) / n * 1e6
                    if name not in best or cpu < best[name][0]:
                        best[name] = (cpu, wall)
        finally:
            await session.close()
            await pool.close()
        return best

    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {core})
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        best = runner.run(run())
    return [[name, round(cpu, 1), round(wall, 1)] for name, (cpu, wall) in best.items()]


# ---------------------------------------------------------------------------------- processes

def _pin(core: int | None):
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of pid and its descendants (from /proc; 0 when gone)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: deque = field(default_factory=lambda: deque(maxlen=50))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _drain(proc: Proc, ready: re.Pattern | None, found: list, seen: threading.Event) -> None:
    """Keep the child's output (last lines) and note the first line `ready` matches."""
    for line in proc.popen.stdout:
        proc.log.append(line.rstrip())
        if ready is not None and not seen.is_set():
            m = ready.search(line)
            if m:
                found.append(m.group(1))
                seen.set()
    seen.set()  # output closed: the child exited


def spawn(name: str, cmd: list[str], core: int | None, ready: re.Pattern | None = None, timeout: float = 60.0,
          env: dict | None = None, cwd: str | None = None, stderr_file: Path | None = None) -> tuple[Proc, str | None]:
    """Start cmd pinned to core; with `ready`, wait (at most timeout) for the line it matches and
    return its group 1. stderr goes with stdout to this process, or to `stderr_file` (a log file,
    as a deployment would keep it: a reader of a pipe that falls behind would block the writer)."""
    err = subprocess.STDOUT if stderr_file is None else open(stderr_file, "w")  # noqa: SIM115 - the child owns it
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=_pin(core))
    if stderr_file is not None:
        err.close()
    proc = Proc(name, popen)
    found: list[str] = []
    seen = threading.Event()
    threading.Thread(target=_drain, args=(proc, ready, found, seen), daemon=True).start()
    if ready is not None and not (seen.wait(timeout) and found):
        proc.stop()
        raise RuntimeError(f"{name} did not become ready within {timeout:.0f} s: " + " | ".join(list(proc.log)[-5:]))
    return proc, (found[0] if found else None)


def wait_serving(url: str, proc: Proc, timeout: float = 60.0) -> None:
    """Poll POST /v1/completions until it answers 200 (bounded by timeout)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: " + " | ".join(list(proc.log)[-5:]))
        try:
            req = urllib.request.Request(url + "/v1/completions", data=_body("hi"),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not serve within {timeout:.0f} s ({last})")


@dataclass
class Target:
    name: str
    url: str | None  # None: not available
    proc: Proc | None = None
    note: str = ""

    @property
    def pid(self) -> int | None:
        return self.proc.popen.pid if self.proc else None


# ---------------------------------------------------------------------------------- tools

def _sh(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)


def ensure_debian_tools(install: bool) -> dict[str, str | None]:
    """Paths of wrk and nginx, installing them with apt-get when missing and allowed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    have = {"wrk": shutil.which("wrk"), "nginx": nginx}
    missing = [k for k, v in have.items() if v is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        _sh(["apt-get", "update", "-qq"], 180)
        rc, out = _sh(["apt-get", "install", "-y", "-qq", *missing], 240)
        if rc != 0:
            print(f"apt-get install failed: {out[-300:]}", flush=True)
        have = {"wrk": shutil.which("wrk"),
                "nginx": shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)}
    return have


def ensure_sglang_router(install: bool) -> tuple[str | None, str]:
    """(python of a venv with sglang_router, version) or (None, reason)."""
    py = SGLANG_VENV / "bin" / "python"
    probe = ["-c", "import importlib.metadata as m; print(m.version('sglang-router'))"]
    if py.exists():
        rc, out = _sh([str(py), *probe], 60)
        if rc == 0:
            return str(py), out.splitlines()[-1]
    if not install:
        return None, "not installed (--no-install)"
    print(f"installing sglang-router into {SGLANG_VENV} ...", flush=True)
    rc, out = _sh([sys.executable, "-m", "venv", "--clear", str(SGLANG_VENV)], 120)
    if rc != 0:
        return None, f"venv failed: {out[-200:]}"
    rc, out = _sh([str(py), "-m", "pip", "install", "-q", "sglang-router"], 400)
    if rc != 0:
        last = [line for line in out.splitlines() if "ERROR" in line] or out.splitlines()[-1:]
        return None, f"pip install failed: {last[-1][:150] if last else rc}"
    rc, out = _sh([str(py), *probe], 60)
    return (str(py), out.splitlines()[-1]) if rc == 0 else (None, f"import failed: {out[-150:]}")


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 16m;
    keepalive_requests 1000000;
    upstream backend {{
        server {backend};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


# ---------------------------------------------------------------------------------- measurements

def run_client(spec: dict, core: int | None, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_pin(core))
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"client failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


_WRK_LAT = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(wrk: str, url: str, body: bytes, duration: float, connections: int, core: int | None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(body.decode())}\n")
        script = f.name
    try:
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", script,
               url + "/v1/completions"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, preexec_fn=_pin(core))
    finally:
        os.unlink(script)
    out = r.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {(out + r.stderr)[-300:]}")
    lat = {q: float(v) * _UNIT[u] for q, v, u in _WRK_LAT.findall(out)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:(.*)", out)
    return {"rps": float(m.group(1)), "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
            "errors": (int(non2xx.group(1)) if non2xx else 0), "socket_errors": sock.group(1).strip() if sock else ""}


def core_busy_seconds(core: int | None) -> float:
    """Busy (non-idle, non-iowait) seconds of one core since boot, from /proc/stat."""
    if core is None:
        return 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            v = [int(x) for x in line.split()[1:]]
            return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class Usage:
    """CPU over one measurement, in % of one core."""

    proxy: float | None  # the proxy under test (and its children); None for "direct"
    backend: float  # the fake backend
    client: float  # the load generator (wrk or the aiohttp client)
    others_proxy_core: float  # anything else on the proxy's core: other work on this machine
    others_load_core: float  # anything else on the load core


def _others(u: Usage) -> str:
    return f"{u.others_proxy_core:.0f}% / {u.others_load_core:.0f}%"


def measured(target: Target, backend_pid: int, cores: tuple[int | None, int | None], fn):
    """Run fn() (which runs the load generator as a child process) and return (its result, Usage)."""
    import resource

    def snap():
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.perf_counter(), cpu_seconds(target.pid) if target.pid else 0.0, cpu_seconds(backend_pid),
                kids.ru_utime + kids.ru_stime, core_busy_seconds(cores[0]), core_busy_seconds(cores[1]))

    a = snap()
    out = fn()
    b = snap()
    dt = b[0] - a[0]
    proxy, backend, client, core_p, core_l = (100 * (y - x) / dt for x, y in zip(a[1:], b[1:]))
    return out, Usage(proxy if target.pid else None, backend, client, max(0.0, core_p - proxy),
                      max(0.0, core_l - backend - client))


# ---------------------------------------------------------------------------------- routing decision

@contextlib.contextmanager
def _realtime(enabled: bool):
    """SCHED_RR priority 1 inside the block (when enabled), SCHED_OTHER after."""
    if enabled:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    try:
        yield
    finally:
        if enabled:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def bench_routing(policies: list[str], total_blocks: int, replicas: int, probes_n: int, rounds: int,
                  realtime: bool = False) -> list[list]:
    """p50/p99 of prepare + routing_request + decide for 8k-token prompts (see module docstring).
    With realtime, only the timed loops (about a second per policy) run as SCHED_RR."""
    from balancer.approx_index import ApproxIndex
    from balancer.config import BalancerConfig, ReplicaSpec
    from balancer.policies import make_policy
    from balancer.policies.base import ReplicaLoad
    from balancer.prefix_index import PrefixIndex
    from protocol.hashing import hash_blocks
    from balancer.registry import Registry
    from balancer.router import Router
    from protocol.events import BlockStored
    from protocol.openai_api import GenerationRequest
    from protocol.tokenizer import load_tokenizer

    cfg = BalancerConfig(model=MODEL)
    bs = cfg.block_size
    tokenizer = load_tokenizer(cfg.tokenizer)
    index = PrefixIndex(bs, MODEL)
    registry = Registry(cfg.breaker, cfg.health, time.monotonic)
    rids = []
    rng = random.Random(7)
    for i in range(replicas):
        spec = ReplicaSpec(url=f"http://127.0.0.1:{9100 + i}")  # never contacted
        registry.add(spec)
        rids.append(spec.replica_id)
        registry.on_load(spec.replica_id, ReplicaLoad(num_running=rng.randrange(8), num_waiting=rng.randrange(4),
                                                      queued_prefill_tokens=rng.randrange(20_000),
                                                      running_decode_tokens=rng.randrange(100_000),
                                                      free_blocks=rng.randrange(10_000), total_blocks=10_000,
                                                      kv_usage=rng.random(), age_s=0.0))

    # Fill: 40 system prompts of 32 blocks held by every replica, the rest per-replica chains of
    # 128 blocks stored as 32-block events (kvfleet replicas: engine hash == our hash).
    t0 = time.perf_counter()
    import numpy as np

    nrng = np.random.default_rng(3)

    def chain_events(n_blocks: int) -> list[BlockStored]:
        tokens = nrng.integers(1, 150_000, n_blocks * bs).tolist()
        ours = hash_blocks(tokens, bs, index.root)
        evs, parent = [], None
        for i in range(0, n_blocks, 32):
            j = min(i + 32, n_blocks)
            evs.append(BlockStored(tuple(ours[i:j]), parent, tuple(tokens[i * bs : j * bs]), bs))
            parent = ours[j - 1]
        return evs

    shared = [chain_events(32) for _ in range(40)]
    per_replica = (total_blocks - 40 * 32 * replicas) // replicas // 128
    for rid in rids:
        for evs in shared:
            for ev in evs:
                index.apply(rid, ev)
        for _ in range(per_replica):
            for ev in chain_events(128):
                index.apply(rid, ev)
    texts = [_text(8191, 100 + k) for k in range(probes_n)]
    for k, text in enumerate(texts):  # each probe: fully on 3 replicas, its first half on 3 more
        tokens = tokenizer.encode(text)
        ours = hash_blocks(tokens, bs, index.root)
        n = len(ours)
        for j in range(6):
            m = n if j < 3 else n // 2
            index.apply(rids[(k * 6 + j) % replicas], BlockStored(tuple(ours[:m]), None, tuple(tokens[: m * bs]), bs))
    held = sum(index.num_blocks(r) for r in rids)
    build_s = time.perf_counter() - t0
    print(f"routing: index of {held:,} held blocks ({index.num_entries():,} distinct) built in {build_s:.1f} s",
          flush=True)

    requests = [GenerationRequest(kind="completion", model=MODEL, prompt=t, max_tokens=128) for t in texts]
    rows = []
    for name in policies:
        policy = make_policy(name)
        approx = ApproxIndex(capacity_per_replica=cfg.approx_capacity_blocks, ttl_s=cfg.approx_ttl_s)
        from predictors.adapter import balancer_predictor

        # As the balancer runs it: its default output-length predictor (the router keeps it only
        # for a policy that reads predictions).
        predictor = balancer_predictor(cfg.predictor, MODEL)
        router = Router(MODEL, bs, tokenizer, index, approx, policy, registry, has_events=lambda rid: True,
                        predictor=predictor)
        for k, req in enumerate(requests):  # warm-up; text-tree policies learn the probes here
            p = router.prepare(req)
            rr = router.routing_request(p, f"warm-{k}")
            router.routed(rr, router.decide(rr, registry.usable()))
        samples: dict[str, list[float]] = {"prepare": [], "lookup": [], "decide": [], "total": [], "routed": []}
        hits = 0
        gc.collect()
        with _realtime(realtime):
            for r, (k, req) in itertools.product(range(rounds), enumerate(requests)):
                t0 = time.perf_counter()
                p = router.prepare(req)
                t1 = time.perf_counter()
                rr = router.routing_request(p, f"r{r}-{k}")
                t2 = time.perf_counter()
                d = router.decide(rr, registry.usable())
                t3 = time.perf_counter()
                router.routed(rr, d)
                t4 = time.perf_counter()
                samples["prepare"].append(t1 - t0)
                samples["lookup"].append(t2 - t1)
                samples["decide"].append(t3 - t2)
                samples["total"].append(t3 - t0)
                samples["routed"].append(t4 - t3)
                hits += rr.matched_blocks.get(d.replica_id, 0) == len(p.block_hashes)
        for v in samples.values():
            v.sort()
        us = {k: (_pct(v, 0.5) * 1e6, _pct(v, 0.99) * 1e6) for k, v in samples.items()}
        rows.append([name, len(requests[0].prompt) + 1, round(us["prepare"][0], 1), round(us["lookup"][0], 1),
                     round(us["decide"][0], 1), round(us["total"][0], 1), round(us["total"][1], 1),
                     round(us["routed"][0], 1), f"{hits}/{len(samples['total'])}",
                     "yes" if us["total"][0] <= GOAL_DECISION_US else "NO"])
    return rows


# ---------------------------------------------------------------------------------- profile mode

def _collapsed_top(path: Path, top: int) -> tuple[list[list], list[list], int]:
    """(self rows, inclusive rows of kvfleet's own code, samples) from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        if leaf.startswith("Runner.run (asyncio/runners.py"):  # no Python frame above: uvloop's C code
            leaf = "[event loop: uvloop C code, socket syscalls, C callbacks]"
        own[leaf] = own.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def short(frame: str) -> str:  # "fn (/long/path/pkg/mod.py:12)" -> "fn (pkg/mod.py:12)"
        m = re.match(r"(.*) \((.*)\)$", frame)
        if not m:
            return frame
        parts = m.group(2).split("/")
        return f"{m.group(1)} ({'/'.join(parts[-2:])})"

    self_rows = [[f"{100 * n / total:.1f}%", short(f)] for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    mine = [(f, n) for f, n in incl.items() if re.search(r"[(/](balancer|protocol)/", f)]
    incl_rows = [[f"{100 * n / total:.1f}%", short(f)] for f, n in sorted(mine, key=lambda kv: -kv[1])[:top]]
    return self_rows, incl_rows, total


def profile_balancer(args, backend_url: str, backend_pid: int, wrk: str | None) -> None:
    """Where the balancer's CPU goes under load: py-spy (sampling, on-CPU only) when it can be found
    (--py-spy PATH or on PATH), else cProfile (call counts; inflates small functions)."""
    import pstats

    pyspy = args.py_spy or shutil.which("py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="kvfleet-prof-"))
    phases = [(f"non-streaming at {args.rate:.0f} req/s", "rate", _body(SHORT_PROMPT)),
              ("non-streaming at max rate", "max", _body(SHORT_PROMPT)),
              ("non-streaming 8k-token prompt at max rate", "max", _body(LONG_PROMPT)),
              (f"SSE {args.sse_streams} x {args.sse_chunks} events", "sse", _body(SHORT_PROMPT, True, args.sse_chunks))]
    for k, (phase, kind, body) in enumerate(phases):
        prof = tmp / f"phase{k}.prof"
        cmd = [sys.executable, "-m", "kvfleet.cli", "balancer", "--port", "0", "--model", MODEL,
               "--policy", args.profile_policy, "--replica", backend_url]
        if not pyspy:
            cmd[1:1] = ["-m", "cProfile", "-o", str(prof)]
        proc, url = spawn("kvfleet (profiled)", cmd, args.proxy_core, _READY, cwd=str(ROOT))
        spy = None
        try:
            wait_serving(url, proc)
            t = Target("kvfleet", url, proc)
            if pyspy:
                spy = subprocess.Popen([pyspy, "record", "--format", "raw", "--function", "--rate", "250", "-d",
                                        str(max(1, round(args.duration))), "-o", str(tmp / f"phase{k}.txt"),
                                        "--pid", str(proc.popen.pid)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.STDOUT, preexec_fn=_pin(args.load_core))
            if kind == "rate":
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_client(
                    {"mode": "latency", "url": url + "/v1/completions", "body": body.decode(), "rate": args.rate,
                     "duration": args.duration, "warmup": 0.0}, args.load_core, args.duration + 60))
                what = f"p50 {res['p50_ms']:.3f} ms"
            elif kind == "sse":
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_client(
                    {"mode": "sse", "url": url + "/v1/completions", "body": body.decode(),
                     "streams": args.sse_streams, "chunks": args.sse_chunks, "duration": args.duration,
                     "max_streams": 2000}, args.load_core, args.duration + 120))
                what = f"{res['chunks_per_s']:.0f} chunks/s"
            elif wrk:
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_wrk(
                    wrk, url, body, args.duration, args.connections, args.load_core))
                what = f"{res['rps']:.0f} req/s"
            else:
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_client(
                    {"mode": "closed", "url": url + "/v1/completions", "body": body.decode(),
                     "concurrency": args.connections, "duration": args.duration, "max_requests": 1_000_000},
                    args.load_core, args.duration + 60))
                what = f"{res['rps']:.0f} req/s"
            if spy is not None:
                spy.wait(timeout=args.duration + 60)
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            proc.stop(signal.SIGINT, timeout=30)
        tool = "py-spy" if pyspy else "cProfile"
        print(f"\n## kvfleet balancer ({args.profile_policy}) under {phase} load: {what} under {tool}, "
              f"balancer CPU {use.proxy:.0f}%, others on its core {use.others_proxy_core:.0f}%\n", flush=True)
        if pyspy:
            out = tmp / f"phase{k}.txt"
            if not out.exists():
                print("py-spy wrote nothing (ptrace not permitted?)")
                continue
            self_rows, incl_rows, n = _collapsed_top(out, args.profile_top)
            report(f"{phase}: self time, top {args.profile_top} frames ({n} samples)", ["share", "frame"], self_rows)
            report(f"{phase}: inclusive time of kvfleet's own functions", ["share", "frame"], incl_rows)
        elif prof.exists():
            st = pstats.Stats(str(prof))
            st.sort_stats("tottime").print_stats(args.profile_top)
            st.sort_stats("cumulative").print_stats(r"/(balancer|protocol)/", args.profile_top)
    print(f"raw profiles in {tmp}")


# ---------------------------------------------------------------------------------- main

def start_targets(args, stack: contextlib.ExitStack, burl: str, tools: dict, skip: set[str]) -> list[Target]:
    """Every proxy in front of the backend at burl, pinned to the proxy core; stopped by stack."""
    targets = [Target("direct", burl, note="rig ceiling: client + backend on one core")]
    # The default (an access log line per request, at INFO) and the same without access logs.
    for name, policy, extra in (("kvfleet precise_prefix", "precise_prefix", []),
                                ("kvfleet round_robin", "round_robin", []),
                                ("kvfleet precise_prefix, no access log", "no-access-log",
                                 ["--policy", "precise_prefix", "--log-level", "warning"]),
                                ("kvfleet precise_prefix, aiohttp front", "aiohttp-front",
                                 ["--policy", "precise_prefix", "--no-fast-path"])):
        if policy not in skip:
            cmd = [sys.executable, "-m", "kvfleet.cli", "balancer", "--port", "0", "--model", MODEL, "--replica", burl,
                   *(extra or ["--policy", policy])]
            log_file = Path(tempfile.mkdtemp(prefix="kvfleet-bench-")) / "balancer.log"
            proc, url = spawn(name, cmd, args.proxy_core, _READY, cwd=str(ROOT), stderr_file=log_file)
            stack.callback(proc.stop)
            targets.append(Target(name, url, proc, note=" ".join(extra[2:])))
    if "bare" not in skip:
        proc, url = spawn("aiohttp bare relay", [sys.executable, str(Path(__file__).resolve()), "--bare-relay", burl],
                          args.proxy_core, _READY)
        stack.callback(proc.stop)
        targets.append(Target("aiohttp bare relay", url, proc, note="reference: aiohttp pass-through, no routing"))
    if "nginx" not in skip:
        if tools["nginx"] is None:
            targets.append(Target("nginx", None, note="n/a (nginx not installed)"))
        else:
            ndir = Path(tempfile.mkdtemp(prefix="kvfleet-nginx-"))
            stack.callback(shutil.rmtree, ndir, True)
            port = _free_port()
            conf = ndir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=ndir, port=port, backend=burl.removeprefix("http://")))
            proc, _ = spawn("nginx", [tools["nginx"], "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf),
                                      "-g", "daemon off;"], args.proxy_core)
            stack.callback(proc.stop)
            _, ver = _sh([tools["nginx"], "-v"], 10)
            targets.append(Target("nginx", f"http://127.0.0.1:{port}", proc, note=ver.replace("nginx version: ", "")))
    if "sglang-router" not in skip:
        py, ver = ensure_sglang_router(not args.no_install)
        if py is None:
            targets.append(Target("sglang-router", None, note=f"n/a ({ver})"))
        else:
            port = _free_port()
            proc, _ = spawn("sglang-router", [py, "-m", "sglang_router.launch_router", "--worker-urls", burl,
                                              "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
                                              "--log-level", "warn"], args.proxy_core,
                            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
            stack.callback(proc.stop)
            targets.append(Target("sglang-router", f"http://127.0.0.1:{port}", proc, note=f"sglang-router {ver}"))
    for t in targets:
        if t.url is not None and t.proc is not None:
            try:
                wait_serving(t.url, t.proc)
            except RuntimeError as e:
                t.note, t.url = f"n/a (did not start: {str(e)[:120]})", None
    return targets


def _pct_cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def latency_rows(args, targets: list[Target], bpid: int) -> list[list]:
    """Open-loop latency per target for a short and an 8k-token prompt; added = minus direct.

    `--rounds` rounds, each measuring direct and then every target once: a target's added
    latency is the median over rounds of (its percentile - direct's percentile in the same round),
    so a drift of the machine's speed between measurements (it shares a host) cancels out."""
    cores = (args.proxy_core, args.load_core)
    rows = []
    for label, prompt in (("short", SHORT_PROMPT), ("8k tokens", LONG_PROMPT)):
        dur = args.duration if label == "short" else max(2.0, args.duration * 0.6)
        runs: dict[str, list] = {t.name: [] for t in targets}
        failed: dict[str, str] = {}
        for _ in range(args.rounds):
            for t in targets:
                if t.url is None or t.name in failed:
                    continue
                spec = {"mode": "latency", "url": t.url + "/v1/completions", "body": _body(prompt).decode(),
                        "rate": args.rate, "duration": dur, "warmup": 1.0}
                try:
                    r, use = measured(t, bpid, cores, lambda: run_client(spec, args.load_core, dur + 60))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    failed[t.name] = f"failed: {str(e)[:100]}"
                    continue
                print(f"latency {label:9s} {t.name:24s} {r} {use}", flush=True)
                if "p50_ms" not in r:
                    failed[t.name] = f"{r['errors']} errors, no answer"
                    continue
                runs[t.name].append((r, use))
        base = runs.get("direct", [])
        for t in targets:
            got = runs[t.name]
            if t.url is None or t.name in failed or not got:
                rows.append([t.name, label, "-", "-", "-", "-", "-", "-", "-", t.note if t.url is None
                             else failed.get(t.name, "no result")])
                continue
            med = lambda xs: statistics.median(xs)  # noqa: E731
            added = ["-", "-"]
            if t.name != "direct" and len(base) == len(got):
                added = [round(med([r["p50_ms"] - b["p50_ms"] for (r, _), (b, _) in zip(got, base)]), 3),
                         round(med([r["p99_ms"] - b["p99_ms"] for (r, _), (b, _) in zip(got, base)]), 3)]
            use = got[len(got) // 2][1]
            n_ok, n_err = sum(r["n"] for r, _ in got), sum(r["errors"] for r, _ in got)
            rows.append([t.name, label, round(med([r["achieved_rate"] for r, _ in got])),
                         round(med([r["p50_ms"] for r, _ in got]), 3), round(med([r["p99_ms"] for r, _ in got]), 3),
                         *added, _pct_cell(use.proxy), _others(use),
                         f"{n_ok} ok, {n_err} errors, {len(got)} rounds"])
    return rows


def throughput_rows(args, targets: list[Target], bpid: int, wrk: str | None) -> list[list]:
    """Max non-streaming req/s per target: wrk -t1 -cN, or an aiohttp closed loop without wrk."""
    cores = (args.proxy_core, args.load_core)
    body = _body(SHORT_PROMPT)
    rows = []
    for t in targets:
        if t.url is None:
            rows.append([t.name, "-", "-", "-", "-", "-", "-", "-", t.note])
            continue
        try:
            if wrk:
                run_wrk(wrk, t.url, body, 1, args.connections, args.load_core)  # warm-up
                r, use = measured(t, bpid, cores, lambda: run_wrk(wrk, t.url, body, args.duration, args.connections,
                                                                  args.load_core))
                gen = f"wrk -t1 -c{args.connections}"
            else:
                spec = {"mode": "closed", "url": t.url + "/v1/completions", "body": body.decode(),
                        "concurrency": args.connections, "duration": args.duration, "max_requests": 2_000_000}
                r, use = measured(t, bpid, cores, lambda: run_client(spec, args.load_core, args.duration + 60))
                gen = f"aiohttp closed loop x{args.connections} (no wrk)"
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rows.append([t.name, "-", "-", "-", "-", "-", "-", "-", f"failed: {str(e)[:100]}"])
            continue
        print(f"throughput {t.name:24s} {r} {use}", flush=True)
        ms = [("-" if r.get(k) is None else round(r[k], 2)) for k in ("p50_ms", "p99_ms")]
        rows.append([t.name, round(r["rps"]), *ms, _pct_cell(use.proxy), _others(use), f"{use.backend:.0f}%",
                     r["errors"], f"{gen}; {t.note}".strip("; ")])
    return rows


def sse_rows(args, targets: list[Target], bpid: int) -> list[list]:
    """Relayed SSE events/s per target with a few concurrent long streams."""
    cores = (args.proxy_core, args.load_core)
    rows = []
    for t in targets:
        if t.url is None:
            rows.append([t.name, "-", "-", "-", "-", "-", "-", t.note])
            continue
        spec = {"mode": "sse", "url": t.url + "/v1/completions",
                "body": _body(SHORT_PROMPT, True, args.sse_chunks).decode(), "streams": args.sse_streams,
                "chunks": args.sse_chunks, "duration": max(2.0, args.duration * 0.8), "max_streams": 2000}
        try:
            r, use = measured(t, bpid, cores, lambda: run_client(spec, args.load_core, args.duration + 120))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rows.append([t.name, "-", "-", "-", "-", "-", "-", f"failed: {str(e)[:100]}"])
            continue
        print(f"sse {t.name:24s} {r} {use}", flush=True)
        rows.append([t.name, round(r["chunks_per_s"]), r["stream_p50_ms"] and round(r["stream_p50_ms"], 1),
                     f"{r['streams']} ok / {r['bad_streams']} bad", _pct_cell(use.proxy), _others(use),
                     f"{use.backend:.0f}%", t.note])
    return rows


def goal_rows(args, lat: list[list], thr: list[list], sse: list[list], routing: list[list]) -> list[list]:
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    rows = []
    for name in ("kvfleet precise_prefix", "kvfleet round_robin"):
        row = next((r for r in lat if r[0] == name and r[1] == "short"), None)
        if row and row[5] != "-":
            rows.append([f"added p50 at {args.rate:.0f} req/s ({name})", f"<= {GOAL_ADDED_P50_MS} ms", f"{row[5]} ms",
                         yes(row[5] <= GOAL_ADDED_P50_MS), row[8]])
            rows.append([f"added p99 at {args.rate:.0f} req/s ({name})", f"<= {GOAL_ADDED_P99_MS} ms", f"{row[6]} ms",
                         yes(row[6] <= GOAL_ADDED_P99_MS), row[8]])
        row = next((r for r in thr if r[0] == name), None)
        if row and row[1] != "-":
            rows.append([f"non-streaming req/s on one core ({name})", f">= {GOAL_RPS}", row[1], yes(row[1] >= GOAL_RPS),
                         row[5]])
        row = next((r for r in sse if r[0] == name), None)
        if row and row[1] != "-":
            rows.append([f"relayed SSE chunks/s ({name})", f">= {GOAL_SSE}", row[1], yes(row[1] >= GOAL_SSE), row[5]])
    for row in routing:
        rows.append([f"routing decision p50, 8k tokens ({row[0]})", f"<= {GOAL_DECISION_US} us", f"{row[5]} us",
                     row[-1], "-"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop rate for the latency runs (req/s)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="latency rounds (direct, then every target, per round); added = median over rounds of "
                         "the difference to direct in the same round")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections for max throughput")
    ap.add_argument("--sse-streams", type=int, default=4)
    ap.add_argument("--sse-chunks", type=int, default=1000)
    ap.add_argument("--proxy-core", type=int, default=0)
    ap.add_argument("--load-core", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="indexed blocks for the routing benchmark")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for this run and every process it starts (inherited); e.g. -10 on a machine "
                         "shared with other work (negative needs root)")
    ap.add_argument("--realtime", action="store_true",
                    help="run the load phases under SCHED_RR priority 1 (inherited by every process started; "
                         "root), so other work on a shared machine cannot preempt them; of the in-process routing "
                         "benchmark only the timed loops run so")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing tools")
    ap.add_argument("--skip", default="", help="comma list of targets to skip: round_robin,no-access-log,aiohttp-front,bare,nginx,sglang-router")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma list of the parts to run ({', '.join(PARTS)}); the goals table covers the parts "
                         "run; client: CPU per request of the balancer's upstream client against aiohttp's")
    ap.add_argument("--profile", action="store_true", help="only profile the kvfleet balancer under load")
    ap.add_argument("--profile-policy", default="precise_prefix")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--py-spy", default=None, help="py-spy binary for --profile (default: on PATH, else cProfile)")
    ap.add_argument("--out", default="results/bench_balancer.json", help="results/bench_balancer_<part>.json")
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bare-relay", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    parts = set(filter(None, args.parts.split(",")))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown part(s) {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    if args.client is not None:
        client_main(json.loads(args.client))
        return 0
    if args.bare_relay is not None:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        asyncio.run(_bare_relay(args.bare_relay))
        return 0
    if (os.cpu_count() or 1) < 2:
        args.proxy_core = args.load_core = None  # nothing to pin apart; the numbers say less
    os.chdir(ROOT)
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # children inherit it
        except OSError as e:
            print(f"cannot set niceness {args.nice}: {e}; running at {os.getpriority(os.PRIO_PROCESS, 0)}")
    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {args.load_core})  # this orchestrator mostly waits; keep core 0 free
    if args.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))  # children inherit it
        except (OSError, AttributeError) as e:
            print(f"cannot switch to SCHED_RR: {e}; running as SCHED_OTHER")
            args.realtime = False
    loadavg_start = os.getloadavg()
    tools = ensure_debian_tools(not args.no_install)
    t_start = time.perf_counter()
    # This process's own threads (one per child, reading its output) stay off the proxy's core:
    # a balancer's log line must not wake a reader that then competes with it there.
    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {args.load_core})

    with contextlib.ExitStack() as stack:
        backend, burl = spawn("fake backend", [sys.executable, str(ROOT / "bench" / "fake_backend.py"), "--port", "0",
                                               "--model", MODEL], args.load_core, _READY)
        stack.callback(backend.stop)
        if args.profile:
            profile_balancer(args, burl, backend.popen.pid, tools["wrk"])
            return 0
        targets = start_targets(args, stack, burl, tools, set(filter(None, args.skip.split(","))))
        print(f"targets up in {time.perf_counter() - t_start:.1f} s: "
              + ", ".join(t.name for t in targets if t.url is not None), flush=True)
        lat = latency_rows(args, targets, backend.popen.pid) if "latency" in parts else []
        thr = throughput_rows(args, targets, backend.popen.pid, tools["wrk"]) if "throughput" in parts else []
        sse = sse_rows(args, targets, backend.popen.pid) if "sse" in parts else []
        client = client_cost_rows(burl, args.proxy_core) if "client" in parts else []

    # In process, once every process above is stopped.
    if args.realtime:  # the index build must not hold a core at real-time priority for seconds
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError, TypeError):
        os.sched_setaffinity(0, {args.proxy_core})
    routing = bench_routing(["precise_prefix", "dynamo_kv", "llmd_scorer", "sglang_cache_aware", "predictive"],
                            args.blocks, 16,
                            probes_n=32, rounds=20, realtime=args.realtime) if "routing" in parts else []

    stem = args.out.removesuffix(".json")
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    sched = "; SCHED_RR" if args.realtime else f"; SCHED_OTHER, nice {nice}"
    setup = {"proxy_core": args.proxy_core, "load_core": args.load_core, "rate": args.rate, "duration_s": args.duration,
             "wrk": tools["wrk"], "nginx": tools["nginx"], "targets": {t.name: t.note for t in targets},
             "command": " ".join(sys.argv), "niceness": nice, "realtime_load_phases": args.realtime,
             "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()}
    extra = {"setup": setup}
    report(f"Latency at {args.rate:.0f} req/s open loop, non-streaming (client: aiohttp, own process, core "
           f"{args.load_core}; proxy on core {args.proxy_core}); added = proxy - direct{sched}",
           ["target", "prompt", "sent req/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "proxy CPU",
            "others on cores P/L", "requests"], lat, out=f"{stem}_latency.json", extra=extra)
    report(f"Max non-streaming throughput (proxy on core {args.proxy_core}; load generator + backend on core "
           f"{args.load_core}{sched})",
           ["target", "req/s", "p50 ms", "p99 ms", "proxy CPU", "others on cores P/L", "backend CPU", "errors",
            "notes"], thr, out=f"{stem}_throughput.json", extra=extra)
    report(f"SSE relay: {args.sse_streams} concurrent streams of {args.sse_chunks} events (~190 B each){sched}",
           ["target", "chunks/s", "stream p50 ms", "streams", "proxy CPU", "others on cores P/L", "backend CPU",
            "notes"], sse, out=f"{stem}_sse.json", extra=extra)
    report(f"Routing decision for an 8k-token prompt, 16 replicas, ~{args.blocks / 1e6:.1f}M indexed blocks "
           f"(us; total = prepare + lookup + decide; routed = policy/approx bookkeeping after, not in total){sched}",
           ["policy", "prompt tokens", "prepare p50", "lookup p50", "decide p50", "total p50", "total p99",
            "routed p50", "fully cached pick", f"<= {GOAL_DECISION_US} us"], routing,
           out=f"{stem}_routing.json", extra=extra)
    if client:
        report("Upstream client: CPU per small POST to the fake backend, in one process on the proxy's core "
               "(2,000 sequential requests per round, clients in turns, best of 3 rounds)",
               ["client", "CPU us/request", "wall us/request"], client, out=f"{stem}_client.json", extra=extra)
    report("Goals (kvfleet balancer); last column: CPU that other work on this machine took from the proxy's "
           "core / the load core during that run (0% / 0% = a clean run)",
           ["goal", "target", "measured", "met", "others on cores P/L"], goal_rows(args, lat, thr, sse, routing),
           out=f"{stem}_goals.json", extra=extra)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
