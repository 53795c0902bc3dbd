"""predictive: kvfleet's own policy — send each request where it will finish soonest,
counting what it costs the requests already there.

For every usable replica r the policy estimates, in seconds, from the exact prefix match, the
replica's reported load (plus what this balancer sent since that report), the request's
predicted output length, and step-time coefficients learned online from the replica's own
load reports (`balancer.step_learner`):

    U   = prompt tokens not cached on r, M = those cached
    Q   = prefill tokens already queued on r (reported + sent since the report)
    W   = requests waiting on r (reported + sent since the report)
    D   = decoding sequences on r,  C = their KV context tokens
    K   = r's per-step token budget (largest step seen), steps = ceil((Q + U) / max(K - D, 1))
    ttft    = steps · (θ_step + θ_seq·D + θ_ctx·C + θ_pctx·(M + U/2)) + θ_tok · (Q + U)
    behind  = W · θ_tok · U     (the work we add delays the requests that will queue after us;
                                 the queue seen now estimates how many — Little's law)
    others  = D · θ_tok · U                         (our prefill slows every running decode)
            + min(D, L) · L · (θ_seq + θ_ctx · (P + L/2))   (our decode steps ride along theirs)
    memory  = if the blocks we need exceed the free ones: the recompute of what gets preempted
    cost    = ttft + behind + memory + others_weight · others

and picks the lowest cost (ties: fewer in flight, then a draw seeded by the request). At low
load `behind` vanishes and the policy minimises TTFT; near saturation it makes recomputing a
prefix as expensive as it is for everyone, which is what stops the pile-up behind a hot
replica and the thrash of recomputing what another replica holds. Every
term is a time, so they add without per-term weights; the θ coefficients come from the
replicas' measured steps. `others_weight` states the objective: 0 minimises time to first token alone, 1 minimises
total latency including the decode delay imposed on running requests; the default 0.1 is TTFT
first with a brake on herding.
Herding is guarded by counting, per replica, the requests and uncached tokens this balancer
sent after the replica's last report. Replicas that send no load reports are estimated from
this balancer's in-flight bookkeeping alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest
from balancer.step_learner import LearnerConfig, StepLearner


@dataclass(frozen=True, slots=True)
class PredictiveConfig:
    default_output_tokens: int = 128  # when neither a prediction nor max_tokens is known
    default_step_tokens: int = 2048  # per-step budget assumed before a replica's steps are seen
    stale_report_s: float = 5.0  # older load reports are ignored (bookkeeping only)
    # How much the decode delay this request imposes on running requests counts against its own
    # TTFT. 0: minimise time to first token only; 1: minimise total latency (a second of anyone's
    # E2E counts the same). 0.1 keeps TTFT first while refusing to pile a tenant's sessions onto
    # the one replica that cached its system prompt when that slows everyone decoding there.
    # Measured for 0, 0.1 and 1 in docs/benchmarks.md — a statement of the objective, chosen
    # once, not per trace.
    others_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.default_output_tokens < 1 or self.default_step_tokens < 1:
            raise ValueError("default_output_tokens and default_step_tokens must be positive")
        if self.stale_report_s <= 0:
            raise ValueError("stale_report_s must be positive")
        if not 0.0 <= self.others_weight <= 10.0:
            raise ValueError("others_weight must be in [0, 10]")


def estimate(view: ReplicaView, request: RoutingRequest, theta, step_tokens: int, out_tokens: float,
             stale_s: float, others_weight: float = 0.0) -> dict[str, float]:
    """The cost terms for one replica (seconds). Pure."""
    t_step, t_tok, t_seq, t_ctx, t_pctx = (float(v) for v in theta)
    bs = request.block_size
    matched = request.matched_blocks.get(view.replica_id, 0) * bs
    u = max(1, request.prompt_tokens - matched)
    load = view.load
    if load.age_s <= stale_s:
        q = load.queued_prefill_tokens + view.sent_tokens_since_report
        w = load.num_waiting + view.sent_since_report
        d = load.num_running + view.sent_since_report
        c = load.running_decode_tokens
        free_tokens = load.free_blocks * bs - view.sent_tokens_since_report
        have_memory = load.total_blocks > 0
    else:  # no usable report: what this balancer has in flight there
        q = view.inflight_tokens
        w = 0
        d = view.inflight_requests
        c = view.inflight_tokens
        free_tokens = 0
        have_memory = False
    steps = math.ceil((q + u) / max(step_tokens - d, 1))
    # Each of our prefill chunks also attends to the prompt before it (the cached prefix and
    # the chunks already done): on average matched + u/2 context tokens per step.
    ttft = steps * (t_step + t_seq * d + t_ctx * c + t_pctx * (matched + u / 2)) + t_tok * (q + u)
    behind = w * t_tok * u
    others = d * t_tok * u + min(d, out_tokens) * out_tokens * (t_seq + t_ctx * (request.prompt_tokens + out_tokens / 2))
    memory = 0.0
    if have_memory:
        short = u + out_tokens - free_tokens
        if short > 0:  # preemption: the newest requests are recomputed later
            memory = t_tok * short * 2 + steps * t_step
    return {"cost": ttft + behind + others_weight * others + memory, "ttft": ttft, "behind": behind, "others": others, "memory": memory,
            "uncached_tokens": float(u), "queued_tokens": float(q), "decoding": float(d)}


class PredictivePolicy(Policy):
    name: ClassVar[str] = "predictive"
    Config: ClassVar[type] = PredictiveConfig
    uses_predicted_output: ClassVar[bool] = True

    def __init__(self, config: PredictiveConfig | None = None, learner: StepLearner | None = None) -> None:
        self.config = config or PredictiveConfig()
        self.learner = learner or StepLearner(LearnerConfig())

    def _out_tokens(self, request: RoutingRequest) -> float:
        if request.predicted_output_tokens is not None:
            out = request.predicted_output_tokens
            if request.max_tokens is not None:
                out = min(out, request.max_tokens)
            return max(1.0, float(out))
        if request.max_tokens is not None:
            return float(min(request.max_tokens, self.config.default_output_tokens * 4))
        return float(self.config.default_output_tokens)

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        out = self._out_tokens(request)
        scores: dict[str, dict[str, float]] = {}
        best_key, best = None, None
        for v in sorted(replicas, key=lambda r: r.replica_id):
            theta = self.learner.coefficients(v.replica_id)
            k = self.learner.max_step_tokens.get(v.replica_id, self.config.default_step_tokens)
            s = estimate(v, request, theta, k, out, self.config.stale_report_s, self.config.others_weight)
            scores[v.replica_id] = s
            key = (round(s["cost"], 9), v.inflight_requests)
            if best_key is None or key < best_key:
                best_key, best = key, [v.replica_id]
            elif key == best_key:
                best.append(v.replica_id)
        chosen = best[0] if len(best) == 1 else request.rng().choice(best)
        s = scores[chosen]
        reason = (f"lowest estimated cost {s['cost'] * 1e3:.1f} ms: TTFT {s['ttft'] * 1e3:.1f} ms "
                  f"({s['uncached_tokens']:.0f} uncached + {s['queued_tokens']:.0f} queued tokens), "
                  f"delay to others {s['others'] * 1e3:.1f} ms, memory {s['memory'] * 1e3:.1f} ms; "
                  f"output ~{out:.0f} tokens")
        return Decision(chosen, reason, scores)

    def observe_steps(self, replica_id: str, steps) -> None:
        self.learner.observe(replica_id, steps)

    def on_replica_removed(self, replica_id: str) -> None:
        self.learner.forget(replica_id)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
