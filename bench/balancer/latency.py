"""Part `latency`: an open-loop client (own process) sends at a fixed rate (--rate, 500 req/s) for a
few seconds after a warm-up; latency is measured per request from its send to the end of its body.
added = percentile(via proxy) - percentile(direct), for a short prompt and an 8k-token prompt."""

from __future__ import annotations

import statistics
import subprocess

from bench.balancer.measure import client_spec, measured, others, pct_cell, run_client
from bench.balancer.rig import LONG_PROMPT, SHORT_PROMPT, Target, body
from bench.common import report

HEADERS = ["target", "prompt", "sent req/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "proxy CPU",
           "others on cores P/L", "requests"]


def rows(args, targets: list[Target], bpid: int) -> list[list]:
    """Open-loop latency per target for a short and an 8k-token prompt; added = minus direct.

    `--rounds` rounds, each measuring direct and then every target once: a target's added
    latency is the median over rounds of (its percentile - direct's percentile in the same round),
    so a drift of the machine's speed between measurements (it shares a host) cancels out."""
    cores = (args.proxy_core, args.load_core)
    out = []
    for label, prompt in (("short", SHORT_PROMPT), ("8k tokens", LONG_PROMPT)):
        dur = args.duration if label == "short" else max(2.0, args.duration * 0.6)
        runs: dict[str, list] = {t.name: [] for t in targets}
        failed: dict[str, str] = {}
        for _ in range(args.rounds):
            for t in targets:
                if t.url is None or t.name in failed:
                    continue
                spec = client_spec("latency", t, body(prompt), rate=args.rate, duration=dur, warmup=1.0)
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
                out.append([t.name, label, "-", "-", "-", "-", "-", "-", "-", t.note if t.url is None
                            else failed.get(t.name, "no result")])
                continue
            med = statistics.median
            added = ["-", "-"]
            if t.name != "direct" and len(base) == len(got):
                added = [round(med([r["p50_ms"] - b["p50_ms"] for (r, _), (b, _) in zip(got, base)]), 3),
                         round(med([r["p99_ms"] - b["p99_ms"] for (r, _), (b, _) in zip(got, base)]), 3)]
            use = got[len(got) // 2][1]
            n_ok, n_err = sum(r["n"] for r, _ in got), sum(r["errors"] for r, _ in got)
            out.append([t.name, label, round(med([r["achieved_rate"] for r, _ in got])),
                        round(med([r["p50_ms"] for r, _ in got]), 3), round(med([r["p99_ms"] for r, _ in got]), 3),
                        *added, pct_cell(use.proxy), others(use),
                        f"{n_ok} ok, {n_err} errors, {len(got)} rounds"])
    return out


def print_report(args, rows: list[list], stem: str, extra: dict, sched: str) -> None:
    report(f"Latency at {args.rate:.0f} req/s open loop, non-streaming (client: aiohttp, own process, core "
           f"{args.load_core}; proxy on core {args.proxy_core}); added = proxy - direct{sched}",
           HEADERS, rows, out=f"{stem}_latency.json", extra=extra)
