"""A local fleet for a user or a test: N replicas (torch or sim) publishing KV events, and a
balancer in front, all real subprocesses on loopback. `LocalFleet` is a context manager; every
process it started is stopped on exit, whatever happened."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvfleet import procs


@dataclass(frozen=True)
class FleetSpec:
    replicas: int = 2
    engine: str = "torch"  # or "sim"
    policy: str = "precise_prefix"
    host: str = "127.0.0.1"
    balancer_port: int = 8080
    replica_args: tuple[str, ...] = ("--model", "tiny", "--num-blocks", "512", "--threads", "1")
    balancer_args: tuple[str, ...] = ()
    events: bool = True

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("a fleet needs at least one replica")
        if self.engine not in ("torch", "sim"):
            raise ValueError("engine must be torch or sim")


@dataclass
class LocalFleet:
    spec: FleetSpec
    replicas: list[procs.Proc] = field(default_factory=list)
    balancer: procs.Proc | None = None

    def __enter__(self) -> "LocalFleet":
        try:
            self.start_replicas()
            self.start_balancer(self.spec.policy)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_replicas(self) -> None:
        s = self.spec
        args = ["replica", "--host", s.host, "--port", "0", "--engine", s.engine, *s.replica_args]
        if s.events:
            args += ["--kv-events-endpoint", f"tcp://{s.host}:0", "--kv-events-replay-endpoint", f"tcp://{s.host}:0"]
        with ThreadPoolExecutor(max_workers=s.replicas) as pool:
            futures = [pool.submit(procs.start, args) for _ in range(s.replicas)]
            errors = []
            for f in futures:
                try:
                    self.replicas.append(f.result())
                except Exception as e:  # keep the ones that started, so stop() ends them
                    errors.append(e)
        if errors:
            raise errors[0]

    def start_balancer(self, policy: str, port: int | None = None) -> procs.Proc:
        s = self.spec
        args = ["balancer", "--host", s.host, "--port", str(s.balancer_port if port is None else port),
                "--policy", policy, *s.balancer_args]
        for r in self.replicas:
            args += ["--replica", r.replica_arg]
        self.balancer = procs.start(args)
        return self.balancer

    def stop_balancer(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
            self.balancer = None

    def reset_caches(self) -> None:
        """Empty every replica's prefix cache (between benchmark runs)."""
        for r in self.replicas:
            req = urllib.request.Request(r.url + "/reset_prefix_cache", data=b"", method="POST")
            urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        self.stop_balancer()
        for r in self.replicas:
            r.stop()
        self.replicas.clear()

    def describe(self) -> dict:
        return {"balancer": self.balancer.url if self.balancer else None,
                "replicas": [{"url": r.url, "events": r.events, "replay": r.replay} for r in self.replicas]}

    def dumps(self) -> str:
        return json.dumps(self.describe(), indent=2)
