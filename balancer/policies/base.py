"""The one interface every routing policy implements.

The balancer calls a policy with one `RoutingRequest` (what it knows of the request: tokens,
block hashes, how many leading blocks each replica holds, predicted output length) and the
`ReplicaView`s of the replicas it may use (already filtered: healthy, not draining, breaker
closed — a policy never sees an unusable replica and is never called with none). The policy
returns a `Decision`: the replica and, for `explain`, each replica's score breakdown.

Policies are pure with respect to I/O: no sockets, no global metrics, no clocks of their own
(`RoutingRequest.now` is the time). State they keep (a radix tree of routed prompts, a ring, a
cursor) lives on the instance and is updated through `on_routed` / `on_complete` /
`on_replica_removed`. The balancer never branches on a policy's name: the factory in
`balancer.policies` maps a config to an object, and that's all.

Tie-breaks that need randomness draw from `RoutingRequest.rng_seed` (derived from the request's
content), so two balancer processes that saw the same events and loads make the same decision —
given the same views: with `RoutingRequest.consistent` (several uncoordinated instances) the
views carry only shared state, and a policy reads none of its own routing history.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple


# ReplicaLoad and ReplicaView are NamedTuples, not frozen dataclasses: the balancer builds one of
# each per usable replica for every request, and a frozen dataclass's __init__ (one
# object.__setattr__ per field) costs about 5x a tuple's. Immutable all the same.
class ReplicaLoad(NamedTuple):
    """What a replica last reported about itself (kvfleet load reports, or /load, or metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens admitted but not yet computed
    running_decode_tokens: int = 0  # KV tokens held by running requests
    free_blocks: int = 0
    total_blocks: int = 0
    kv_usage: float = 0.0  # 0..1
    age_s: float = float("inf")  # seconds since the report; inf = never reported


class ReplicaView(NamedTuple):
    """One usable replica as a policy sees it."""

    replica_id: str
    inflight_requests: int = 0  # requests this balancer sent that have not finished
    inflight_tokens: int = 0  # their prompt + predicted output tokens
    sent_since_report: int = 0  # requests this balancer sent after the replica's last load report
    sent_tokens_since_report: int = 0  # and their uncached prompt tokens
    load: ReplicaLoad = ReplicaLoad()
    cached_blocks: int = 0  # blocks the prefix index holds for this replica
    loras: frozenset[str] = frozenset()  # LoRA adapters resident there (its last load report)
    lora_load_s: float = 0.0  # seconds its adapter loads took, on average (0: not measured yet)


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    request_id: str
    prompt_text: str  # rendered prompt (chat template applied); for text-based policies
    prompt_tokens: int
    block_hashes: tuple[int, ...]  # chained hashes of the prompt's full blocks
    block_size: int
    matched_blocks: Mapping[str, int]  # replica id -> leading blocks of block_hashes it holds (on the device)
    max_tokens: int | None = None
    predicted_output_tokens: float | None = None
    first_user_message: str | None = None  # chat: first user message text (KubeAI's CHWBL key)
    now: float = 0.0
    rng_seed: int = 0  # for deterministic tie-breaks
    sequences: int = 1  # sequences it decodes: n (or best_of) per prompt, times the prompts of a batch
    extra_prefill_tokens: int = 0  # prompt tokens beyond the hashed prompt (a batch's other prompts)
    lora_name: str | None = None  # the LoRA adapter the request names as its `model`; None: a base model
    # replica id -> blocks right after its device prefix that it holds in a lower KV tier (host
    # memory, disk), continuing the chain: what its engine would load instead of recompute
    # (PrefixIndex.match_offloaded). Empty where no replica publishes a non-GPU medium.
    offloaded_blocks: Mapping[str, int] = field(default_factory=dict)
    warmup: bool = False  # a prefill-only warm-up the router booked for a Decision.warm, no client's
    # replica id -> of those, the blocks it holds on disk only, loaded over the disk's own (slower)
    # link (PrefixIndex.match_disk); the rest come from host memory. Empty without a disk tier.
    offloaded_disk_blocks: Mapping[str, int] = field(default_factory=dict)
    # Decide only from state every balancer instance shares (BalancerConfig.consistent_routing):
    # the views then hold no bookkeeping of this instance's own (Registry.views), and a policy
    # must not read what it keeps of its own routing either (predictive's per-replica history of
    # sends) nor this instance's clock beyond the reports' age, so that any instance fed the
    # same KV events and load reports picks the same replica for this request.
    consistent: bool = False

    def rng(self) -> random.Random:
        return random.Random(self.rng_seed)


class Decision:
    """The chosen replica, why (`reason`), and each candidate's score breakdown (`scores`: replica
    -> name -> value). A policy may give `reason` and `scores` as zero-argument callables: they
    are then built only when read (by `explain`, the tests), not on every routed request."""

    __slots__ = ("replica_id", "_reason", "_scores", "warm")

    def __init__(self, replica_id: str, reason: str | Callable[[], str] = "",
                 scores: Mapping[str, Mapping[str, float]] | Callable[[], Mapping[str, Mapping[str, float]]]
                 | None = None, warm: tuple[str, int] | None = None) -> None:
        self.replica_id = replica_id
        self._reason = reason
        self._scores = {} if scores is None else scores
        # (replica id, n): the policy asks for the prompt's first n blocks to be computed on that
        # replica too, ahead of demand (a prefill-only warm-up request the router books and the
        # proxy or simulator sends beside this one); None: nothing to warm.
        self.warm = warm

    @property
    def reason(self) -> str:
        if callable(self._reason):
            self._reason = self._reason()
        return self._reason

    @property
    def scores(self) -> Mapping[str, Mapping[str, float]]:
        if callable(self._scores):
            self._scores = self._scores()
        return self._scores

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.replica_id, self.reason, self.scores) == (other.replica_id, other.reason, other.scores)

    __hash__ = None  # like the dataclass it replaced (its scores are dicts)

    def __repr__(self) -> str:
        return f"Decision(replica_id={self.replica_id!r}, reason={self.reason!r})"


def adapter_candidates(request: RoutingRequest, replicas: Sequence[ReplicaView],
                       slack: int) -> Sequence[ReplicaView]:
    """The replicas a request for a LoRA adapter should choose among, for a policy that does
    not price an adapter load itself: those that hold the adapter resident, unless even the
    least busy of them has more than `slack` requests in flight beyond the least busy replica
    that would have to load it (then every replica: a hot adapter must not pile up on the
    replicas that loaded it first). A request for a base model, or an adapter no replica
    holds, keeps every replica. Pure; returns `replicas` itself when it keeps them all."""
    name = request.lora_name
    if name is None:
        return replicas
    holders = [v for v in replicas if name in v.loras]
    if not holders or len(holders) == len(replicas):
        return replicas
    held_min = min(v.inflight_requests for v in holders)
    cold = min(v.inflight_requests for v in replicas if name not in v.loras)
    return holders if held_min <= cold + slack else replicas


class Policy(ABC):
    """Base class of all routing policies. Subclasses set `name` and implement `select`."""

    name: ClassVar[str] = ""
    # True if the policy reads `prompt_text` / `first_user_message` (text-based peers); lets the
    # simulator skip decoding prompts for the others.
    needs_text: ClassVar[bool] = False
    # True if the policy reads `predicted_output_tokens`: the router runs (and trains) the
    # output-length predictor only for such policies, so the others pay nothing for it.
    uses_predicted_output: ClassVar[bool] = False
    # True if `select` prices loading a LoRA adapter on a replica that does not hold it
    # (`ReplicaView.loras`, `lora_load_s`); otherwise the router narrows a request for an
    # adapter to the replicas holding it first (`adapter_candidates`).
    prices_adapter_load: ClassVar[bool] = False

    @abstractmethod
    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        """Pick one of `replicas` (non-empty, all usable). Must not mutate policy state:
        `explain` calls it without sending anything. State changes go in `on_routed`."""

    def on_routed(self, request: RoutingRequest, decision: Decision) -> None:
        """The request was sent to decision.replica_id."""

    def on_complete(self, request: RoutingRequest, replica_id: str, ok: bool) -> None:
        """The request finished (ok) or failed on replica_id."""

    def observe_steps(self, replica_id: str, steps) -> None:
        """A replica reported its recent engine steps (`protocol.load.StepSample`s)."""

    def on_replica_removed(self, replica_id: str) -> None:
        """Forget anything kept about a replica that left the fleet."""

    def describe(self) -> dict[str, Any]:
        """The policy's settings, for the admin API and logs."""
        return {"name": self.name}
