"""Part `sse`: --sse-streams concurrent streams (4) of --sse-chunks events (1,000) each, repeated
for a few seconds: relayed events/s counted by the client (every stream is checked to end with
[DONE])."""

from __future__ import annotations

import subprocess

from bench.balancer.measure import client_spec, measured, others, pct_cell, run_client
from bench.balancer.rig import SHORT_PROMPT, Target, body
from bench.common import report

HEADERS = ["target", "chunks/s", "stream p50 ms", "streams", "proxy CPU", "others on cores P/L", "backend CPU",
           "notes"]


def rows(args, targets: list[Target], bpid: int) -> list[list]:
    """Relayed SSE events/s per target with a few concurrent long streams."""
    cores = (args.proxy_core, args.load_core)
    out = []
    for t in targets:
        if t.url is None:
            out.append([t.name, "-", "-", "-", "-", "-", "-", t.note])
            continue
        spec = client_spec("sse", t, body(SHORT_PROMPT, True, args.sse_chunks), streams=args.sse_streams,
                           chunks=args.sse_chunks, duration=max(2.0, args.duration * 0.8), max_streams=2000)
        try:
            r, use = measured(t, bpid, cores, lambda: run_client(spec, args.load_core, args.duration + 120))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            out.append([t.name, "-", "-", "-", "-", "-", "-", f"failed: {str(e)[:100]}"])
            continue
        print(f"sse {t.name:24s} {r} {use}", flush=True)
        out.append([t.name, round(r["chunks_per_s"]), r["stream_p50_ms"] and round(r["stream_p50_ms"], 1),
                    f"{r['streams']} ok / {r['bad_streams']} bad", pct_cell(use.proxy), others(use),
                    f"{use.backend:.0f}%", t.note])
    return out


def print_report(args, rows: list[list], stem: str, extra: dict, sched: str) -> None:
    report(f"SSE relay: {args.sse_streams} concurrent streams of {args.sse_chunks} events (~190 B each){sched}",
           HEADERS, rows, out=f"{stem}_sse.json", extra=extra)
