"""The endpoint picker's configuration: the fleet's `BalancerConfig` (replicas, policy, KV events,
predictor, health; its host/port is the picker's HTTP port for /metrics and /admin) and what
only the picker has: its gRPC listener and the protocol's names."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from balancer.config import BalancerConfig

# Names from the Gateway API Inference Extension's endpoint-picker protocol
# (docs/proposals/004-endpoint-picker-protocol, v1.0.0): the header and the dynamic-metadata key
# that name the picked endpoint, and the metadata namespaces of the pick and of the subset hint.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
METADATA_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
# Added by kvfleet's Envoy bootstraps to each picked response: Envoy's %RESPONSE_FLAGS% (UF: the
# replica refused the connection, UC/UR: it reset it, ...), read and removed by the picker; and
# the address Envoy sent the request to (%UPSTREAM_REMOTE_ADDRESS%), read by the picker to see
# which endpoint of its answer's list served it.
ENVOY_FLAGS_HEADER = "x-kvfleet-envoy-flags"
SERVED_HEADER = "x-kvfleet-upstream"
# The reference EPP's ports: 9002 for ext_proc, 9090 for metrics (the HTTP port here).
GRPC_PORT = 9002
HTTP_PORT = 9090


@dataclass(frozen=True)
class PickerConfig:
    fleet: BalancerConfig = field(default_factory=lambda: BalancerConfig(port=HTTP_PORT))
    grpc_host: str = "127.0.0.1"
    grpc_port: int = GRPC_PORT  # 0 picks a free one
    destination_header: str = DESTINATION_HEADER
    metadata_namespace: str = METADATA_NAMESPACE
    # How often the gRPC health service re-reads the fleet (readiness: some replica is usable).
    health_refresh_s: float = 0.5
    # Endpoints after the pick in the answer (`ip:port,ip:port,...`: the protocol's fallback list),
    # the policy's next choices, for a gateway that retries down the list (Envoy's override_host
    # load-balancing policy with a retry policy); ORIGINAL_DST takes one address: keep 0 there.
    fallback_endpoints: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.grpc_port < 65536:
            raise ValueError(f"grpc_port must be in [0, 65535], got {self.grpc_port}")
        if not self.destination_header or self.destination_header != self.destination_header.lower():
            raise ValueError("destination_header must be a non-empty lower-case header name "
                             f"(Envoy matches header names in lower case), got {self.destination_header!r}")
        if not self.metadata_namespace:
            raise ValueError("metadata_namespace must be non-empty (the protocol's default is envoy.lb)")
        if self.health_refresh_s <= 0:
            raise ValueError("health_refresh_s must be positive")
        if isinstance(self.fallback_endpoints, bool) or not isinstance(self.fallback_endpoints, int) \
                or not 0 <= self.fallback_endpoints <= 8:
            raise ValueError(f"fallback_endpoints must be an integer in [0, 8], got {self.fallback_endpoints!r}")
        g = self.fleet.guard
        if (g.api_keys or g.rate_limit_rps or g.max_concurrency_per_key or g.max_inflight_per_replica
                or g.max_tokens_cap or g.body_timeout_s):
            raise ValueError("the picker does not check API keys or apply rate, concurrency, admission, max_tokens "
                             "or body-time limits (Envoy carries the requests): configure them in the gateway "
                             "(e.g. Envoy's ext_authz and local_ratelimit filters) and drop them here; "
                             "--admin-key still guards the picker's /admin API")

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls)) - {"fleet"}

    @classmethod
    def from_file(cls, path: str | Path) -> "PickerConfig":
        """A balancer config file (TOML or JSON, BalancerConfig's keys) whose `picker` table holds
        this class's own keys."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read config file {p}: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PickerConfig":
        raw = dict(raw)
        own = raw.pop("picker", {}) or {}
        if not isinstance(own, dict):
            raise ValueError("picker must be a table of PickerConfig keys")
        unknown = set(own) - cls.field_names()
        if unknown:
            raise ValueError(f"unknown picker keys {sorted(unknown)}; valid keys: {sorted(cls.field_names())}")
        raw.setdefault("port", HTTP_PORT)
        return cls(fleet=BalancerConfig.from_dict(raw), **own)
