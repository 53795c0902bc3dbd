"""Prefill/decode disaggregation: which pair of replicas serves a request (issue #19 part 3).

A disaggregated fleet has replicas of three roles: `prefill` (computes a prompt's KV and its
first token, then hands the KV to a decode replica), `decode` (continues from a handed-over KV)
and `both` (a unified replica, which can take either side or the whole request). For one request
`PairSelector.select` picks

    prefill side, among prefill / both replicas: the lowest time to first token, from the
        exact prefix hit (uncached tokens to compute) and the prefill queue ahead of it, plus
        the delay its prefill adds to the requests queued behind it — predictive's `estimate`
        (balancer/policies/predictive.py) with a one-token output, so the same learned step
        coefficients price it;
    decode side, among decode / both replicas, given the prefill replica: the lowest decode
        cost, from free KV memory (the request's prompt + output must fit, else the recompute of
        what gets preempted) and decode load (its own inter-token time over its output, and the
        delay it adds to the sequences already decoding there), plus the hand-over: the prompt
        tokens the decode replica does not already cache, times `transfer_s_per_token`
        (0 when the decode side is the prefill replica itself: a `both` replica keeps its KV).

    prefill cost = ttft + others_weight·(behind + interference) + memory   (predictive's terms;
        interference = D·θtok·U on a `both` replica: our U uncached tokens stretch its D decodes'
        steps; 0 on a prefill replica, which decodes nothing)
    decode cost = L·tpot + others_weight·D·R̄·m + memory + transfer + θtok·Q
        (Q: prefill tokens queued on a `both` replica, run in the steps we decode in)
        tpot = θ0 + θseq·(D+1) + θctx·(C + P + L/2)   one decode step with us in it
        m    = θseq + θctx·(P + L/2)                  what we add to each of the D's steps
        L: predicted output tokens, P: prompt tokens, D/C: sequences decoding there / their KV
        tokens, R̄ = L/2 (a running sequence is half-way, on average); memory: when P + L
        exceeds the free KV tokens, the wait for running sequences to free them plus the
        recompute of what gets preempted (predictive's kv_wait and memory terms)

When the decode side's choice is the prefill replica the pair is `unified`: the request runs
there whole, like any routed request. The selector is pure: no I/O, no clock of its own, no
state but the step learner it reads. It is one stage of the routing transaction
(balancer/router.py: `Router.route(..., split=True)`), which calls its two halves —
`prefill_side`, then `decode_side` (through the session rule for a request in a session: the
decode replica, where the conversation's KV ends up, is the session's home) — on the views its
candidate stage narrowed (a LoRA adapter's holders), and books the result: a `PairBooking`, or a
`Booking` when the pair is unified or none can be formed. Replica ids are the registry's
(replica URLs); a replica missing from `roles` is `both`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from balancer.policies.base import Decision, ReplicaView, RoutingRequest
from balancer.policies.predictive import PredictiveConfig, estimate
from balancer.step_learner import LearnerConfig, StepLearner
from protocol.roles import BOTH, DECODE, PREFILL, ROLES, can_decode, can_prefill, check_role

__all__ = ["BOTH", "DECODE", "PREFILL", "ROLES", "PairConfig", "PairDecision", "PairSelector", "can_decode",
           "can_prefill", "check_role"]


@dataclass(frozen=True, slots=True)
class PairConfig:
    # The predictive policy's settings the costs share: default output and step budget before
    # any is known, when a load report is stale, how others' delay counts against ours.
    pricing: PredictiveConfig = PredictiveConfig()
    # Seconds to hand over one prompt token's KV from the prefill to the decode replica
    # (bytes per token / link bandwidth: simulator/kv_link.py has presets). 0: not priced, the
    # decode side is then chosen by memory and load alone.
    transfer_s_per_token: float = 0.0
    # Fixed seconds per hand-over (link latency, connection set-up), charged to any split pair.
    transfer_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.transfer_s_per_token >= 0 and self.transfer_latency_s >= 0):
            raise ValueError("transfer_s_per_token and transfer_latency_s must be >= 0 (seconds)")


class PairDecision(Decision):
    """The replicas that prefill and decode a request (the same one: `unified`) and why: the
    prefill side's Decision (`prefill_side`, with every prefill candidate's cost terms) and the
    decode side's (`decode_side`: the selector's, or the session rule's for a request in a
    session), whose replica, reason and scores this carries — `replica_id` is where the answer
    comes from. `prefill_scores` / `decode_scores`: replica -> name -> seconds."""

    __slots__ = ("prefill_side", "decode_side")

    def __init__(self, prefill: Decision, decode: Decision) -> None:
        super().__init__(decode.replica_id, lambda: decode.reason, lambda: decode.scores)
        self.prefill_side = prefill
        self.decode_side = decode

    @property
    def prefill(self) -> str:
        return self.prefill_side.replica_id

    @property
    def decode(self) -> str:
        return self.replica_id

    @property
    def prefill_scores(self) -> Mapping[str, Mapping[str, float]]:
        return self.prefill_side.scores

    @property
    def decode_scores(self) -> Mapping[str, Mapping[str, float]]:
        return self.scores

    @property
    def unified(self) -> bool:
        return self.prefill == self.decode


def _lowest(scores: Mapping[str, Mapping[str, float]], inflight: Mapping[str, int], request: RoutingRequest) -> str:
    """The replica of lowest cost; ties by fewest requests in flight, then the request's rng."""
    best_key, best = None, []
    for rid in sorted(scores):
        key = (round(scores[rid]["cost"], 9), inflight[rid])
        if best_key is None or key < best_key:
            best_key, best = key, [rid]
        elif key == best_key:
            best.append(rid)
    return best[0] if len(best) == 1 else request.rng().choice(best)


class PairSelector:
    """Chooses (prefill, decode) for a request; see the module docstring.

    `learner`: the step-time coefficients; pass the predictive policy's own (`policy.learner`)
    to price both decisions alike, or leave None for one of its own, fed by `observe_steps`."""

    def __init__(self, config: PairConfig | None = None, learner: StepLearner | None = None) -> None:
        self.config = config or PairConfig()
        self.learner = learner if learner is not None else StepLearner(LearnerConfig())

    def _out_tokens(self, request: RoutingRequest) -> float:
        out = request.predicted_output_tokens
        if out is None:
            out = request.max_tokens if request.max_tokens is not None else self.config.pricing.default_output_tokens
        elif request.max_tokens is not None:
            out = min(out, request.max_tokens)
        return max(1.0, float(out))

    def prefill_cost(self, view: ReplicaView, request: RoutingRequest, fleet_waiting: float,
                     role: str = PREFILL) -> dict[str, float]:
        """Cost terms of prefilling `request` on `view` (seconds): predictive's estimate for a
        one-token output (the prefill replica emits only the first token). On a `both` replica
        the prefill also stretches the steps of the D sequences decoding there (`interference`,
        ~θtok per uncached token each): the interference disaggregation exists to avoid."""
        cfg, lr = self.config.pricing, self.learner
        rid = view.replica_id
        s = estimate(view, request, lr.theta(rid), lr.step_budget(rid, cfg.default_step_tokens), 1.0,
                     cfg.stale_report_s, cfg.others_weight, lr.busy_for(rid, request.now), 0, fleet_waiting, 0.5)
        s["interference"] = s["decoding"] * lr.theta(rid)[1] * s["uncached_tokens"] if role == BOTH else 0.0
        s["cost"] = s["ttft"] + cfg.others_weight * (s["behind"] + s["interference"]) + s["memory"]
        return s

    def decode_cost(self, view: ReplicaView, request: RoutingRequest, prefill_id: str, out: float) -> dict[str, float]:
        """Cost terms of decoding `request` on `view` after a prefill on `prefill_id` (seconds)."""
        cfg, pricing = self.config, self.config.pricing
        t_step, t_tok, t_seq, t_ctx, _ = self.learner.theta(view.replica_id)
        bs = request.block_size
        p = request.prompt_tokens + request.extra_prefill_tokens
        load = view.load
        if load.age_s <= pricing.stale_report_s:
            d = load.num_running + view.sent_since_report
            c = load.running_decode_tokens
            free = load.free_blocks * bs - view.sent_tokens_since_report
            have_memory = load.total_blocks > 0
            queued = load.queued_prefill_tokens  # reported only: hand-overs sent here are not prefill
        else:  # no usable report: this balancer's in-flight bookkeeping
            d, c, free, have_memory, queued = view.inflight_requests, view.inflight_tokens, 0, False, 0
        seqs = request.sequences
        tpot = t_step + t_seq * (d + seqs) + t_ctx * (c + seqs * (p + out / 2))
        m = t_seq + t_ctx * (p + out / 2)
        others = d * (out / 2) * m * seqs  # each running sequence shares ~R̄ = L/2 of our steps
        memory = 0.0
        if have_memory:
            short = p + out * seqs - free
            if short > 0:
                # It waits for running sequences to free the blocks (their outputs spread over
                # [0, 2R̄] steps free C/(2R̄) tokens a step, as predictive's kv_wait), or, admitted,
                # preempts the newest, whose recompute is charged as predictive charges it.
                wait = out * min(1.0, short / c) * tpot if c > 0 else 0.0
                memory = wait + t_tok * short * 2 + t_step * math.ceil(short / max(self.learner.step_budget(
                    view.replica_id, pricing.default_step_tokens), 1))
        transfer = 0.0
        moved = 0
        if view.replica_id != prefill_id:
            moved = max(0, request.prompt_tokens - request.matched_blocks.get(view.replica_id, 0) * bs)
            moved += request.extra_prefill_tokens
            transfer = cfg.transfer_latency_s + moved * cfg.transfer_s_per_token
        # The prefill work queued there runs in the steps we decode in (a `both` replica; a
        # decode replica reports none): each of its tokens lengthens one of our steps by ~θtok.
        interference = t_tok * queued
        return {"cost": out * tpot + pricing.others_weight * others + memory + transfer + interference, "tpot": tpot,
                "others": others, "memory": memory, "transfer": transfer, "transfer_tokens": float(moved),
                "interference": interference,
                "decoding": float(d), "free_tokens": float(free)}

    def prefill_side(self, request: RoutingRequest, views: Sequence[ReplicaView],
                     roles: Mapping[str, str]) -> Decision | None:
        """The prefill replica for `request` among `views` that can prefill (scores: each one's
        `prefill_cost`); None when none can."""
        pre = [v for v in views if can_prefill(roles.get(v.replica_id, BOTH))]
        if not pre:
            return None
        stale = self.config.pricing.stale_report_s
        fresh = [v for v in pre if v.load.age_s <= stale]
        fleet_waiting = sum(v.load.num_waiting + v.sent_since_report for v in fresh) / len(pre)
        scores = {v.replica_id: self.prefill_cost(v, request, fleet_waiting, roles.get(v.replica_id, BOTH))
                  for v in pre}
        p_id = _lowest(scores, {v.replica_id: v.inflight_requests for v in pre}, request)
        s = scores[p_id]
        return Decision(p_id, lambda: f"prefill on {p_id}: TTFT {s['ttft'] * 1e3:.1f} ms ({s['uncached_tokens']:.0f} "
                                      f"uncached + {s['queued_tokens']:.0f} queued tokens)", scores)

    def decode_side(self, request: RoutingRequest, views: Sequence[ReplicaView], prefill: Decision) -> Decision:
        """The decode replica for `request` among `views` (non-empty, all able to decode), after
        `prefill_side` chose `prefill` (scores: each one's `decode_cost`). Its reason tells the
        whole pair; the same replica as `prefill`'s: the request runs there whole."""
        out = self._out_tokens(request)
        scores = {v.replica_id: self.decode_cost(v, request, prefill.replica_id, out) for v in views}
        d_id = _lowest(scores, {v.replica_id: v.inflight_requests for v in views}, request)
        d = scores[d_id]
        return Decision(d_id, lambda: f"{prefill.reason}; decode on {d_id}: ~{d['tpot'] * 1e3:.2f} ms/token beside "
                                      f"{d['decoding']:.0f} sequences, memory {d['memory'] * 1e3:.1f} ms, hand-over "
                                      f"{d['transfer_tokens']:.0f} tokens ({d['transfer'] * 1e3:.1f} ms)", scores)

    def select(self, request: RoutingRequest, views: Sequence[ReplicaView],
               roles: Mapping[str, str]) -> PairDecision | None:
        """The pair for `request` among `views` (usable replicas, as the router filters them);
        `roles`: replica id -> role (a replica not in it is `both`). None when no view can
        prefill or none can decode: the request is routed whole. The two halves in order, as
        the router's pair stage calls them."""
        p = self.prefill_side(request, views, roles)
        dec = [v for v in views if can_decode(roles.get(v.replica_id, BOTH))]
        if p is None or not dec:
            return None
        return PairDecision(p, self.decode_side(request, dec, p))

    def observe_steps(self, replica_id: str, steps) -> None:
        """A replica's recent engine steps (only needed when the learner is not shared with the
        policy, which is fed them already)."""
        self.learner.observe(replica_id, steps)

    def on_replica_removed(self, replica_id: str) -> None:
        self.learner.forget(replica_id)

    def describe(self) -> dict[str, Any]:
        return {"name": "pair", **asdict(self.config)}  # pricing as a nested map
