"""Running a load generator against a target and accounting for the CPU around it: the load client
(loadclient.py, its own process) or wrk, pinned to the load core; `measured` says how much CPU the
proxy, the backend and the client took during the run, and how much other work on this machine
took from the proxy's core and the load core (from /proc/stat)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench.balancer.rig import ROOT, Target
from harness.procs import core_busy_seconds, cpu_seconds


def pin(core: int | None):
    """A preexec_fn that pins the child to core (None: no pinning)."""
    return None if core is None else (lambda: os.sched_setaffinity(0, {core}))


def run_client(spec: dict, core: int | None, timeout: float) -> dict:
    """Run the load client (loadclient.py) with `spec` pinned to core; its one JSON line of results."""
    cmd = [sys.executable, "-m", "bench.balancer.loadclient", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=pin(core), cwd=ROOT)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"client failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


def client_spec(mode: str, target: Target, body: bytes, **kw) -> dict:
    """A load-client spec for POST /v1/completions on target (its headers included)."""
    return {"mode": mode, "url": target.url + "/v1/completions", "body": body.decode(), "headers": target.headers,
            **kw}


_WRK_LAT = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(wrk: str, target: Target, body: bytes, duration: float, connections: int, core: int | None) -> dict:
    headers = {"Content-Type": "application/json", **target.headers}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\n' + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
                                                  for k, v in headers.items())
                + f"wrk.body = {json.dumps(body.decode())}\n")
        script = f.name
    try:
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", script,
               target.url + "/v1/completions"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, preexec_fn=pin(core))
    finally:
        os.unlink(script)
    out = r.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {(out + r.stderr)[-300:]}")
    lat = {q: float(v) * _UNIT[u] for q, v, u in _WRK_LAT.findall(out)}
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:(.*)", out)
    return {"rps": float(m.group(1)), "requests": int(total.group(1)) if total else None,
            "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
            "errors": (int(non2xx.group(1)) if non2xx else 0), "socket_errors": sock.group(1).strip() if sock else ""}


@dataclass
class Usage:
    """CPU over one measurement, in % of one core."""

    proxy: float | None  # the proxy under test (and its children); None for "direct"
    backend: float  # the fake backend
    client: float  # the load generator (wrk or the aiohttp client)
    others_proxy_core: float  # anything else on the proxy's core: other work on this machine
    others_load_core: float  # anything else on the load core


def others(u: Usage) -> str:
    return f"{u.others_proxy_core:.0f}% / {u.others_load_core:.0f}%"


def pct_cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


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
