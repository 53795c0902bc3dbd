"""Shared by the benchmark scripts: what machine this is, and how to print a table."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "python": sys.version.split()[0], "os": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def report(title: str, headers: list[str], rows: list[list], out: str | None = None, extra: dict | None = None) -> None:
    info = machine()
    print(f"\n## {title}\n")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print()
    print(table(headers, rows))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"title": title, "machine": info, "headers": headers, "rows": rows,
                                         **(extra or {})}, indent=2))


ROUTING_MODES = ("own", "consistent", "own+arrival", "consistent+arrival")


def routing_mode(mode: str) -> tuple[bool, bool]:
    """A several-balancer benchmark's mode: (consistent routing, replicas report on arrival).
    `own`: each instance counts its own sends (the default balancer); `consistent`: shared state
    only (--consistent-routing); `+arrival`: the replicas' --load-report-on-arrival."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {', '.join(ROUTING_MODES)}; got {mode!r}")
    routing, _, arrival = mode.partition("+")
    return routing == "consistent", bool(arrival)


def load_sweep_spec(ap, path: str, example: str):
    """The sweep file at `path` and its workloads by name; a missing or bad file is an argparse
    error (exit 2) naming `example`, a sweep file to pass instead."""
    from simulator.sweep import load_spec

    try:
        spec = load_spec(path)
    except (FileNotFoundError, ValueError) as e:
        ap.error(f"{e}; pass --spec with a sweep file such as {example}")
    return spec, {w.name: w for w in spec.workloads}
