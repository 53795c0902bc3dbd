"""Generated workloads for evaluating predictors without the shared traces.

- `generated(kind, ...)`: loadgen.generate's multi-tenant agentic or chat workload as it is. Its
  output lengths are drawn independently of the prompt (tool call or final answer), so a good
  predictor can only match the global median there: it checks that a predictor does no harm
  where there is nothing to learn.
- `tenant_skewed(...)`: the same generator run once per tenant, each tenant with its own output
  profile (answers and tool calls 2**k times longer for tenant k, k = 0..tenants-1), merged in
  arrival order. Tenants differ by their system prompt (the first blocks), so the signal is
  there for a prefix-keyed predictor; `tenant_labels=False` drops the tenant names, leaving the
  block ids as the only clue.
"""

from __future__ import annotations

from dataclasses import replace

from loadgen.generate import GenerateConfig, generate
from loadgen.synthetic import LengthDist
from loadgen.traces import TraceRequest

KINDS = ("agentic", "chat", "tenant-skewed")
_ID_STRIDE = 1 << 40  # each tenant's generator numbers hash ids from 0: keep them apart


def generated(kind: str = "agentic", num_requests: int = 3000, tenants: int = 8, seed: int = 0) -> list[TraceRequest]:
    return generate(GenerateConfig(kind=kind, num_requests=num_requests, tenants=tenants, seed=seed))


def tenant_skewed(num_requests: int = 3000, tenants: int = 6, seed: int = 0, kind: str = "agentic",
                  tenant_labels: bool = True) -> list[TraceRequest]:
    if tenants < 1:
        raise ValueError(f"tenants must be at least 1, got {tenants}")
    if num_requests < tenants:
        raise ValueError(f"num_requests ({num_requests}) must be at least tenants ({tenants})")
    out: list[TraceRequest] = []
    for k in range(tenants):
        scale = 2.0**k
        cfg = GenerateConfig(kind=kind, num_requests=num_requests // tenants + (k < num_requests % tenants),
                             session_rate=0.5 / tenants, tenants=1, seed=seed * 1000 + k,
                             answer_tokens=LengthDist("lognormal", 40 * scale, 20 * scale),
                             tool_call_tokens=LengthDist("lognormal", 20 * scale, 10 * scale))
        for r in generate(cfg):
            out.append(replace(r, hash_ids=tuple(i + k * _ID_STRIDE for i in r.hash_ids or ()),
                               session_id=f"t{k}-{r.session_id}", tenant=f"tenant{k}" if tenant_labels else None))
    out.sort(key=lambda r: r.arrival_s)
    return out


def workload(kind: str, num_requests: int = 3000, tenants: int = 8, seed: int = 0,
             tenant_labels: bool = True) -> list[TraceRequest]:
    """One of KINDS by name."""
    if kind == "tenant-skewed":
        return tenant_skewed(num_requests, tenants, seed, tenant_labels=tenant_labels)
    if kind in ("agentic", "chat"):
        reqs = generated(kind, num_requests, tenants, seed)
        return reqs if tenant_labels else [replace(r, tenant=None) for r in reqs]
    raise ValueError(f"unknown workload {kind!r}; choose from {', '.join(KINDS)}")
