"""Start kvfleet processes as real subprocesses and wait until they serve (used by the demo,
`fleet up` and the tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

_READY = re.compile(r"listening on (http://\S+)")
_EVENTS = re.compile(r"kv-events=(\S+)")
_REPLAY = re.compile(r"kv-replay=(\S+)")


@dataclass
class Proc:
    popen: subprocess.Popen
    url: str
    events: str | None = None  # bound KV-event PUB endpoint, when the process publishes
    replay: str | None = None

    @property
    def replica_arg(self) -> str:
        """`URL[=EVENTS[,REPLAY]]` as `kvfleet balancer --replica` takes it."""
        if not self.events:
            return self.url
        return f"{self.url}={self.events}" + (f",{self.replay}" if self.replay else "")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if it will not go. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def start(args: list[str], timeout: float = 120.0, env: dict[str, str] | None = None) -> Proc:
    """Run `python -m kvfleet.cli ARGS` and return once it prints its listening URL."""
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin-wait starve each other when several
    # replicas share a few cores (measured: up to 60x slower steps on 2 cores).
    full_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        [sys.executable, "-m", "kvfleet.cli", *args],
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env=full_env,
    )
    deadline = time.monotonic() + timeout
    assert popen.stdout is not None
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            code = popen.wait()
            raise RuntimeError(f"`kvfleet {' '.join(args)}` exited with code {code} before it was ready; see its log above")
        m = _READY.search(line)
        if m:
            ev, rp = _EVENTS.search(line), _REPLAY.search(line)
            return Proc(popen, m.group(1), ev.group(1) if ev else None, rp.group(1) if rp else None)
    popen.kill()
    raise RuntimeError(f"`kvfleet {' '.join(args)}` was not ready within {timeout:.0f} s")
