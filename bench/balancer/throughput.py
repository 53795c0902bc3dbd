"""Part `throughput`: max non-streaming req/s with `wrk -t1 -c64` and a POST body (an aiohttp closed
loop of 64 when wrk is absent); the proxy's CPU during the run shows whether it was the
bottleneck (100% = one core), and its CPU per request (µs: CPU seconds over requests served)."""

from __future__ import annotations

import subprocess

from bench.balancer.measure import client_spec, measured, others, pct_cell, run_client, run_wrk
from bench.balancer.rig import SHORT_PROMPT, Target, body
from bench.common import report

HEADERS = ["target", "req/s", "p50 ms", "p99 ms", "proxy CPU", "proxy CPU us/req", "others on cores P/L",
           "backend CPU", "errors", "notes"]


def rows(args, targets: list[Target], bpid: int, wrk: str | None) -> list[list]:
    """Max non-streaming req/s per target: wrk -t1 -cN, or an aiohttp closed loop without wrk."""
    cores = (args.proxy_core, args.load_core)
    b = body(SHORT_PROMPT)
    out = []
    for t in targets:
        if t.url is None:
            out.append([t.name, "-", "-", "-", "-", "-", "-", "-", "-", t.note])
            continue
        try:
            if wrk:
                run_wrk(wrk, t, b, 1, args.connections, args.load_core)  # warm-up
                r, use = measured(t, bpid, cores, lambda: run_wrk(wrk, t, b, args.duration, args.connections,
                                                                  args.load_core))
                gen = f"wrk -t1 -c{args.connections}"
            else:
                spec = client_spec("closed", t, b, concurrency=args.connections, duration=args.duration,
                                   max_requests=2_000_000)
                r, use = measured(t, bpid, cores, lambda: run_client(spec, args.load_core, args.duration + 60))
                gen = f"aiohttp closed loop x{args.connections} (no wrk)"
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            out.append([t.name, "-", "-", "-", "-", "-", "-", "-", "-", f"failed: {str(e)[:100]}"])
            continue
        print(f"throughput {t.name:24s} {r} {use}", flush=True)
        ms = [("-" if r.get(k) is None else round(r[k], 2)) for k in ("p50_ms", "p99_ms")]
        # % of one core -> CPU µs per request: (proxy / 100) s of CPU per s, over rps requests per s
        us = "-" if use.proxy is None or not r["rps"] else round(use.proxy * 1e4 / r["rps"], 1)
        out.append([t.name, round(r["rps"]), *ms, pct_cell(use.proxy), us, others(use), f"{use.backend:.0f}%",
                    r["errors"], f"{gen}; {t.note}".strip("; ")])
    return out


def print_report(args, rows: list[list], stem: str, extra: dict, sched: str) -> None:
    report(f"Max non-streaming throughput (proxy on core {args.proxy_core}; load generator + backend on core "
           f"{args.load_core}{sched})", HEADERS, rows, out=f"{stem}_throughput.json", extra=extra)
