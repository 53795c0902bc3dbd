"""A replica's part in prefill/decode disaggregation: the one definition of the role names.

`kvfleet replica --role`, the load reports (`protocol.load.LoadReport.role`), the balancer's
configured `ROLE@URL` replicas and its pair choice (balancer/disagg.py) all read these. A module
of its own, importing nothing, so the CLI's flag menus (replica/config.py, balancer/config.py)
take the names without loading the wire codecs. The roles mirror vLLM's KV-transfer `kv_role`
(`kv_producer` / `kv_consumer` / `kv_both`, vllm/config/kv_transfer.py).
"""

from __future__ import annotations

PREFILL, DECODE, BOTH = "prefill", "decode", "both"
ROLES = (PREFILL, DECODE, BOTH)


def check_role(role: str, what: str = "replica role") -> str:
    """`role` if it is one of ROLES; ValueError naming them otherwise."""
    if role not in ROLES:
        raise ValueError(f"unknown {what} {role!r}; choose one of {', '.join(ROLES)}")
    return role


def can_prefill(role: str) -> bool:
    return role != DECODE


def can_decode(role: str) -> bool:
    return role != PREFILL
