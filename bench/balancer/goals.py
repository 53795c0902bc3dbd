"""The goals (issue: balancer, benchmark section) and the table that checks them over the parts run:
added latency p50 <= 0.5 ms and p99 <= 2 ms at 500 req/s; >= 2,000 non-streaming req/s on one
core; >= 50,000 relayed SSE chunks/s; a routing decision (tokenize, hash, look up, score 16
replicas) <= 200 us p50 for an 8k-token prompt; and issue #16's, for the guard off and on:
>= 6,500 non-streaming req/s on one core, <= 100 us of balancer CPU per request at saturation,
added p50 at 500 req/s within 0.15 ms of nginx's in the same run. Every balancer variant with
`goal=True` (rig.VARIANTS) is checked."""

from __future__ import annotations

from bench.balancer.rig import VARIANTS
from bench.common import report

GOAL_ADDED_P50_MS = 0.5
GOAL_ADDED_P99_MS = 2.0
GOAL_RPS = 2000
GOAL_SSE = 50_000
GOAL_DECISION_US = 200
GOAL16_RPS = 6500  # issue #16: the figures the one-server-stack redesign must hold, guard on and off
GOAL16_CPU_US = 100.0  # the Rust routers measure 45-55 us (issue #16)
GOAL16_VS_NGINX_MS = 0.15
HEADERS = ["goal", "target", "measured", "met", "others on cores P/L"]


def rows(args, lat: list[list], thr: list[list], sse: list[list], routing: list[list]) -> list[list]:
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    rows = []
    nginx = next((r for r in lat if r[0] == "nginx" and r[1] == "short" and r[5] != "-"), None)
    for name in (v.name for v in VARIANTS if v.goal):
        row = next((r for r in lat if r[0] == name and r[1] == "short"), None)
        if row and row[5] != "-" and nginx:
            gap = round(row[5] - nginx[5], 3)
            rows.append([f"added p50 at {args.rate:.0f} req/s vs nginx's ({name})", f"<= +{GOAL16_VS_NGINX_MS} ms",
                         f"+{gap} ms ({row[5]} vs {nginx[5]})", yes(gap <= GOAL16_VS_NGINX_MS), row[8]])
        if row and row[5] != "-":
            rows.append([f"added p50 at {args.rate:.0f} req/s ({name})", f"<= {GOAL_ADDED_P50_MS} ms", f"{row[5]} ms",
                         yes(row[5] <= GOAL_ADDED_P50_MS), row[8]])
            rows.append([f"added p99 at {args.rate:.0f} req/s ({name})", f"<= {GOAL_ADDED_P99_MS} ms", f"{row[6]} ms",
                         yes(row[6] <= GOAL_ADDED_P99_MS), row[8]])
        row = next((r for r in thr if r[0] == name), None)
        if row and row[1] != "-":
            rows.append([f"non-streaming req/s on one core ({name})", f">= {GOAL16_RPS} (#16; {GOAL_RPS} before)",
                         row[1], yes(row[1] >= GOAL16_RPS), row[6]])
            if row[5] != "-":
                rows.append([f"balancer CPU per request at saturation ({name})", f"<= {GOAL16_CPU_US:g} us",
                             f"{row[5]} us", yes(row[5] <= GOAL16_CPU_US), row[6]])
        row = next((r for r in sse if r[0] == name), None)
        if row and row[1] != "-":
            rows.append([f"relayed SSE chunks/s ({name})", f">= {GOAL_SSE}", row[1], yes(row[1] >= GOAL_SSE), row[5]])
    for row in routing:
        rows.append([f"routing decision p50, 8k tokens ({row[0]})", f"<= {GOAL_DECISION_US} us", f"{row[5]} us",
                     row[-1], "-"])
    return rows


def print_report(rows: list[list], stem: str, extra: dict) -> None:
    report("Goals (kvfleet balancer); last column: CPU that other work on this machine took from the proxy's "
           "core / the load core during that run (0% / 0% = a clean run)", HEADERS, rows, out=f"{stem}_goals.json",
           extra=extra)
