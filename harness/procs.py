"""Processes for tests and benchmarks: the product's launcher (kvfleet/procs.py: `start` runs
`python -m kvfleet.cli ARGS`, `launch` any command, both waiting for the ready line), and what a
harness reads about a running process from /proc (CPU seconds, RSS, descriptors by kind)."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

from kvfleet.procs import READY, Proc, launch, start, start_all  # noqa: F401 - the one launcher, re-exported

__all__ = ["READY", "Proc", "launch", "start", "start_all", "free_port", "wait_serving", "cpu_seconds",
           "core_busy_seconds", "proc_stats", "fd_breakdown"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process that cannot be told to pick its own (--port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(url: str, proc: Proc, timeout: float = 60.0, model: str = "tiny",
                 headers: dict[str, str] | None = None) -> None:
    """Poll POST /v1/completions until it answers 200 (bounded by timeout): for a process that
    prints no ready line (nginx, another router) or serves only once its upstream answers."""
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 16}).encode()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            req = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json", **(headers or {})})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not serve within {timeout:.0f} s ({last})")


# ---------------------------------------------------------------------------------- /proc

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


def core_busy_seconds(core: int | None) -> float:
    """Busy (non-idle, non-iowait) seconds of one core since boot, from /proc/stat."""
    if core is None:
        return 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            v = [int(x) for x in line.split()[1:]]
            return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def proc_stats(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open descriptors) of a live process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _tcp_ports() -> dict[str, tuple[int, int]]:
    """socket inode -> (local port, remote port), for every TCP socket in this namespace."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, inode = parts[1], parts[2], parts[9]
                    out[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return out


def fd_breakdown(pid: int, listen_port: int, upstream_ports: set[int]) -> dict[str, int]:
    """A process's descriptors by what they are: `client` (connections accepted on
    `listen_port`), `upstream` (HTTP connections to `upstream_ports`: a keep-alive pool whose
    size follows the load's peak concurrency) and `other` (listening socket, ZMQ sockets,
    files, pipes, epoll). A leak shows as `client` not going back to 0 once the clients are
    gone, or `other` growing."""
    ports = _tcp_ports()
    counts = {"client": 0, "upstream": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        lp_rp = ports.get(target[8:-1]) if target.startswith("socket:[") else None
        if lp_rp is not None and lp_rp[0] == listen_port and lp_rp[1] != 0:
            counts["client"] += 1
        elif lp_rp is not None and lp_rp[1] in upstream_ports:
            counts["upstream"] += 1
        else:
            counts["other"] += 1
    return counts
