"""Balancer configuration: frozen dataclasses, from flags and/or a TOML or JSON file."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from balancer.fairness import FairnessConfig
from balancer.guard import GuardConfig
from balancer.sessions import SessionConfig
from protocol.curve import load_public_key
from protocol.roles import check_role


INDEX_SOURCES = ("events", "digests", "both")


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica: its HTTP base URL and, optionally, its KV-event endpoints."""

    url: str
    events: str | None = None  # ZMQ PUB endpoint, e.g. tcp://10.0.0.5:5557
    replay: str | None = None  # ZMQ ROUTER replay endpoint, e.g. tcp://10.0.0.5:5558
    topic: str = ""  # KV-event topic (vLLM's default: empty)
    # The replica's CURVE public key (Z85 text, or a file written by `kvfleet keys`): the KV-event
    # sockets then talk only to the holder of the matching secret key. None: the fleet default.
    curve_server_key: str | None = None
    # Its part in prefill/decode disaggregation (prefill | decode | both), for a replica that does
    # not report one (a vLLM P/D server: vLLM publishes no kvfleet load reports). None: the role
    # its load reports say ("both" until one does); a configured role wins over reports.
    role: str | None = None

    def __post_init__(self) -> None:
        if self.role is not None:
            check_role(self.role)
        for name in ("url", "events", "replay", "topic", "curve_server_key"):
            v = getattr(self, name)
            if not isinstance(v, str) and not (v is None and name not in ("url", "topic")):
                raise ValueError(f"replica {name} must be a string, got {type(v).__name__}")
        u = urlparse(self.url)
        try:
            u.port  # noqa: B018 - raises ValueError for a port outside 0..65535
        except ValueError:
            raise ValueError(f"replica URL has an invalid port: {self.url!r}") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"replica URL must look like http://host:port, got {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        for name in ("events", "replay"):
            v = getattr(self, name)
            if v is not None and not v.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"{name} endpoint must be a ZMQ address like tcp://host:5557, got {v!r}")
        if self.curve_server_key is not None:  # a key file is read now, so a bad one fails at once
            object.__setattr__(self, "curve_server_key", load_public_key(self.curve_server_key).decode())

    @property
    def replica_id(self) -> str:
        return self.url

    @classmethod
    def parse(cls, text: str) -> "ReplicaSpec":
        """`[ROLE@]URL[=EVENTS[,REPLAY]]`, e.g. `http://h:8000=tcp://h:5557,tcp://h:5558` or
        `prefill@http://h:8100` (ROLE: prefill, decode or both)."""
        role, at, rest = text.partition("@")
        if not at or "://" in role:  # no role prefix (an `@` further on belongs to the URL)
            role, rest = None, text
        url, _, ev = rest.partition("=")
        events, _, replay = ev.partition(",")
        return cls(url=url, events=events or None, replay=replay or None, role=role)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 0.5  # active /health polling period
    timeout_s: float = 1.0
    unhealthy_after: int = 2  # consecutive failed polls
    healthy_after: int = 1  # consecutive good polls to come back

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("health interval and timeout must be positive")
        if self.unhealthy_after < 1 or self.healthy_after < 1:
            raise ValueError("health thresholds must be at least 1")


@dataclass(frozen=True)
class BreakerConfig:
    failures_to_open: int = 3  # consecutive 5xx / timeouts (a refused connection opens at once)
    open_s: float = 5.0  # then one trial request (half-open) may go

    def __post_init__(self) -> None:
        if self.failures_to_open < 1 or self.open_s <= 0:
            raise ValueError("breaker needs failures_to_open >= 1 and open_s > 0")


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 3  # replicas tried for one request before the first byte
    backoff_s: float = 0.02  # doubled per attempt
    backoff_max_s: float = 0.5
    failover: bool = True  # continue a stream on another replica when its replica is lost
    # A stream is continued only where that is exact (greedy, one sequence, no logprobs: see
    # protocol.openai_api.parse_for_routing) and it has at most this many stop strings (each
    # continuation repeats them; one straddling the failover point is not detected). A longer
    # list is forwarded as it is, not refused: the stream just is not continued if it breaks.
    failover_max_stop: int = 64
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0  # longest silence from a replica inside a response

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff must be non-negative")
        if self.failover_max_stop < 0:
            raise ValueError("failover_max_stop must be >= 0")


@dataclass(frozen=True)
class AuditConfig:
    """Decision accounting (balancer/audit.py)."""

    keep: int = 1000  # decisions kept for GET /admin/decisions
    mismatch_min_tokens: int = 32  # a prediction below this many cached tokens is never a mismatch
    mismatch_ratio: float = 0.5  # delivered below this share of the prediction is a mismatch
    warn_every_s: float = 10.0  # at most one warning per replica this often (the counter counts all)

    def __post_init__(self) -> None:
        if self.keep < 0 or self.mismatch_min_tokens < 1 or not 0 < self.mismatch_ratio <= 1:
            raise ValueError("audit: keep >= 0, mismatch_min_tokens >= 1 and 0 < mismatch_ratio <= 1")


@dataclass(frozen=True)
class DnsConfig:
    """A name (e.g. a Kubernetes headless service) whose addresses are the replicas."""

    name: str  # host:port
    interval_s: float = 5.0
    events_port: int | None = None  # ZMQ PUB port on every address
    replay_port: int | None = None

    def __post_init__(self) -> None:
        host, _, port = self.name.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"DNS name must be host:port, got {self.name!r}")


@dataclass(frozen=True)
class InferencePoolConfig:
    """A Gateway API Inference Extension `InferencePool` whose Ready pods are the replicas
    (balancer/inference_pool.py), read through the Kubernetes API."""

    namespace: str
    name: str
    # A kubeconfig file; None: the pod's service account (in-cluster), else $KUBECONFIG or
    # ~/.kube/config, as kubectl does.
    kubeconfig: str | None = None
    context: str | None = None  # a context of the kubeconfig (None: its current-context)
    # KV-event ports on every pod; None: the pod's container port named `kv-events` / `kv-replay`
    # (the chart names them so), else the replica publishes none.
    events_port: int | None = None
    replay_port: int | None = None
    # Each pod watch ends after this long; then the pool is read again (a changed selector or
    # port re-lists the pods). Also the retry period while the API server cannot be reached.
    resync_s: float = 30.0

    def __post_init__(self) -> None:
        dns1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
        for what in ("namespace", "name"):
            v = getattr(self, what)
            if not isinstance(v, str) or not dns1123.match(v) or len(v) > 253:
                raise ValueError(f"inference pool {what} must be a Kubernetes name (lower-case letters, digits, "
                                 f"'-', '.'), got {v!r}; give the pool as NAMESPACE/NAME")
        for what in ("events_port", "replay_port"):
            v = getattr(self, what)
            if v is not None and not 0 < v < 65536:
                raise ValueError(f"inference pool {what} must be in [1, 65535], got {v}")
        if not self.resync_s > 0:
            raise ValueError(f"inference pool resync_s must be positive, got {self.resync_s}")

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str, **kw: Any) -> "InferencePoolConfig":
        """`NAMESPACE/NAME`, e.g. `default/llama-pool`."""
        namespace, sep, name = text.partition("/")
        if not sep:
            raise ValueError(f"inference pool must be NAMESPACE/NAME (e.g. default/my-pool), got {text!r}")
        return cls(namespace=namespace, name=name, **kw)


@dataclass(frozen=True)
class BalancerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    replicas: tuple[ReplicaSpec, ...] = ()
    dns: tuple[DnsConfig, ...] = ()
    inference_pool: InferencePoolConfig | None = None  # replicas from an InferencePool's pods
    policy: str = "precise_prefix"
    policy_options: tuple[tuple[str, Any], ...] = ()
    model: str | None = None  # served model name; None = ask the first replica
    block_size: int = 16
    tokenizer: str | None = None  # None/"byte" = built-in; else a local tokenizer.json
    max_body_bytes: int = 16 * 1024 * 1024
    health: HealthConfig = field(default_factory=HealthConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)  # sticky sessions (balancer/sessions.py)
    approx_ttl_s: float = 300.0  # approximate index entries for replicas that publish no events
    approx_capacity_blocks: int = 100_000
    load_poll_s: float = 0.5  # GET /load for replicas without a load-report stream
    # Where each replica's cached prefix comes from (balancer/digest_index.py): "events" (the
    # exact index from its KV-event stream), "digests" (only its periodic cache digest: no event
    # stream is followed, for fleets too large to follow them all), or "both" (events, and the
    # digest while the event index is not exact yet, e.g. a balancer that joined late).
    index_source: str = "events"
    # A digest older than this (seconds since it arrived) is not routed from: ask the replica for
    # a fresh one. Set it above the replicas' --kv-digest-interval.
    digest_max_age_s: float = 30.0
    digest_request_timeout_s: float = 2.0  # no answer to a digest request: ask again
    # From a send to the request being in the replica's queue (the hop, the replica's parsing
    # and tokenizing): a load report made sooner after a send cannot hold it yet, so the policy
    # keeps counting the send on top of that report (balancer/registry.py). The simulator uses
    # its request latency here.
    report_transit_s: float = 0.005
    # API keys, per-key limits, admission queue, max_tokens cap (balancer/guard.py). In a config
    # file its keys may also stand at the top level (e.g. `api_keys = ["..."]`).
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Request classes, priorities, per-tenant weighted fair queueing in tokens and early 429s
    # (balancer/fairness.py); `[fairness]` in a config file, classes as `[fairness.classes.NAME]`.
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    replica_api_key: str | None = None  # sent to the replicas as a Bearer token (their --api-key)
    # CURVE for the KV-event sockets (protocol/curve.py): the replicas' public key (Z85 or a key
    # file) for replicas whose spec names none, and this balancer's secret key file (None: a
    # fresh keypair per process).
    curve_server_key: str | None = None
    curve_client_key_file: str | None = None
    predictor: str = "ensemble"  # output-length predictor (predictors.make_predictor), or "none"
    # Return freed heap memory to the OS this often (glibc malloc_trim; balancer/memtrim.py), so
    # that RSS does not ratchet up with each burst of concurrency; 0 = never.
    memory_trim_s: float = 30.0
    # Serve every route on the lean HTTP front-end (balancer/front.py); false: aiohttp serves the
    # same route table (for comparison).
    fast_path: bool = True
    # A request naming a LoRA adapter goes to a replica that holds it resident unless even the
    # least busy of those has more than this many requests in flight beyond the least busy
    # replica that would have to load it (balancer/policies/base.py `adapter_candidates`;
    # policies that price the load themselves, `predictive`, see every replica).
    lora_slack: int = 8
    # Several balancer or picker instances in front of the same replicas, uncoordinated: decide
    # only from what every instance shares (the replicas' load reports and KV events), never
    # from this instance's own requests in flight or sent since a report, so that the same
    # request gets the same replica from any instance (balancer/router.py, docs/benchmarks.md
    # for what it costs in TTFT). Off: a single instance, which counts its own sends.
    consistent_routing: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.block_size < 1:
            raise ValueError("block_size must be positive")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.lora_slack < 0:
            raise ValueError(f"lora_slack must be >= 0 (requests in flight), got {self.lora_slack}")
        if self.index_source not in INDEX_SOURCES:
            raise ValueError(f"index_source must be one of {INDEX_SOURCES}, got {self.index_source!r}")
        if self.digest_max_age_s <= 0 or self.digest_request_timeout_s <= 0:
            raise ValueError("digest_max_age_s and digest_request_timeout_s must be positive")
        if self.memory_trim_s < 0:
            raise ValueError(f"memory_trim_s must be >= 0 (0 disables it), got {self.memory_trim_s}")
        if self.fairness.enabled and self.guard.max_inflight_per_replica:
            raise ValueError("the fair admission queue (fairness) and the guard's FIFO admission queue "
                             "(max_inflight_per_replica) are both on: use fairness.max_inflight_per_replica "
                             "(--fair-max-inflight-per-replica) alone")
        ids = [r.replica_id for r in self.replicas]
        if len(ids) != len(set(ids)):
            raise ValueError("a replica URL is listed twice")
        if self.replica_api_key is not None and (not isinstance(self.replica_api_key, str) or not self.replica_api_key):
            raise ValueError("replica_api_key must be a non-empty string")
        if self.curve_server_key is not None:
            object.__setattr__(self, "curve_server_key", load_public_key(self.curve_server_key).decode())
        if self.curve_client_key_file is not None and self.curve_server_key is None and not any(
                r.curve_server_key for r in self.replicas):
            raise ValueError("curve_client_key_file is set but no replica CURVE server key is: set curve_server_key")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "BalancerConfig":
        """Read a TOML (.toml) or JSON file; keys are this class's field names."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read config file {p}: {e}") from None
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> "BalancerConfig":
        known = {f.name for f in fields(cls)}
        guard_keys = GuardConfig.field_names()
        unknown = set(raw) - known - guard_keys
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(known | guard_keys)}")
        kw: dict[str, Any] = {k: v for k, v in raw.items() if k not in guard_keys}
        lifted = {k: v for k, v in raw.items() if k in guard_keys}
        if lifted or "guard" in kw:
            g = kw.get("guard") or {}
            if not isinstance(g, dict):
                raise ValueError("guard must be a table of GuardConfig keys")
            try:
                kw["guard"] = GuardConfig(**{**g, **lifted})
            except TypeError as e:
                raise ValueError(f"guard: {e}") from None
        if "replicas" in kw:
            kw["replicas"] = tuple(ReplicaSpec.parse(r) if isinstance(r, str) else ReplicaSpec(**r) for r in kw["replicas"])
        if "dns" in kw:
            kw["dns"] = tuple(DnsConfig(name=d) if isinstance(d, str) else DnsConfig(**d) for d in kw["dns"])
        pool = kw.get("inference_pool")
        if isinstance(pool, str):
            kw["inference_pool"] = InferencePoolConfig.parse(pool)
        elif isinstance(pool, dict):
            pool = dict(pool)
            try:
                kw["inference_pool"] = (InferencePoolConfig.parse(pool.pop("pool"), **pool) if "pool" in pool
                                        else InferencePoolConfig(**pool))
            except TypeError as e:
                raise ValueError(f"inference_pool: {e}; its keys are pool (NAMESPACE/NAME) or namespace and name, "
                                 f"and {sorted(f.name for f in fields(InferencePoolConfig))}") from None
        for name, sub in (("health", HealthConfig), ("breaker", BreakerConfig), ("retry", RetryConfig),
                          ("audit", AuditConfig), ("sessions", SessionConfig)):
            if name in kw:
                try:
                    kw[name] = sub(**kw[name])
                except TypeError as e:
                    raise ValueError(f"{name}: {e}; its keys are {sorted(f.name for f in fields(sub))}") from None
        if "fairness" in kw and not isinstance(kw["fairness"], FairnessConfig):
            if not isinstance(kw["fairness"], dict):
                raise ValueError("fairness must be a table of FairnessConfig keys (balancer/fairness.py)")
            kw["fairness"] = FairnessConfig.from_dict(kw["fairness"])
        if "policy_options" in kw and isinstance(kw["policy_options"], dict):
            kw["policy_options"] = tuple(sorted(kw["policy_options"].items()))
        cfg = cls(**kw)
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}) if overrides else cfg
