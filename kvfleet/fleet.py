"""A local fleet for a user or a test: N replicas (torch or sim) publishing KV events, and a
balancer in front, all real subprocesses on loopback, and optionally a real Prometheus scraping
them. `LocalFleet` is a context manager; every process it started is stopped on exit, whatever
happened.

Prometheus finds the fleet through file-based service discovery: the fleet rewrites the targets
files (atomically) whenever a replica or the balancer comes or goes (kvfleet/prometheus.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from kvfleet import procs
from kvfleet.prometheus import PrometheusConfig, PrometheusServer, write_targets
from protocol.roles import BOTH, DECODE, PREFILL


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
    prometheus: PrometheusConfig | None = None  # also run a Prometheus scraping the fleet
    targets_dir: str | None = None  # also keep file_sd targets here (for a Prometheus of your own)
    # Prefill/decode disaggregation: the first `prefill` replicas run `--role prefill`, the next
    # `decode` ones `--role decode`, the rest `both` (replica/kv_transfer.py; torch engine only).
    prefill: int = 0
    decode: int = 0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("a fleet needs at least one replica")
        if self.engine not in ("torch", "sim"):
            raise ValueError("engine must be torch or sim")
        if self.prefill < 0 or self.decode < 0 or self.prefill + self.decode > self.replicas:
            raise ValueError(f"prefill ({self.prefill}) + decode ({self.decode}) replicas must be non-negative and "
                             f"at most --replicas ({self.replicas})")
        if self.prefill + self.decode and self.engine != "torch":
            raise ValueError("prefill/decode replicas hand over KV tensors: use --engine torch")

    def roles(self) -> list[str]:
        return [PREFILL] * self.prefill + [DECODE] * self.decode + [BOTH] * (self.replicas - self.prefill - self.decode)


@dataclass
class LocalFleet:
    spec: FleetSpec
    replicas: list[procs.Proc] = field(default_factory=list)
    balancer: procs.Proc | None = None
    prometheus: PrometheusServer | None = None

    def __enter__(self) -> "LocalFleet":
        try:
            if self.spec.prometheus is not None:  # no binary: say so before starting anything
                self.prometheus = PrometheusServer(self.spec.prometheus)
            self.start_replicas()
            self.start_balancer(self.spec.policy)
            if self.prometheus is not None:
                self.prometheus.start()
                self.sync_targets()
                self.prometheus.wait_for_targets([self.balancer.url] + [r.url for r in self.replicas])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _replica_args(self, role: str = BOTH) -> list[str]:
        s = self.spec
        args = ["replica", "--host", s.host, "--port", "0", "--engine", s.engine, *s.replica_args]
        if s.events:
            args += ["--kv-events-endpoint", f"tcp://{s.host}:0", "--kv-events-replay-endpoint", f"tcp://{s.host}:0"]
        if role != BOTH:
            args += ["--role", role, "--kv-transfer-host", s.host]
        if s.prefill or s.decode:  # every replica may decode a pair's request: it pulls from this host's peers
            args += ["--kv-transfer-peers", s.host]
        return args

    def start_replicas(self) -> None:
        self.replicas.extend(procs.start_all([self._replica_args(role) for role in self.spec.roles()]))
        self.sync_targets()

    def start_balancer(self, policy: str, port: int | None = None) -> procs.Proc:
        s = self.spec
        args = ["balancer", "--host", s.host, "--port", str(s.balancer_port if port is None else port),
                "--policy", policy, *s.balancer_args]
        for r in self.replicas:
            args += ["--replica", r.replica_arg]
        self.balancer = procs.start(args)
        self.sync_targets()
        return self.balancer

    def stop_balancer(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
            self.balancer = None
            self.sync_targets()

    def add_replica(self) -> procs.Proc:
        """Start one more replica, register it with the balancer, and tell Prometheus."""
        proc = procs.start(self._replica_args())
        self.replicas.append(proc)
        self.sync_targets()
        if self.balancer is not None:
            body = {"url": proc.url, "events": proc.events, "replay": proc.replay}
            req = urllib.request.Request(self.balancer.url + "/admin/replicas", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(req, timeout=30).read()
        return proc

    def remove_replica(self, proc: procs.Proc, drain_timeout_s: float = 30.0) -> None:
        """Take a replica out of the balancer (draining its requests), stop it, and tell Prometheus.
        Works on a replica that already died."""
        if self.balancer is not None:
            query = urllib.parse.urlencode({"replica": proc.url, "timeout": drain_timeout_s})
            req = urllib.request.Request(f"{self.balancer.url}/admin/replicas?{query}", method="DELETE")
            try:
                urllib.request.urlopen(req, timeout=drain_timeout_s + 30).read()
            except urllib.error.HTTPError as e:
                if e.code != 404:  # 404: the balancer no longer knows it
                    raise
        proc.stop()
        self.replicas.remove(proc)
        self.sync_targets()

    def sync_targets(self) -> None:
        """Rewrite the file_sd targets (balancer, replicas) for Prometheus; atomic per file."""
        balancers = [self.balancer.url] if self.balancer else []
        replicas = [r.url for r in self.replicas]
        if self.prometheus is not None and self.prometheus.dir is not None:
            self.prometheus.set_targets(balancers, replicas)
        if self.spec.targets_dir:
            write_targets(self.spec.targets_dir, balancers, replicas)

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
        self.sync_targets()
        if self.prometheus is not None:
            self.prometheus.stop()

    def describe(self) -> dict:
        return {"balancer": self.balancer.url if self.balancer else None,
                "replicas": [{"url": r.url, "events": r.events, "replay": r.replay} for r in self.replicas],
                "prometheus": self.prometheus.url if self.prometheus else None}

    def dumps(self) -> str:
        return json.dumps(self.describe(), indent=2)
