"""Routing policies and the factory that maps a name and options to one.

    make_policy("sglang_cache_aware", {"cache_threshold": 0.5}) -> SglangCacheAwarePolicy

Each policy class carries its `name` and its `Config` (a frozen dataclass whose fields are the
policy's options, with the peer's published defaults); `make_policy` builds `Config(**options)`
and the policy from it. Nothing outside this table knows a policy by name (design §6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from balancer.policies.base import Decision, Policy, ReplicaLoad, ReplicaView, RoutingRequest
from balancer.policies.chwbl import ChwblPolicy
from balancer.policies.dynamo_kv import DynamoKvPolicy
from balancer.policies.least_request import LeastRequestPolicy
from balancer.policies.llmd_scorer import LlmdScorerPolicy
from balancer.policies.power_of_two import PowerOfTwoPolicy
from balancer.policies.preble_e2 import PrebleE2Policy
from balancer.policies.predictive import PredictivePolicy
from balancer.policies.precise_prefix import PrecisePrefixPolicy
from balancer.policies.random_policy import RandomPolicy
from balancer.policies.round_robin import RoundRobinPolicy
from balancer.policies.sglang_cache_aware import SglangCacheAwarePolicy

POLICIES: Mapping[str, type[Policy]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            RoundRobinPolicy,
            RandomPolicy,
            LeastRequestPolicy,
            PowerOfTwoPolicy,
            ChwblPolicy,
            SglangCacheAwarePolicy,
            DynamoKvPolicy,
            LlmdScorerPolicy,
            PrebleE2Policy,
            PrecisePrefixPolicy,
            PredictivePolicy,
        )
    }
)


def policy_names() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(POLICIES)


def policy_options(name: str) -> dict[str, Any]:
    """The options a policy accepts, with their defaults."""
    cls = _lookup(name)
    return {f.name: getattr(cls.Config(), f.name) for f in dataclasses.fields(cls.Config)}


def make_policy(name: str, options: Mapping[str, Any] | None = None) -> Policy:
    """A fresh policy instance. Raises ValueError naming the valid choices for an unknown policy
    or option, or the reason an option's value is rejected."""
    cls = _lookup(name)
    options = dict(options or {})
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        accepted = ", ".join(valid) if valid else "none"
        raise ValueError(f"unknown option(s) for policy {name!r}: {', '.join(unknown)}; it accepts: {accepted}")
    try:
        config = cls.Config(**options)
    except TypeError as exc:  # e.g. a comparison with a value of the wrong type
        raise ValueError(f"bad option value for policy {name!r}: {exc}") from None
    return cls(config)


def _lookup(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "Decision",
    "Policy",
    "ReplicaLoad",
    "ReplicaView",
    "RoutingRequest",
    "make_policy",
    "policy_names",
    "policy_options",
]
