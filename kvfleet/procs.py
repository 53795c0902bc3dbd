"""Start a process as a real subprocess and wait until it serves: the one process launcher, used
by the demo, `kvfleet fleet up`, `kvfleet calibrate --mode served` and the test/bench harness
(harness/, which builds on it for fake backends, nginx and other routers).

A process is ready once it prints a line matching `ready` on stdout; kvfleet's own print
"listening on http://HOST:PORT [kv-events=... kv-replay=...]" and keep their logs on stderr
(kvfleet/logs.py). A thread reads the child's stdout until it closes, keeping the last lines for
error messages, so a chatty child never blocks on a full pipe; the thread ends with the child.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"listening on (http://\S+)")
_EVENTS = re.compile(r"kv-events=(\S+)")
_REPLAY = re.compile(r"kv-replay=(\S+)")


@dataclass
class Proc:
    popen: subprocess.Popen
    url: str | None = None  # group 1 of the ready line (None: started without waiting for one)
    events: str | None = None  # bound KV-event PUB endpoint, when the process publishes
    replay: str | None = None
    name: str = ""
    log: deque[str] = field(default_factory=lambda: deque(maxlen=50))  # last lines of its stdout
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def replica_arg(self) -> str:
        """`URL[=EVENTS[,REPLAY]]` as `kvfleet balancer --replica` takes it."""
        if not self.events:
            return self.url
        return f"{self.url}={self.events}" + (f",{self.replay}" if self.replay else "")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 5) -> str:
        return " | ".join(list(self.log)[-n:])

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGTERM), wait, SIGKILL if it will not go. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait()
        if self.reader is not None:
            self.reader.join(timeout=1.0)  # a grandchild may still hold the pipe: do not wait on it
        return code


def _read(proc: Proc, ready: re.Pattern | None, found: list[re.Match], seen: threading.Event) -> None:
    for line in proc.popen.stdout:
        proc.log.append(line.rstrip("\n"))
        if ready is not None and not found:
            m = ready.search(line)
            if m:
                found.append(m)
                seen.set()
    seen.set()  # stdout closed: the child exited


def launch(cmd: list[str], *, name: str | None = None, ready: re.Pattern | None = READY, timeout: float = 120.0,
           env: dict[str, str] | None = None, cwd: str | None = None, stderr: str | Path | int | None = None,
           core: int | None = None, nice: int = 0) -> Proc:
    """Run `cmd` and, with `ready`, return once it prints a line `ready` matches (group 1 is the
    URL). stderr: None inherits this process's; a path writes it to that file (as a deployment
    keeps a log); subprocess.STDOUT keeps it with stdout (`Proc.log`). core: pin the child to it;
    nice: renice it by this much (negative: higher priority, needs root)."""
    name = name or " ".join(cmd[:3])
    err = open(stderr, "w") if isinstance(stderr, (str, Path)) else stderr  # noqa: SIM115 - the child owns it

    def placement() -> None:  # in the child, before exec
        if core is not None:
            os.sched_setaffinity(0, {core})
        if nice:
            os.nice(nice)

    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                             preexec_fn=placement if core is not None or nice else None)
    if isinstance(stderr, (str, Path)):
        err.close()
    proc = Proc(popen, name=name)
    found: list[re.Match] = []
    seen = threading.Event()
    proc.reader = threading.Thread(target=_read, args=(proc, ready, found, seen), daemon=True,
                                   name=f"stdout of {name}")
    proc.reader.start()
    if ready is None:
        return proc
    if not seen.wait(timeout):
        proc.stop(timeout=5)
        raise RuntimeError(f"{name} was not ready within {timeout:.0f} s: {proc.tail() or 'it printed nothing'}")
    if not found:
        code = popen.wait()
        where = {None: "see its log above", subprocess.STDOUT: proc.tail()}.get(stderr, f"its log: {stderr}")
        raise RuntimeError(f"{name} exited with code {code} before it was ready; {where}")
    m = found[0]
    line = m.string
    ev, rp = _EVENTS.search(line), _REPLAY.search(line)
    proc.url = m.group(1)
    proc.events, proc.replay = (ev.group(1) if ev else None), (rp.group(1) if rp else None)
    return proc


def start(args: list[str], timeout: float = 120.0, env: dict[str, str] | None = None,
          stderr: str | Path | int | None = None, core: int | None = None) -> Proc:
    """Run `python -m kvfleet.cli ARGS` and return once it prints its listening URL."""
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin-wait starve each other when several
    # replicas share a few cores (measured: up to 60x slower steps on 2 cores).
    full_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(env or {})}
    return launch([sys.executable, "-m", "kvfleet.cli", *args], name=f"`kvfleet {' '.join(args)}`", timeout=timeout,
                  env=full_env, stderr=stderr, core=core)


def start_all(arg_lists: list[list[str]], timeout: float = 120.0, env: dict[str, str] | None = None) -> list[Proc]:
    """`start` each ARGS at the same time (one thread each: a start is mostly the child's imports,
    so N of them take about as long as one on N free cores); the Procs in `arg_lists`' order. If
    any fails, the others that started are stopped and the first error is raised."""
    with ThreadPoolExecutor(max_workers=max(1, len(arg_lists))) as pool:
        futures = [pool.submit(start, args, timeout, env) for args in arg_lists]
    started, errors = [], []
    for f in futures:
        try:
            started.append(f.result())
        except Exception as e:  # noqa: BLE001 - re-raised below, once the others are stopped
            errors.append(e)
    if errors:
        for p in started:
            p.stop()
        raise errors[0]
    return started
