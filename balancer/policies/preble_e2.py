"""preble_e2: Preble's E2 (exploit + explore) global scheduler.

Sources: Preble, "Efficient Distributed Prompt Scheduling for LLM Serving" (arXiv 2407.00023,
ICLR'25), §4 E2; WukLab/preble multi_node/global_scheduler_with_time.py (`runtime_selector`,
`SlidingWindowHistogram`, `get_node_cost`) and benchmarks/exp_configs/model_equations.py.
Facts carried over:

- Exploit when the cached part of the prompt is longer than the part still to compute
  (`leaf_node.num_tokens < leaf_node.context_length - leaf_node.num_tokens`): send the request to
  a replica holding that prefix; among several holders, the one with the lowest load cost.
- Otherwise explore: for every replica, cost = load cost over a sliding history window (prefill
  time of the requests routed there, plus decode time of those still running) + the prefill time
  of *this* request's uncached tokens on that replica (+ an eviction cost, which Preble's scheduler
  leaves off by default: enable_eviction=False); take the argmin.
- Prefill time is a fitted step-time model of (new tokens, context); decode time is
  output_tokens x TPOT.

Mapping to kvfleet: the cached prefix of each replica is `request.matched_blocks`, device blocks
only (Preble models no lower KV tier; `request.offloaded_blocks` is not read) (Preble keeps
its own token radix tree of routed prompts; here the prefix index, exact or approximate, plays
that part); the window is kept per replica in `on_routed` with `request.now`, the running set in
`on_routed` / `on_complete`. Preble's per-prefix-node bookkeeping (miss rate x request count x
node prefill time) becomes, per routed request, the prefill time of the tokens it did not find
cached: the same sum, without the tree.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest

# Per replica, at most this many routed requests are remembered in the window (oldest dropped
# first); a bound on memory when the clock stalls or the rate is extreme, far above what 180 s of
# one replica's traffic holds in practice.
_MAX_WINDOW_ENTRIES = 100_000


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class PrebleE2Config:
    # SlidingWindowHistogram(window_duration=timedelta(minutes=3)) in GlobalSchedulerWithTime.
    window_s: float = 180.0
    # avg_topt_per_gpu is seeded with 0.15 s per output token before any request finishes
    # (GlobalSchedulerWithTime.__init__); Preble then tracks measured TPOT, which a balancer-side
    # policy does not see, so the seed stays.
    tpot_s: float = 0.15
    # Output length when the request carries no prediction and no max_tokens:
    # sampling_params.get("max_new_tokens", ..., 45) in runtime_selector.
    default_output_tokens: int = 45
    # Prefill step time in ms = a + b*new + c*context + d*new*context; Preble's
    # LP_Llama3_70B_H100_sglang_extend_flashinfer (model_equations.py), design §8.
    prefill_coeffs_ms: tuple[float, float, float, float] = (28.931389307785594, 0.182233431, 4.00365142e-03, 2.55050069e-06)

    def __post_init__(self) -> None:
        if not _is_number(self.window_s) or not 0.0 < self.window_s < float("inf"):
            raise ValueError(f"window_s must be a positive number of seconds, got {self.window_s!r}")
        if not _is_number(self.tpot_s) or not 0.0 <= self.tpot_s < float("inf"):
            raise ValueError(f"tpot_s must be a number >= 0, got {self.tpot_s!r}")
        if isinstance(self.default_output_tokens, bool) or not isinstance(self.default_output_tokens, int) or self.default_output_tokens < 0:
            raise ValueError(f"default_output_tokens must be an integer >= 0, got {self.default_output_tokens!r}")
        try:
            coeffs = tuple(float(c) for c in self.prefill_coeffs_ms)
        except (TypeError, ValueError):
            raise ValueError(f"prefill_coeffs_ms must be 4 numbers, got {self.prefill_coeffs_ms!r}") from None
        if len(coeffs) != 4 or not all(0.0 <= c < float("inf") for c in coeffs):
            raise ValueError(f"prefill_coeffs_ms must be 4 finite numbers >= 0, got {self.prefill_coeffs_ms!r}")
        object.__setattr__(self, "prefill_coeffs_ms", coeffs)


def prefill_time_s(new_tokens: int, context_tokens: int, coeffs_ms: tuple[float, float, float, float]) -> float:
    """Preble's fitted prefill time (seconds) of `new_tokens` on top of a `context_tokens` prompt."""
    if new_tokens <= 0:
        return 0.0
    a, b, c, d = coeffs_ms
    return (a + b * new_tokens + c * context_tokens + d * new_tokens * context_tokens) / 1e3


def output_tokens(request: RoutingRequest, default: int) -> float:
    if request.predicted_output_tokens is not None:
        return max(0.0, float(request.predicted_output_tokens))
    if request.max_tokens is not None:
        return float(max(0, request.max_tokens))
    return float(default)


def cached_tokens(request: RoutingRequest, replica_id: str) -> int:
    return min(request.prompt_tokens, request.matched_blocks.get(replica_id, 0) * request.block_size)


class _ReplicaLoad:
    """What this policy routed to one replica: a time-ordered window of prefill costs and the
    decode costs of requests still running. Sums are kept incrementally."""

    __slots__ = ("window", "prefill_sum", "running", "decode_sum")

    def __init__(self) -> None:
        self.window: deque[tuple[float, float]] = deque()  # (routed at, prefill seconds)
        self.prefill_sum = 0.0
        self.running: dict[str, float] = {}  # request id -> decode seconds
        self.decode_sum = 0.0

    def window_prefill(self, now: float, window_s: float) -> float:
        """Prefill seconds routed within (now - window_s, now]; does not modify the window."""
        total = self.prefill_sum
        horizon = now - window_s
        for routed_at, cost in self.window:  # expired entries sit at the head
            if routed_at > horizon:
                break
            total -= cost
        return max(total, 0.0)

    def prune(self, now: float, window_s: float) -> None:
        horizon = now - window_s
        while self.window and (self.window[0][0] <= horizon or len(self.window) > _MAX_WINDOW_ENTRIES):
            self.prefill_sum -= self.window.popleft()[1]
        if not self.window:
            self.prefill_sum = 0.0  # drop accumulated rounding


class PrebleE2Policy(Policy):
    name: ClassVar[str] = "preble_e2"
    Config: ClassVar[type] = PrebleE2Config
    uses_predicted_output: ClassVar[bool] = True

    def __init__(self, config: PrebleE2Config | None = None) -> None:
        self.config = config or PrebleE2Config()
        self._loads: dict[str, _ReplicaLoad] = {}
        self._running: dict[str, str] = {}  # request id -> replica id

    def _load_cost(self, replica_id: str, now: float) -> tuple[float, float]:
        load = self._loads.get(replica_id)
        if load is None:
            return 0.0, 0.0
        return load.window_prefill(now, self.config.window_s), load.decode_sum

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        cfg = self.config
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        inflight = {r.replica_id: r.inflight_requests for r in ordered}
        prompt = request.prompt_tokens
        cached = {rid: cached_tokens(request, rid) for rid in inflight}
        longest = max(cached.values())
        exploit = longest > prompt - longest

        scores: dict[str, dict[str, float]] = {}
        for rid in inflight:
            window_prefill, decode = self._load_cost(rid, request.now)
            new_prefill = prefill_time_s(prompt - cached[rid], prompt, cfg.prefill_coeffs_ms)
            scores[rid] = {
                "cached_tokens": float(cached[rid]),
                "window_prefill_s": window_prefill,
                "running_decode_s": decode,
                "load_cost_s": window_prefill + decode,
                "new_prefill_s": new_prefill,
                "explore_cost_s": window_prefill + decode + new_prefill,
                "exploit": 1.0 if exploit else 0.0,
            }

        if exploit:
            pool = [rid for rid in inflight if cached[rid] == longest]
            cost_name = "load_cost_s"
        else:
            pool = list(inflight)
            cost_name = "explore_cost_s"
        key = {rid: (scores[rid][cost_name], inflight[rid]) for rid in pool}
        best = min(key.values())
        tied = [rid for rid in pool if key[rid] == best]
        chosen = tied[0] if len(tied) == 1 else request.rng().choice(tied)

        if exploit:
            reason = (
                f"exploit: {longest} of {prompt} tokens cached (more than the {prompt - longest} uncached); "
                f"lowest load cost {scores[chosen]['load_cost_s']:.3f} s among {len(pool)} holder(s)"
            )
        else:
            reason = (
                f"explore: cached {longest} <= uncached {prompt - longest} tokens; lowest window load + "
                f"prefill cost {scores[chosen]['explore_cost_s']:.3f} s"
            )
        return Decision(replica_id=chosen, reason=reason, scores=scores)

    def on_routed(self, request: RoutingRequest, decision: Decision) -> None:
        cfg = self.config
        rid = decision.replica_id
        self._forget_running(request.request_id)
        load = self._loads.setdefault(rid, _ReplicaLoad())
        prompt = request.prompt_tokens
        prefill = prefill_time_s(prompt - cached_tokens(request, rid), prompt, cfg.prefill_coeffs_ms)
        # keep the window time-ordered even if a caller's clock steps back
        routed_at = max(request.now, load.window[-1][0]) if load.window else request.now
        load.window.append((routed_at, prefill))
        load.prefill_sum += prefill
        decode = output_tokens(request, cfg.default_output_tokens) * cfg.tpot_s
        load.running[request.request_id] = decode
        load.decode_sum += decode
        self._running[request.request_id] = rid
        for each in self._loads.values():  # every entry is popped once: amortized O(1)
            each.prune(request.now, cfg.window_s)

    def on_complete(self, request: RoutingRequest, replica_id: str, ok: bool) -> None:
        self._forget_running(request.request_id)

    def _forget_running(self, request_id: str) -> None:
        rid = self._running.pop(request_id, None)
        if rid is None:
            return
        load = self._loads.get(rid)
        if load is not None and request_id in load.running:
            load.decode_sum -= load.running.pop(request_id)
            if not load.running:
                load.decode_sum = 0.0

    def on_replica_removed(self, replica_id: str) -> None:
        load = self._loads.pop(replica_id, None)
        if load is not None:
            for request_id in load.running:
                self._running.pop(request_id, None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.config)}
