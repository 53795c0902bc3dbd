"""predictive: kvfleet's own policy — send each request where the fleet loses the least time.

For every usable replica r the policy estimates, in seconds, from the exact prefix match, the
replica's reported load (plus what this balancer sent since that report), the request's
predicted output length, and step-time coefficients learned online from the replicas' load
reports (`balancer.step_learner`: θ0 per step, θtok per new token, θseq per decode sequence,
θctx per decode-context token, θpctx per prefill-context token):

    U, M = prompt tokens not cached / cached on r;  L = predicted output tokens;  P = U + M
    Q    = prefill tokens queued on r: reported (minus the cached prefixes of the waiting
           requests, which the replica counts in full until it admits them) + sent since
    W    = requests waiting on r;  D = sequences running on r, C = their KV context tokens
    K    = the per-step token budget (largest step seen on any replica: a replica that served
           only short prompts never shows its own);  k = max(K - D, 1) prefill tokens/step
    τ    = θ0 + θseq·D + θctx·C           a step's fixed part: overhead + the running decodes
    busy = what is left of the step r is executing (a request joins the step after it)

    U: our uncached prompt tokens (a batched prompt's other prompts count whole)
    ttft   = busy + ceil((Q + U) / k)·(τ + θpctx·(M + U/2)) + θtok·(Q + U) + kv_wait
    kv_wait = the queue is admitted only as KV blocks free up (a replica admits a waiting request
           only when its blocks can be allocated): with F free tokens (evictable cached blocks
           count as free) and a shortfall S = Q + U - F > 0, the running sequences must finish
           first; their remaining outputs spread evenly over [0, 2R̄] steps, they free C/(2R̄)
           tokens a step, so we wait 2R̄·min(1, S/C) decode steps of τ + θtok·D each
    work   = θtok·U + (U / k)·(τ + θpctx·(M + U/2))      replica time our prefill takes
    behind = W̄ · work           the requests that will queue behind our prefill wait `work`
                                longer; as many as wait now on an average replica (W̄, the
                                fleet's mean, not r's: later requests are routed by this same
                                policy, which spreads queues, so the delay lands fleet-wide)
    others = D · min(R̄, L) · m,  m = θtok + θseq + θctx·(P + L/2)
                                each of our L decode steps is longer by m for every running
                                sequence still there; a running sequence overlaps us for
                                min(its remaining output, L) steps, R̄ = half the mean
                                predicted output of what this balancer has running on r
                                (times the sequences we decode: n, or best_of, per prompt)
    memory = if the blocks we need, after those of the queue ahead of us (admitted first, FCFS),
             exceed the free ones: the recompute of what gets preempted
    load   = for a request naming a LoRA adapter that r does not hold resident: the seconds r
             takes to load one (its reported mean, else `lora_load_s`); the step that loads it
             is that much longer, so it adds to our TTFT and once to each of the D running
    tier   = for the H tokens after r's device prefix that r holds in a lower KV tier (host
             memory, disk: `request.offloaded_blocks`), which r loads instead of computing: they
             leave U (and join M as context) and cost θload·H, θload seconds per loaded token
             learned from the replicas' step reports like the other coefficients, one per medium
             (StepLearner.load_cost: host memory, and disk for the blocks r holds on disk only,
             `request.offloaded_disk_blocks`); the step that loads is that much longer, so it adds to our
             TTFT, to `work`, and once to each of the D running. Loaded blocks need device
             blocks as computed ones do (kv_wait, memory count U + H). `tier_aware` false: H
             counts as uncached, recomputed (what a tier-blind policy assumes).
    cost   = ttft + weight · (behind + others) + memory       (ttft includes load and tier,
                                                              others D·(load + tier))

All terms are seconds of somebody's latency, so the sum needs no per-term weights: the cost is
the total latency this placement adds (our time to first token, plus the delay our work adds
to the requests queued behind it and to the decodes running beside it). `others_weight` (1)
only states that objective: 1 counts everyone's second the same, 0 is this request's TTFT alone.

Why the earlier decode term needed a 0.1: it charged min(D, L)·L steps — every running
sequence delayed for our whole decode — and the slowdown of running decodes by our *prefill*
(D·work) on top. A running sequence only shares min(remaining, L) of our steps, and the prefill
term, charged to the replicas that hold the cache (they are the ones with decodes running),
traded the recompute of thousands of tokens for a few ms of others' inter-token latency: it cost
p99 TTFT on every agentic trace tried. `behind` used r's own waiting count, which on the Azure
trace sent long prompts to replicas with long token queues but few waiting requests (p99).

`ttft_slack` (off by default) bounds that trade: only replicas whose estimated TTFT is within
(1 + ttft_slack) × the lowest are candidates, so a request is never moved off its cache to a
replica where its own wait is more than that factor worse, whatever it saves the decodes.

`decode_excess` (off by default) charges `others` only for the running sequences above the
fleet's mean, max(D − D̄, 0): a request shares its decode steps with about D̄ others wherever it
goes (later requests fill an idle replica), so only the excess of a busy replica is a cost of
choosing it rather than another.

`recompute_waste` (issue #15, see docs/benchmarks.md for the default) adds to `others` the
running decodes stalled by the recompute a placement chooses: D · θtok · (u − u_min), u_min the
uncached tokens on the replica holding the most of the prompt. Unlike the D·work term above it
charges nothing where the prompt is equally cold everywhere (the prefill stalls somebody's
decodes wherever it goes), only the tokens another replica already holds: moving a multi-turn
conversation off its replica to spare its decodes costs the decodes of the new replica the
whole history's recompute.

Herding is guarded by counting, per replica, the requests and uncached tokens this balancer
sent after the replica's last report. Replicas that send no load reports are estimated from
this balancer's in-flight bookkeeping alone.

With `RoutingRequest.consistent` (several uncoordinated balancer instances) the estimate reads
only what every instance shares: the views carry the reports alone (nothing sent since), the
waiting requests' cached prefixes are not subtracted from Q (they come from this instance's
history of sends), R̄ is L/2 (as with nothing of ours running), and `busy` is 0 (it compares
the reported step's end with this instance's clock, which differs between instances by the
time between their decisions). The step coefficients are learned from the shared reports.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import xxhash

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest
from balancer.step_learner import LearnerConfig, StepLearner
from protocol.events import MEDIUM_DISK


@dataclass(frozen=True, slots=True)
class PredictiveConfig:
    default_output_tokens: int = 128  # when neither a prediction nor max_tokens is known
    default_step_tokens: int = 2048  # per-step budget assumed before a replica's steps are seen
    stale_report_s: float = 5.0  # older load reports are ignored (bookkeeping only)
    # How a second of delay this request imposes on others (requests queued behind its prefill,
    # decodes running beside it) counts against a second of its own wait for the first token.
    # 1: the sum of everyone's latency (every term is an estimate in seconds, so 1 is the
    # objective itself, not a tuned value); 0: this request's TTFT alone.
    others_weight: float = 1.0
    # Choose only among replicas whose estimated TTFT is within (1 + ttft_slack) × the lowest,
    # so the delay a request saves others can cost it at most that factor. None: no bound. A
    # trade, not a free win (docs/benchmarks.md, issue #15): 1.0 cut p99 TTFT on multi-turn
    # chat by a third and on a hot prompt by a tenth, and cost 3–11 % mean TTFT there and on
    # agentic traffic.
    ttft_slack: float | None = None
    # Replicate instead of move (issue #15: a hot prefix on k replicas): when the lowest-cost
    # replica would recompute at least `replicate_min_tokens` of the prompt that another replica
    # holds, and that costs this request more than (1 + replicate_slack) × its lowest estimated
    # TTFT, the request stays among the replicas within that bound and the one it would have
    # moved to gets a warm-up (Decision.warm): the held prefix computed there by a prefill-only
    # request, so the next requests find it cached instead of one of them paying the recompute.
    # At most one warm-up in flight per replica and per prefix. False: off (the default until
    # 2026-12-08; docs/benchmarks.md, issue #15: over 56 cells of three seeds at 8 and 32
    # replicas, mean TTFT no worse than the best peer in 49 against 46, p99 in 29 against 23).
    replicate: bool = True
    replicate_min_tokens: int = 1024
    replicate_slack: float = 1.0
    # The preemption risk counts the prefill queued ahead of the request (admitted first, so it
    # takes its blocks first); False: only the request's own blocks against the free ones.
    queue_in_memory: bool = True
    # `others` counts only the running sequences above the fleet's mean (max(D - D̄, 0)): the
    # decodes a request will share its steps with wherever it goes are not charged to the
    # replica that happens to run them now. False: all of D.
    decode_excess: bool = False
    # `others` also counts the recompute this placement wastes: the uncached tokens it computes
    # beyond the best-cached replica's stall r's D running decodes (θtok each), and where no
    # replica holds more of the prompt than another it adds nothing. False: not counted (the
    # default until 2026-12-07; docs/benchmarks.md, issue #15: mean TTFT no worse than the best
    # peer in 28 of 36 cells on two seeds and 32 replicas, against 21).
    recompute_waste: bool = True
    # Seconds a replica needs to load a LoRA adapter it does not hold, until it reports its own
    # measured mean (`LoadReport.lora_load_s`). An assumption, not a measurement: a rank-16
    # adapter on every projection of Llama-3-8B is ~84 MB in bf16, ~40 ms from an NVMe disk at
    # ~2 GB/s (PCIe alone would be ~3 ms). `lora_aware` false: adapters are not priced at all
    # (the baseline of docs/benchmarks.md's adapter measurement).
    lora_load_s: float = 0.04
    lora_aware: bool = True
    # Price a lower-tier hit (host memory, disk) by its learned load time (module docstring,
    # `tier`). False: those blocks count as uncached, the baseline of docs/benchmarks.md's
    # host-tier rows.
    tier_aware: bool = True
    # With consistent routing (several uncoordinated instances: no sends since a report are
    # counted), the replicas whose cost is within `consistent_spread` × this request's own
    # replica time (`work`, on the lowest-cost replica) of the lowest are taken as equal, and the
    # request's seed picks one of them (rendezvous hashing): requests that arrive between two
    # reports spread over the near-best replicas instead of all joining the one that looked best
    # when the report was made. 0: always the lowest cost. Not read without consistent routing.
    consistent_spread: float = 1.0

    def __post_init__(self) -> None:
        if self.ttft_slack is not None and not self.ttft_slack >= 0:
            raise ValueError("ttft_slack must be None or >= 0 (e.g. 1.0: at most twice the lowest TTFT)")
        if self.replicate_min_tokens < 1 or not self.replicate_slack >= 0:
            raise ValueError("replicate_min_tokens must be >= 1 and replicate_slack >= 0")
        if self.default_output_tokens < 1 or self.default_step_tokens < 1:
            raise ValueError("default_output_tokens and default_step_tokens must be positive")
        if self.stale_report_s <= 0:
            raise ValueError("stale_report_s must be positive")
        if not 0.0 <= self.others_weight <= 10.0:
            raise ValueError("others_weight must be in [0, 10]")
        if not 0.0 <= self.consistent_spread <= 100.0:
            raise ValueError("consistent_spread must be in [0, 100] (times the request's own work; 0: lowest cost)")
        if not self.lora_load_s >= 0:
            raise ValueError("lora_load_s must be >= 0 (seconds to load a LoRA adapter)")


def estimate(view: ReplicaView, request: RoutingRequest, theta, step_tokens: int, out_tokens: float,
             stale_s: float, others_weight: float = 1.0, busy_s: float = 0.0, cached_waiting: int = 0,
             fleet_waiting: float = 0.0, running_remaining: float = 0.0,
             queue_in_memory: bool = True, adapter_load_s: float = 0.0,
             fleet_running: float | None = None, load_per_token: float | None = None,
             disk_load_per_token: float | None = None) -> dict[str, float]:
    """The cost terms for one replica (seconds); see the module docstring. Pure.

    busy_s: rest of the step in flight; cached_waiting: prompt tokens of r's waiting requests
    that the index held when they were routed (the report counts them as queued);
    fleet_waiting: W̄; running_remaining: R̄ (output tokens a running sequence still has);
    adapter_load_s: the LoRA adapter load this request makes r do first (0: none);
    fleet_running: the fleet's mean running sequences, to charge only r's excess over it (None: all);
    load_per_token: θload, seconds per token loaded from a lower KV tier (None: such a hit is
    recomputed, not loaded); disk_load_per_token: the same for the disk tier's blocks (None:
    priced as host ones)."""
    t_step, t_tok, t_seq, t_ctx, t_pctx = theta
    bs = request.block_size
    rid = view.replica_id
    matched = request.matched_blocks.get(rid, 0) * bs
    loaded = 0  # H: prompt tokens r loads from a lower tier, always leaving one to compute
    if load_per_token is not None and request.offloaded_blocks:
        loaded = min(request.offloaded_blocks.get(rid, 0) * bs, max(request.prompt_tokens - matched - 1, 0))
    tier_s = loaded * load_per_token if loaded else 0.0
    if loaded and disk_load_per_token is not None and request.offloaded_disk_blocks:
        disk = min(request.offloaded_disk_blocks.get(rid, 0) * bs, loaded)
        tier_s += disk * (disk_load_per_token - load_per_token)
    matched += loaded
    u = max(1, request.prompt_tokens - matched) + request.extra_prefill_tokens
    seqs = request.sequences
    load = view.load
    if load.age_s <= stale_s:
        q = max(0, load.queued_prefill_tokens - cached_waiting) + view.sent_tokens_since_report
        d = load.num_running + view.sent_since_report
        c = load.running_decode_tokens
        free_blocks_tokens = load.free_blocks * bs
        free_tokens = free_blocks_tokens - view.sent_tokens_since_report
        have_memory = load.total_blocks > 0
    else:  # no usable report: what this balancer has in flight there
        q = view.inflight_tokens
        d = view.inflight_requests
        c = view.inflight_tokens
        free_tokens = free_blocks_tokens = 0
        have_memory = False
        busy_s = 0.0
    per_step = max(step_tokens - d, 1)
    steps = math.ceil((q + u) / per_step)
    tau = t_step + t_seq * d + t_ctx * c
    chunk = tau + t_pctx * (matched + u / 2)  # one of our prefill steps, less its new tokens
    kv_wait = 0.0
    if have_memory and d > 0 and c > 0:
        shortfall = q + u + loaded - free_blocks_tokens  # q holds what was sent since the report, as blocks do not
        if shortfall > 0:
            kv_wait = 2 * max(running_remaining, 1.0) * min(1.0, shortfall / c) * (tau + t_tok * d)
    ttft = busy_s + steps * chunk + t_tok * (q + u) + kv_wait + adapter_load_s + tier_s
    work = t_tok * u + (u / per_step) * chunk + tier_s
    behind = fleet_waiting * work
    m = t_tok + t_seq + t_ctx * (request.prompt_tokens + out_tokens / 2)
    sharing = d if fleet_running is None else max(d - fleet_running, 0.0)
    others = sharing * min(running_remaining, out_tokens) * m * seqs + d * (adapter_load_s + tier_s)
    memory = 0.0
    if have_memory:
        # The queue ahead of us is admitted first (FCFS) and takes its blocks before ours.
        short = (q if queue_in_memory else 0) + u + loaded + out_tokens * seqs - free_tokens
        if short > 0:  # preemption: the newest requests are recomputed later
            memory = t_tok * short * 2 + steps * t_step
    return {"cost": ttft + others_weight * (behind + others) + memory, "ttft": ttft, "behind": behind,
            "others": others, "memory": memory, "kv_wait": kv_wait, "busy": busy_s, "uncached_tokens": float(u),
            "queued_tokens": float(q), "decoding": float(d), "work": work,
            "adapter_load": adapter_load_s, "loaded_tokens": float(loaded), "tier_load": tier_s}


class _Sent:
    """What this balancer sent to one replica: a running sum of the cached prompt tokens of
    the requests routed there (the newest `_MAX` kept, `cum[i]` = sum over the first i), and
    the predicted output of those still in flight (bounded too, in case completions are lost)."""

    _MAX = 4096

    __slots__ = ("cum", "out", "out_sum")

    def __init__(self) -> None:
        self.cum: deque[int] = deque([0], maxlen=self._MAX + 1)
        self.out: dict[str, float] = {}
        self.out_sum = 0.0

    def add(self, request_id: str, cached_tokens: int, out_tokens: float) -> None:
        self.cum.append(self.cum[-1] + cached_tokens)
        if request_id in self.out or len(self.out) >= self._MAX:
            self.done(request_id if request_id in self.out else next(iter(self.out)))
        self.out[request_id] = out_tokens
        self.out_sum += out_tokens

    def done(self, request_id: str) -> None:
        out = self.out.pop(request_id, None)
        if out is not None:
            self.out_sum = self.out_sum - out if self.out else 0.0  # no drift once empty


class PredictivePolicy(Policy):
    name: ClassVar[str] = "predictive"
    Config: ClassVar[type] = PredictiveConfig
    uses_predicted_output: ClassVar[bool] = True
    prices_adapter_load: ClassVar[bool] = True

    def __init__(self, config: PredictiveConfig | None = None, learner: StepLearner | None = None) -> None:
        self.config = config or PredictiveConfig()
        self.learner = learner or StepLearner(LearnerConfig())
        # This balancer's bookkeeping per replica (see `_inflight_stats`), O(1) per request.
        self._sent: dict[str, _Sent] = {}
        # Warm-ups in flight (replicate): warm-up request id -> (replica, prefix's last block hash).
        self._warming: dict[str, tuple[str, int]] = {}

    def _out_tokens(self, request: RoutingRequest) -> float:
        if request.predicted_output_tokens is not None:
            out = request.predicted_output_tokens
            if request.max_tokens is not None:
                out = min(out, request.max_tokens)
            return max(1.0, float(out))
        if request.max_tokens is not None:
            return float(min(request.max_tokens, self.config.default_output_tokens * 4))
        return float(self.config.default_output_tokens)

    def _inflight_stats(self, v: ReplicaView, out: float) -> tuple[int, float]:
        """(cached prompt tokens of r's waiting requests, R̄) from this balancer's bookkeeping.

        The replica's queue is first come first served, so its `num_waiting` waiting requests
        are the newest ones routed before its report (those sent since are counted apart); a
        newer request cannot have finished before an older one started, so they are read off
        the running sum of routed cached tokens. With nothing of ours running there, running
        sequences are taken to be like this request (R̄ = out / 2).
        """
        st = self._sent.get(v.replica_id)
        if st is None:
            return 0, out / 2
        cum = st.cum
        end = len(cum) - 1 - v.sent_since_report
        cached = cum[end] - cum[max(end - v.load.num_waiting, 0)] if end > 0 else 0
        remaining = st.out_sum / len(st.out) / 2 if st.out else out / 2  # running: half-way, on average
        return cached, remaining

    def _adapter_load_s(self, request: RoutingRequest, v: ReplicaView) -> float:
        """Seconds r must spend loading the request's LoRA adapter first (0: none to load)."""
        if request.lora_name is None or request.lora_name in v.loras or not self.config.lora_aware:
            return 0.0
        return v.lora_load_s or self.config.lora_load_s

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        cfg = self.config
        out = self._out_tokens(request)
        fresh = [v for v in replicas if v.load.age_s <= cfg.stale_report_s]
        fleet_waiting = sum(v.load.num_waiting + v.sent_since_report for v in fresh) / len(replicas)
        fleet_running = (sum(v.load.num_running + v.sent_since_report for v in fresh) / len(replicas)
                         if cfg.decode_excess else None)
        tiers = cfg.tier_aware and bool(request.offloaded_blocks)
        scores: dict[str, dict[str, float]] = {}
        stall: dict[str, float] = {}
        for v in sorted(replicas, key=lambda r: r.replica_id):
            theta = self.learner.theta(v.replica_id)
            load = self.learner.load_cost(v.replica_id) if tiers else None
            disk = self.learner.load_cost(v.replica_id, MEDIUM_DISK) if tiers and request.offloaded_disk_blocks else None
            k = self.learner.step_budget(v.replica_id, cfg.default_step_tokens)
            if request.consistent:  # shared state only (module docstring): none of our history, no clock
                cached_waiting, remaining, busy = 0, out / 2, 0.0
            else:
                cached_waiting, remaining = self._inflight_stats(v, out)
                busy = self.learner.busy_for(v.replica_id, request.now)
            s = estimate(v, request, theta, k, out, cfg.stale_report_s, cfg.others_weight,
                         busy, cached_waiting, fleet_waiting, remaining,
                         cfg.queue_in_memory, self._adapter_load_s(request, v), fleet_running, load, disk)
            scores[v.replica_id] = s
            if cfg.recompute_waste:
                stall[v.replica_id] = s["decoding"] * theta[1]  # D·θtok: decode stall per token computed on r
        if cfg.recompute_waste:  # the decodes stalled by tokens another replica holds (module docstring)
            u_min = min(s["uncached_tokens"] for s in scores.values())
            for rid, s in scores.items():
                waste = stall[rid] * (s["uncached_tokens"] - u_min)
                s["others"] += waste
                s["cost"] += cfg.others_weight * waste
        allowed = scores
        if cfg.ttft_slack is not None:
            bound = (1 + cfg.ttft_slack) * min(s["ttft"] for s in scores.values())
            allowed = {rid: s for rid, s in scores.items() if s["ttft"] <= bound}
        inflight = {v.replica_id: v.inflight_requests for v in replicas}
        spread = ""
        if request.consistent and cfg.consistent_spread > 0:
            lowest_cost = min(round(s["cost"], 9) for s in allowed.values())
            chosen, near = self._spread(request, allowed, lowest_cost, cfg.consistent_spread)
            if near > 1:
                spread = f"; one of {near} replicas within {cfg.consistent_spread:g}x its work of the lowest cost"
        else:
            chosen = self._lowest_cost(request, allowed, inflight)
        warm = None
        if cfg.replicate and not request.consistent:  # warm-ups read our own history: not shared state
            chosen, warm = self._replicate(request, scores, chosen, inflight)
        s = scores[chosen]
        reason = (f"lowest estimated cost {s['cost'] * 1e3:.1f} ms: TTFT {s['ttft'] * 1e3:.1f} ms "
                  f"({s['uncached_tokens']:.0f} uncached + {s['queued_tokens']:.0f} queued tokens), "
                  f"delay to queued {s['behind'] * 1e3:.1f} ms, to running {s['others'] * 1e3:.1f} ms, "
                  f"memory {s['memory'] * 1e3:.1f} ms; output ~{out:.0f} tokens"
                  + (f"; loads adapter {request.lora_name} ({s['adapter_load'] * 1e3:.0f} ms)" if s["adapter_load"] else "")
                  + (f"; loads {s['loaded_tokens']:.0f} tokens from a lower KV tier ({s['tier_load'] * 1e3:.1f} ms)"
                     if s["loaded_tokens"] else "") + spread
                  + (f"; warms {warm[0]} with the {warm[1]} cached blocks instead of moving there "
                     f"(TTFT {scores[warm[0]]['ttft'] * 1e3:.1f} ms)" if warm else ""))
        return Decision(chosen, reason, scores, warm)

    @staticmethod
    def _lowest_cost(request: RoutingRequest, allowed: dict[str, dict[str, float]], inflight: dict[str, int]) -> str:
        best_key, best = None, []
        for rid, s in allowed.items():
            key = (round(s["cost"], 9), inflight[rid])
            if best_key is None or key < best_key:
                best_key, best = key, [rid]
            elif key == best_key:
                best.append(rid)
        return best[0] if len(best) == 1 else request.rng().choice(best)

    def _replicate(self, request: RoutingRequest, scores: dict[str, dict[str, float]], chosen: str,
                   inflight: dict[str, int]) -> tuple[str, tuple[str, int] | None]:
        """`replicate` (PredictiveConfig): (the replica to send to, the warm-up to book or None)."""
        cfg = self.config
        c = scores[chosen]
        u_min = min(s["uncached_tokens"] for s in scores.values())
        if c["uncached_tokens"] - u_min < cfg.replicate_min_tokens:
            return chosen, None
        bound = (1 + cfg.replicate_slack) * min(s["ttft"] for s in scores.values())
        if c["ttft"] <= bound:
            return chosen, None
        stay = self._lowest_cost(request, {rid: s for rid, s in scores.items() if s["ttft"] <= bound}, inflight)
        held = max(request.matched_blocks.values(), default=0)
        if held == 0:
            return stay, None
        key = request.block_hashes[held - 1]
        if any(rid == chosen or k == key for rid, k in self._warming.values()):
            return stay, None  # one warm-up at a time per replica and per prefix
        return stay, (chosen, held)

    @staticmethod
    def _spread(request: RoutingRequest, allowed: dict[str, dict[str, float]], lowest: float,
                factor: float) -> tuple[str, int]:
        """(the replica for `request` among those within factor × its work of the `lowest` cost,
        how many those are). Rendezvous hashing on the request's seed: the same request always
        takes the same one of a set, and a replica joining or leaving the set moves only the
        requests that it wins or held, so two instances whose sets differ by a replica near the
        bound still agree on most requests."""
        work = min(s["work"] for rid, s in allowed.items() if round(s["cost"], 9) == lowest)
        bound = lowest + factor * work
        near = [rid for rid, s in allowed.items() if s["cost"] <= bound]
        return max(near, key=lambda rid: xxhash.xxh3_64_intdigest(rid.encode(), seed=request.rng_seed)), len(near)

    def on_routed(self, request: RoutingRequest, decision: Decision) -> None:
        if request.warmup:  # a warm-up we asked for (Decision.warm), until its on_complete
            self._warming[request.request_id] = (decision.replica_id, request.block_hashes[-1])
        st = self._sent.get(decision.replica_id)
        if st is None:
            st = self._sent[decision.replica_id] = _Sent()
        rid = decision.replica_id
        cached = request.matched_blocks.get(rid, 0)
        if self.config.tier_aware:
            cached += request.offloaded_blocks.get(rid, 0)  # the replica queues these in full too
        st.add(request.request_id, cached * request.block_size, self._out_tokens(request))

    def on_complete(self, request: RoutingRequest, replica_id: str, ok: bool) -> None:
        self._warming.pop(request.request_id, None)
        st = self._sent.get(replica_id)
        if st is not None:
            st.done(request.request_id)

    def observe_steps(self, replica_id: str, steps) -> None:
        self.learner.observe(replica_id, steps)

    def on_replica_removed(self, replica_id: str) -> None:
        self.learner.forget(replica_id)
        self._sent.pop(replica_id, None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
