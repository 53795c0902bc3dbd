"""`--profile`: where the kvfleet balancer's CPU goes under load, phase by phase (a fixed rate, max
rate with a short and an 8k-token prompt, SSE): py-spy (sampling, on-CPU only) when it can be
found (--py-spy PATH or on PATH), else cProfile (call counts; inflates small functions)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.balancer import rig
from bench.balancer.measure import client_spec, measured, pin, run_client, run_wrk
from bench.balancer.rig import MODEL, ROOT, Target
from bench.common import report
from harness import procs


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


def run(args, backend_url: str, backend_pid: int, wrk: str | None) -> None:
    """Where the balancer's CPU goes under load: py-spy (sampling, on-CPU only) when it can be found
    (--py-spy PATH or on PATH), else cProfile (call counts; inflates small functions)."""
    import pstats

    pyspy = args.py_spy or shutil.which("py-spy")
    variant = next((v for v in rig.VARIANTS if v.key == args.profile_variant), None)
    flags = variant.flags if variant else ("--policy", args.profile_policy)
    label = variant.name if variant else f"kvfleet balancer ({args.profile_policy})"
    tmp = Path(tempfile.mkdtemp(prefix="kvfleet-prof-"))
    phases = [(f"non-streaming at {args.rate:.0f} req/s", "rate", rig.body(rig.SHORT_PROMPT)),
              ("non-streaming at max rate", "max", rig.body(rig.SHORT_PROMPT)),
              ("non-streaming 8k-token prompt at max rate", "max", rig.body(rig.LONG_PROMPT)),
              (f"SSE {args.sse_streams} x {args.sse_chunks} events", "sse",
               rig.body(rig.SHORT_PROMPT, True, args.sse_chunks))]
    for k, (phase, kind, body) in enumerate(phases):
        prof = tmp / f"phase{k}.prof"
        cmd = [sys.executable, "-m", "kvfleet.cli", "balancer", "--port", "0", "--model", MODEL,
               "--replica", backend_url, *flags]
        if not pyspy:
            cmd[1:1] = ["-m", "cProfile", "-o", str(prof)]
        proc = procs.launch(cmd, name="kvfleet (profiled)", core=args.proxy_core, cwd=str(ROOT), timeout=60,
                            stderr=subprocess.STDOUT)
        url = proc.url
        spy = None
        try:
            headers = dict(variant.headers) if variant else {}
            procs.wait_serving(url, proc, model=MODEL, headers=headers)
            t = Target("kvfleet", url, proc, headers=headers)
            if pyspy:
                spy = subprocess.Popen([pyspy, "record", "--format", "raw", "--function", "--rate", "250", "-d",
                                        str(max(1, round(args.duration))), "-o", str(tmp / f"phase{k}.txt"),
                                        "--pid", str(proc.pid)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.STDOUT, preexec_fn=pin(args.load_core))
            if kind == "rate":
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_client(
                    client_spec("latency", t, body, rate=args.rate, duration=args.duration, warmup=0.0),
                    args.load_core, args.duration + 60))
                what = f"p50 {res['p50_ms']:.3f} ms"
            elif kind == "sse":
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_client(
                    client_spec("sse", t, body, streams=args.sse_streams, chunks=args.sse_chunks,
                                duration=args.duration, max_streams=2000), args.load_core, args.duration + 120))
                what = f"{res['chunks_per_s']:.0f} chunks/s"
            elif wrk:
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_wrk(
                    wrk, t, body, args.duration, args.connections, args.load_core))
                what = f"{res['rps']:.0f} req/s"
            else:
                res, use = measured(t, backend_pid, (args.proxy_core, args.load_core), lambda: run_client(
                    client_spec("closed", t, body, concurrency=args.connections, duration=args.duration,
                                max_requests=1_000_000), args.load_core, args.duration + 60))
                what = f"{res['rps']:.0f} req/s"
            if spy is not None:
                spy.wait(timeout=args.duration + 60)
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            proc.stop(timeout=30, sig=signal.SIGINT)
        tool = "py-spy" if pyspy else "cProfile"
        print(f"\n## {label} under {phase} load: {what} under {tool}, "
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
