"""A discrete-event simulation of a fleet behind the balancer.

Events are request arrivals and replica step ends, on one virtual clock. Each replica is the
real `LLMEngine` (scheduler, KV cache manager, block pool) with the `SimExecutor`; routing is
the balancer's own `Router` and policy objects over a `PrefixIndex` fed by the replicas'
block-pool events after every step and a `Registry` fed by their load reports at a live
replica's cadence (`load_report_interval_s`) — the code the live balancer runs, minus the sockets.

    arrival(t) ─▶ hash prompt ─▶ Router.route (the proxy's routing transaction) ─▶ engine.add_request
    step(replica, t): engine.step() advances the replica's clock by the modelled duration d;
    at t + d (what the step made is seen when it ends, as live):
                      block events ─▶ index; a load report when one is due ─▶ registry;
                      outputs ─▶ per-request records; a finished request ─▶ Booking.finish;
                      next step while the replica has work (idle: a report within the interval).

With KV offload tiers (FleetConfig.host_kv_blocks, simulator/tiers.py) each replica's pool
spills evicted blocks to host memory and loads a prefix found there back, the step taking the
transfer's modelled time; the tiers' events (medium CPU / STORAGE) reach the index like the pool's,
and each step's loaded tokens reach the policy in the load reports.

A request that arrives while its replica is mid-step joins at the next step, as in a real
engine. A replica reports its load when a step ends (at most every `load_report_interval_s`),
counting the requests that arrived during the step as waiting, as a live replica counts its
engine loop's inbox. Load reports and events reach the balancer when made (a live fleet adds
~ms). What a live fleet adds per request outside the engines — the HTTP hops through the
balancer to the engine queue, and each token's way back — is `request_latency_s` /
`response_latency_s` (measured on a live sim fleet by bench/bench_sim_agreement.py). Prompts a
replica would reject (longer than `max_model_len`) are rejected at arrival.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from balancer.approx_index import ApproxIndex
from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
from balancer.digest_index import DigestIndex
from balancer.disagg import PairConfig, PairSelector
from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Booking, PairBooking, Router
from protocol.digest import HEADER_BYTES, BlockFilter, CacheDigest
from balancer.sessions import SessionConfig, Sessions
from protocol.events import MEDIUM_CPU, MEDIUM_DISK
from protocol.hashing import hash_blocks, root_hash
from protocol.openai_api import GenerationRequest
from protocol.roles import BOTH, DECODE, PREFILL
from protocol.tokenizer import ByteTokenizer
from replica.engine import SIM_MAX_MODEL_LEN, LLMEngine
from replica.kv_cache_manager import KVCacheManager
from replica.lora import AdapterSlots, LoraModule, LoraTag
from replica.request import SamplingParams
from replica.scheduler import Scheduler, SchedulerConfig, TooLarge
from replica.sim_executor import SimExecutor
from replica.step_model import SimPreset
from simulator.tiers import fleet_tier_cost, fleet_tiers
from simulator.kv_link import KV_LINKS, KvLink

MODEL = "sim"


class Prompt:
    """A prompt materialised once and shared by every policy's run: its token ids (as bytes when
    every id fits in one, a quarter of a Python list's memory) and its block-hash chain."""

    __slots__ = ("_tokens", "hashes", "block_size", "root")

    def __init__(self, token_ids: Sequence[int], block_size: int, root: int) -> None:
        ids = list(token_ids)
        try:
            self._tokens: bytes | list[int] = bytes(ids)  # ValueError unless every id is in 0..255
        except ValueError:
            self._tokens = ids
        self.hashes: tuple[int, ...] = tuple(hash_blocks(ids, block_size, root))
        self.block_size = block_size
        self.root = root

    def token_ids(self) -> list[int]:
        return list(self._tokens)

    def text(self) -> str:
        """`ByteTokenizer().decode(token_ids)`, without a Python loop over the tokens."""
        if isinstance(self._tokens, bytes):
            return self._tokens.decode("utf-8", errors="replace")
        return ByteTokenizer().decode(self._tokens)


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulation: when it arrives, its prompt, how much it generates."""

    arrival_s: float
    token_ids: Callable[[], list[int]]  # materialised lazily, at arrival
    output_length: int
    input_length: int
    tag: str = ""  # tenant / session, for reports
    prompt: Prompt | None = None  # the prompt materialised once (else `token_ids()` at each arrival)
    lora_name: str | None = None  # the LoRA adapter it names as its model (one of FleetConfig.lora_adapters)
    session: str = ""  # the conversation it belongs to: its session key when sessions are on ("": none)


@dataclass(frozen=True)
class FleetConfig:
    replicas: int
    preset: SimPreset
    policy: str
    policy_options: tuple[tuple[str, object], ...] = ()
    kv_blocks: int | None = None  # per replica; None = the preset's
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    seed: int = 0
    oracle_lengths: bool = False  # give policies the true output length instead of a prediction
    # The router sees each request's `max_tokens` = its trace output length, as it does behind
    # a live loadgen (which sends `max_tokens = output_length` with `ignore_eos` to reproduce the
    # trace's lengths): predictions are capped at it and the regressor reads it as a feature.
    # False (default): traces record no max_tokens, so the router sees none.
    client_max_tokens: bool = False
    # What a live fleet adds to each request outside the engine's steps (seconds): from the
    # client sending it to its replica's engine queue (HTTP to the balancer, routing, the hop to
    # the replica, parsing, tokenizing, the engine loop's wake-up), and from a token leaving a
    # step to the client (SSE through replica and balancer). See docs/benchmarks.md for the
    # values measured on a live sim fleet; 0 = the engines alone.
    request_latency_s: float = 0.0
    response_latency_s: float = 0.0
    # How often a replica's load report reaches the registry (virtual seconds): a live replica
    # publishes one after a step once this long has passed since the last, and while idle at
    # least this often (replica.service.ServiceConfig, 0.1 s), with the steps made since. 0 =
    # after every step (fresher than any live fleet). KV events still arrive after every step,
    # as a live replica publishes them.
    load_report_interval_s: float = 0.0
    # Each replica also reports as soon as new requests join its queue (`kvfleet replica
    # --load-report-on-arrival`): at once when idle, else when the step in flight ends (live, a
    # request waits in the engine loop's inbox until then).
    report_on_arrival: bool = False
    # Longest prompt + output a replica takes (a live sim replica's default); longer prompts, and
    # prompts needing more KV blocks than a replica has, are rejected at arrival as a replica
    # would reject them (live, the balancer routes them first and relays the 400).
    max_model_len: int = SIM_MAX_MODEL_LEN
    # LoRA adapters every replica serves (`--lora-modules`), at most `max_loras` resident per
    # replica, each load taking `lora_load_s` of modelled time (replica.lora, sim_executor).
    lora_adapters: tuple[str, ...] = ()
    max_loras: int = 1
    lora_load_s: float = 0.04
    # Where the policies' cached prefixes come from (the balancer's index_source): "events" (the
    # exact index, fed after every step) or "digests" (each replica's cache digest, taken every
    # `digest_interval_s` virtual seconds, the replicas' phases spread over the interval, and
    # read as the live balancer reads them: balancer/digest_index.py).
    index_source: str = "events"
    digest_interval_s: float = 1.0
    digest_filter: str = "binary_fuse8"
    # Sticky sessions (balancer/sessions.py): with `enabled`, each request's `session` is its
    # session key, as a live client's session header.
    sessions: SessionConfig = SessionConfig()
    # Balancer instances in front of the fleet (issue #18 part 3), uncoordinated: each has its
    # own registry bookkeeping (in-flight, sent-since-report), index and policy, all fed the same
    # KV events and load reports; request i goes to instance i mod N (round robin). With N > 1,
    # SimResult.extra["agreement"] is the share of routed requests for which every other instance,
    # asked at that moment without booking (Router.choose), would have picked the same replica.
    balancers: int = 1
    # The instances decide from shared state only (BalancerConfig.consistent_routing): the load
    # reports and KV events every instance gets, not their own sends (balancer/router.py).
    consistent_routing: bool = False
    # KV offload tiers below each replica's device pool (simulator/tiers.py): blocks the pool
    # evicts spill to a host tier of `host_kv_blocks` (then a disk tier of `disk_kv_blocks`), are
    # published with medium CPU / STORAGE, and a prefix found there is loaded back at the tier
    # link's bandwidth (the preset's PCIe / NVMe figures, or `host_link`). 0: no such tier.
    host_kv_blocks: int = 0
    disk_kv_blocks: int = 0
    host_link: str = ""
    # Prefill/decode disaggregation (issue #19 part 3): of the `replicas`, the first
    # `prefill_replicas` only prefill, the next `decode_replicas` only decode, the rest do both.
    # A request split over a pair (balancer/disagg.py picks it) prefills on one with max_tokens 1,
    # its prompt's KV (the tokens the decode replica does not cache) goes over `kv_link` —
    # `kv_bytes_per_token` over `kv_lanes` parallel links (simulator/kv_link.py) — and it decodes
    # on the other from its first token. 0 and 0: a unified fleet, every request routed whole.
    prefill_replicas: int = 0
    decode_replicas: int = 0
    kv_link: KvLink = KV_LINKS["ib-ndr"]
    kv_bytes_per_token: int = 131_072  # Llama-3-8B bf16 (simulator/kv_link.py PRESET_KV)
    kv_lanes: int = 1

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0 or self.decode_replicas > 0

    def role(self, i: int) -> str:
        """The role of replica i."""
        if i < self.prefill_replicas:
            return PREFILL
        return DECODE if i < self.prefill_replicas + self.decode_replicas else BOTH

    def __post_init__(self) -> None:
        fleet_tiers(self.host_kv_blocks, self.disk_kv_blocks)  # raises on a bad combination
        fleet_tier_cost(self.preset, self.block_size, self.host_link)  # ... and on an unknown link
        if self.balancers < 1:
            raise ValueError("balancers must be at least 1")
        if self.prefill_replicas < 0 or self.decode_replicas < 0:
            raise ValueError("prefill_replicas and decode_replicas must be >= 0")
        if self.prefill_replicas + self.decode_replicas > self.replicas:
            raise ValueError(f"{self.prefill_replicas} prefill + {self.decode_replicas} decode replicas exceed the "
                             f"fleet's {self.replicas}; give replicas >= their sum (the rest do both)")
        if self.disaggregated and (self.prefill_replicas == self.replicas or self.decode_replicas == self.replicas):
            raise ValueError("a disaggregated fleet needs replicas that can prefill and replicas that can decode")
        if self.disaggregated and (self.balancers > 1 or self.lora_adapters):
            raise ValueError("disaggregated fleets are simulated with one balancer and no LoRA adapters")
        if self.kv_bytes_per_token < 1 or self.kv_lanes < 1:
            raise ValueError("kv_bytes_per_token and kv_lanes must be positive")
        if self.index_source not in ("events", "digests"):
            raise ValueError(f"index_source must be events or digests, got {self.index_source!r}")
        if self.digest_interval_s <= 0:
            raise ValueError("digest_interval_s must be positive")
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.max_loras < 1 or self.lora_load_s < 0:
            raise ValueError("max_loras must be >= 1 and lora_load_s >= 0")
        if self.request_latency_s < 0 or self.response_latency_s < 0:
            raise ValueError("request and response latencies must be non-negative")
        if self.load_report_interval_s < 0:
            raise ValueError("load_report_interval_s must be >= 0 (0: a report after every step)")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")


@dataclass
class RequestRecord:
    index: int
    arrival: float
    replica: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    first_token: float | None = None
    finish: float | None = None
    predicted_cached_tokens: int = 0
    rejected: bool = False  # too long for a replica: never routed (or refused at its hand-over)
    preemptions: int = 0  # times the replica preempted it (recomputed later)
    prefill_replica: str = ""  # split over a pair: where it prefilled (`replica` decoded it)
    transfer_s: float = 0.0  # split: from its prefill's end to its KV being on the decode replica

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.output_tokens - 1)


class _SimReplica:
    def __init__(self, rid: str, cfg: FleetConfig, role: str = BOTH) -> None:
        self.rid = rid
        self.role = role
        self.pending: list[tuple] = []  # hand-overs arrived while it had no room, oldest first
        self.egress_free = self.ingress_free = 0.0  # when its KV link is next free, each way
        self.prefill_tokens_run = 0  # prompt tokens its steps computed (0 on a decode replica)
        self.now = 0.0
        self.busy = False
        p = cfg.preset
        self.kv = KVCacheManager(cfg.kv_blocks or p.kv_blocks, cfg.block_size, root_hash(MODEL),
                                 tiers=fleet_tiers(cfg.host_kv_blocks, cfg.disk_kv_blocks))
        sched_cfg = SchedulerConfig(cfg.max_num_seqs or p.max_num_seqs,
                                    cfg.max_num_batched_tokens or p.max_num_batched_tokens, cfg.max_model_len,
                                    cfg.max_loras)
        clock = self._clock
        modules = tuple(LoraModule(name, f"sim/{name}", i + 1) for i, name in enumerate(cfg.lora_adapters))
        self.loras = AdapterSlots(modules, cfg.max_loras, lambda m: None, cfg.lora_load_s) if modules else None
        if self.loras is not None:
            self.loras.preload()
        tags = {m.name: LoraTag(m.name, m.lora_id, root_hash(MODEL, lora_name=m.name)) for m in modules}
        executor = SimExecutor(p.model, self._advance, self.loras, kv=self.kv,
                               tier_cost=fleet_tier_cost(p, cfg.block_size, cfg.host_link))
        self.engine = LLMEngine(Scheduler(sched_cfg, self.kv, clock), executor,
                                ByteTokenizer(), clock, detokenize=False, loras=self.loras, lora_tags=tags)

    def _clock(self) -> float:
        return self.now

    reported_at = float("-inf")  # virtual time of the last load report
    digest = None  # the latest cache digest (digest mode), rebuilt only when the cache changed
    digest_version = -1
    digest_bytes = 0
    reported_steps = 0  # engine steps the last report held
    arrivals_unreported = False  # requests joined mid-step, reported when it ends (report_on_arrival)

    def _advance(self, duration: float, out=None) -> None:
        self.now += duration

    def load(self) -> ReplicaLoad:
        s = self.engine.scheduler
        return ReplicaLoad(num_running=s.num_running, num_waiting=s.num_waiting,
                           queued_prefill_tokens=s.queued_prefill_tokens(),
                           running_decode_tokens=s.running_decode_tokens(), free_blocks=self.kv.num_free_blocks,
                           total_blocks=self.kv.num_blocks, kv_usage=self.kv.usage, age_s=0.0)


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    replica_ids: list[str]
    steps: int = 0
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)


class FleetSimulation:
    def __init__(self, cfg: FleetConfig, predictor=None, predictor_factory: Callable[[], object] | None = None) -> None:
        """`predictor`: the output-length predictor every balancer instance consults (None: none,
        or the oracle's true lengths); `predictor_factory`: a fresh one per instance instead, each
        learning only from the requests that instance routed, as separate live balancers do."""
        self.cfg = cfg
        self.now = 0.0
        self.replicas = {f"r{i}": _SimReplica(f"r{i}", cfg, cfg.role(i)) for i in range(cfg.replicas)}
        # Registry ids are URLs; keep a map both ways.
        self._url = {rid: f"http://{rid}.sim:80" for rid in self.replicas}
        self._rid = {v: k for k, v in self._url.items()}
        self.instances = [self._instance(predictor if predictor_factory is None else predictor_factory())
                          for _ in range(cfg.balancers)]
        # The first instance under the names a single-balancer run has always used.
        self.registry, self.index, self.policy, self.digests, self.router = self.instances[0]
        self.agreed = self.compared = 0
        self.sessions = self.router.sessions  # the first instance's table (each instance has its own)
        self.root = root_hash(MODEL)
        self._lora_roots = {name: root_hash(MODEL, lora_name=name) for name in cfg.lora_adapters}
        self.kv_blocks = cfg.kv_blocks or cfg.preset.kv_blocks
        self.roles = {self._url[rid]: rep.role for rid, rep in self.replicas.items()}

    def _clock(self) -> float:
        return self.now

    def _instance(self, predictor):
        """One balancer instance: (registry, index, policy, digests, router)."""
        cfg = self.cfg
        # A request reaches the replica's queue request_latency_s after it is routed.
        registry = Registry(BreakerConfig(), HealthConfig(), self._clock, in_transit_s=cfg.request_latency_s)
        for rid, rep in self.replicas.items():  # a role as `ROLE@URL` configures it
            state = registry.add(ReplicaSpec(url=f"http://{rid}.sim:80", role=None if rep.role == BOTH else rep.role))
            if cfg.lora_adapters:  # what its /v1/models would list
                registry.set_models(state, frozenset((MODEL, *cfg.lora_adapters)),
                                    {name: MODEL for name in cfg.lora_adapters})
        index = PrefixIndex(cfg.block_size, MODEL)
        policy = make_policy(cfg.policy, dict(cfg.policy_options))
        # Digest mode: no digest ages out (each replica sends one every interval, none is lost).
        digests = DigestIndex(cfg.block_size, float("inf"), self._clock) if cfg.index_source == "digests" else None
        # The pair stage prices the hand-over as the link does, on the policy's step learner when
        # it has one (predictive), else its own, fed the same load reports (`_deliver`).
        link = cfg.kv_link
        pairs = PairSelector(PairConfig(transfer_s_per_token=link.seconds_per_token(
            cfg.kv_bytes_per_token, cfg.kv_lanes), transfer_latency_s=link.latency_s),
            getattr(policy, "learner", None)) if cfg.disaggregated else None
        router = Router(MODEL, cfg.block_size, ByteTokenizer(), index,
                        ApproxIndex(clock=self._clock), policy, registry,
                        has_events=lambda rid: True, predictor=predictor, clock=self._clock,
                        digests=digests, uses_digest=lambda rid: True, sessions=Sessions(cfg.sessions),
                        consistent=cfg.consistent_routing, pairs=pairs)
        return registry, index, policy, digests, router

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        import time as _time

        wall = _time.perf_counter()
        heap: list[tuple[float, int, int, object]] = []
        seq = itertools.count()
        ARRIVE, STEP, ENQUEUE, REPORT, DELIVER, DIGEST, HANDOVER = 0, 1, 2, 3, 4, 5, 6
        interval = self.cfg.load_report_interval_s
        req_lat, resp_lat = self.cfg.request_latency_s, self.cfg.response_latency_s
        for i, r in enumerate(requests):
            heapq.heappush(heap, (r.arrival_s, next(seq), ARRIVE, i))
        digests = self.digests
        if digests is not None:  # phases spread over the interval, as unsynchronised replicas
            period = self.cfg.digest_interval_s
            for j, rep in enumerate(self.replicas.values()):
                heapq.heappush(heap, (period * j / len(self.replicas), next(seq), DIGEST, rep))
        pending_digests = len(self.replicas) if digests is not None else 0  # DIGEST events in the heap
        records: list[RequestRecord] = []
        live: dict[str, tuple[RequestRecord, Booking]] = {}  # the booking to finish when it ends
        splits: dict[str, _Split] = {}  # requests split over a pair, until their prefill ends
        steps = 0
        warmups = 0  # prefill-only warm-up requests sent (Booking.warm)
        index, registry, policy = self.index, self.registry, self.policy
        heappush, heappop = heapq.heappush, heapq.heappop

        def enqueue(rep: "_SimReplica", add: tuple, t: float) -> None:
            """Into the replica's queue at t; an idle replica steps from then."""
            self._enqueue(rep, add, t)
            if not rep.busy:
                rep.busy = True
                rep.now = max(rep.now, t)
                heappush(heap, (rep.now, next(seq), STEP, rep))

        while heap:
            t, _, kind, x = heappop(heap)
            self.now = t
            if kind == DIGEST:
                self._take_digest(x)
                pending_digests -= 1
                if len(heap) > pending_digests:  # other work is left: the replica digests again
                    heappush(heap, (t + self.cfg.digest_interval_s, next(seq), DIGEST, x))
                    pending_digests += 1
                continue
            if kind == ARRIVE:
                rec, booking, rep, add = self._arrive(x, requests[x], t)
                records.append(rec)
                if rec.rejected:
                    continue
                warm = getattr(booking, "warm", None)
                if warm is not None:  # a prefill-only request beside it (Booking.warm), not a client's
                    wrep = self.replicas[self._rid[warm.booking.replica_id]]
                    wid = warm.booking.rr.request_id
                    live[wid] = (RequestRecord(-1, t, wrep.rid, len(warm.prepared.token_ids)), warm.booking)
                    warmups += 1
                    wadd = (wid, list(warm.prepared.token_ids),
                            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
                    if req_lat > 0:
                        heappush(heap, (t + req_lat, next(seq), ENQUEUE, (wrep, wadd)))
                    else:
                        enqueue(wrep, wadd, t)
                if isinstance(booking, _Split):  # prefill here, decode there
                    splits[str(x)] = booking
                    booking = booking.pair.decode
                live[str(x)] = (rec, booking)
                if req_lat > 0:  # routed now, in the replica's queue later
                    heappush(heap, (t + req_lat, next(seq), ENQUEUE, (rep, add)))
                    continue
                enqueue(rep, add, t)
            elif kind == ENQUEUE:
                enqueue(*x, t)
            elif kind == HANDOVER:  # a split request's KV is on its decode replica
                rep, item = x
                live[item[0]][0].transfer_s = t - item[3]
                if self._admit(rep, item, t, live):
                    if not rep.busy:
                        rep.busy = True
                        rep.now = max(rep.now, t)
                        heappush(heap, (rep.now, next(seq), STEP, rep))
                elif not rep.busy:
                    raise RuntimeError(f"replica {rep.rid} is idle but cannot take hand-over {item[0]}")
                else:
                    rep.pending.append(item)  # no blocks or slot now: retried after its steps
            elif kind == STEP:  # the step runs from t to rep.now; what it made is seen at rep.now
                rep = x
                rep.now = max(rep.now, t)
                before = rep.engine.num_steps
                touched = rep.engine.step_requests()
                if rep.engine.num_steps > before:
                    rep.prefill_tokens_run += rep.engine.steps[-1].prefill_tokens
                steps += 1
                heappush(heap, (rep.now, next(seq), DELIVER, (rep, touched, rep.kv.take_events())))
            elif kind == DELIVER:
                rep, touched, events = x
                url = self._url[rep.rid]
                if events and digests is None:
                    for inst in self.instances:
                        inst[1].apply_many(url, events)
                # Made when the step ends, as a live replica reports after each step: what the step
                # did, and the requests that arrived during it (live, they wait in the engine loop's
                # inbox and the report counts them as waiting, their prompts as queued prefill).
                if t - rep.reported_at >= interval or rep.arrivals_unreported:
                    rep.arrivals_unreported = False
                    self._deliver(rep, url, self._snapshot(rep))
                seen = t + resp_lat
                for req in touched:
                    split = splits.get(req.request_id)
                    if split is not None and rep is split.prefill:
                        if req.status.finished:  # prefill done, first token sampled: hand over
                            del splits[req.request_id]
                            self._hand_over(split, req, t, live, lambda at, item: heappush(
                                heap, (at, next(seq), HANDOVER, item)))
                        continue
                    rec, booking = live[req.request_id]
                    if rec.first_token is None:
                        rec.first_token = seen
                        rec.cached_tokens = max(req.num_cached_tokens, 0)
                    if req.status.finished:
                        rec.finish = seen
                        rec.output_tokens = req.num_output_tokens
                        rec.preemptions += req.num_preemptions  # a split request's prefill ones too
                        booking.finish(req.num_output_tokens)
                        del live[req.request_id]
                while rep.pending and self._admit(rep, rep.pending[0], t, live):
                    rep.pending.pop(0)
                if rep.engine.has_unfinished():
                    heappush(heap, (t, next(seq), STEP, rep))
                else:
                    rep.busy = False
                    if rep.reported_at < t:  # idle: a live replica reports within the interval
                        heappush(heap, (max(t, rep.reported_at + interval), next(seq), REPORT, rep))
            elif kind == REPORT:
                rep = x
                if not rep.busy and rep.reported_at < t:
                    rep.now = max(rep.now, t)
                    self._deliver(rep, self._url[rep.rid], self._snapshot(rep))
        extra = {"balancers": len(self.instances)}
        if warmups:
            extra["warmups"] = warmups
        if self.cfg.sessions.enabled:
            routed = [inst[4].sessions.routed for inst in self.instances]  # every instance's table
            extra["sessions"] = {k: sum(r[k] for r in routed) for k in routed[0]}
        if len(self.instances) > 1:
            extra["agreement"] = self.agreed / self.compared if self.compared else 1.0
        learner = getattr(self.policy, "learner", None)
        if self.cfg.host_kv_blocks and learner is not None:  # what the policy learned a load costs, and the truth
            cost = fleet_tier_cost(self.cfg.preset, self.cfg.block_size, self.cfg.host_link)
            media = (MEDIUM_CPU, MEDIUM_DISK) if self.cfg.disk_kv_blocks else (MEDIUM_CPU,)
            extra["load_s_per_token"] = {
                m: {"learned": learner.load_cost(self._url[next(iter(self.replicas))], m),
                    "true": cost.seconds(m, "GPU", 1) / self.cfg.block_size} for m in media}
        if self.cfg.disaggregated:
            split = [r for r in records if r.prefill_replica]
            extra["disagg"] = {
                "roles": dict(self.roles),
                "split_requests": len(split),
                "mean_transfer_s": sum(r.transfer_s for r in split) / len(split) if split else 0.0,
                # prompt tokens each replica's steps computed (a decode replica's only from preemptions)
                "prefill_tokens": {self._url[rid]: rep.prefill_tokens_run for rid, rep in self.replicas.items()},
            }
        return SimResult(self.cfg.policy, records, [self._url[r] for r in self.replicas], steps,
                         _time.perf_counter() - wall, extra)

    def _enqueue(self, rep: "_SimReplica", add: tuple, t: float) -> None:
        """A routed request joins rep's queue at t (with report_on_arrival, the report saying so:
        now if rep is idle, else when its step in flight ends)."""
        rep.engine.add_request(*add)
        if self.cfg.report_on_arrival:
            if rep.busy:
                rep.arrivals_unreported = True
            else:
                rep.now = max(rep.now, t)
                self._deliver(rep, self._url[rep.rid], self._snapshot(rep))

    def _hand_over(self, split: "_Split", req, t: float, live: dict, push: Callable) -> None:
        """`req` ended its prefill on split.prefill at t: release that side and send its KV to
        the decode replica over the link (the blocks the decode replica already caches stay)."""
        rec, _ = live[req.request_id]
        split.pair.prefill.finish(1)
        rec.cached_tokens = max(req.num_cached_tokens, 0)
        rec.preemptions += req.num_preemptions
        sampled = req.output_token_ids
        if split.output_length <= len(sampled):  # nothing left to decode: it ends here
            rec.first_token = rec.finish = t + self.cfg.response_latency_s
            rec.output_tokens = len(sampled)
            split.pair.decode.finish(len(sampled))
            del live[req.request_id]
            return
        dec, cfg = split.decode, self.cfg
        tokens = split.tokens
        moved = len(tokens) - dec.kv.cached_prefix_tokens(tokens, dec.engine.lora_tags.get(split.lora_name))
        busy_s = moved * cfg.kv_link.seconds_per_token(cfg.kv_bytes_per_token, cfg.kv_lanes)
        start = max(t, split.prefill.egress_free, dec.ingress_free)  # one hand-over at a time each way
        split.prefill.egress_free = dec.ingress_free = start + busy_s
        params = SamplingParams(max_tokens=split.output_length, temperature=0.0, ignore_eos=True,
                                lora_name=split.lora_name)
        push(start + busy_s + cfg.kv_link.latency_s, (dec, (req.request_id, tokens, sampled, t, params)))

    def _admit(self, rep: "_SimReplica", item: tuple, t: float, live: dict) -> bool:
        """Try to start a handed-over request on its decode replica (`LLMEngine.add_prefilled`,
        the live decode replica's entry too); its first token reaches the client then (the
        decode replica streams it, having the prefill's token with the KV). False: no room now,
        try after a step. A request this replica's whole cache cannot hold (its prompt and first
        token fill the last block the arrival check allowed) ends rejected, its decode booking
        failed, as the live balancer answers it when no replica can hold it: True, nothing to retry."""
        request_id, tokens, sampled, _, params = item
        try:
            if rep.engine.add_prefilled(request_id, tokens, sampled, params) is None:
                return False
        except TooLarge:
            rec, booking = live.pop(request_id)
            rec.rejected = True
            booking.fail()
            return True
        live[request_id][0].first_token = t + self.cfg.response_latency_s
        return True

    def _take_digest(self, rep: "_SimReplica") -> None:
        """The replica's cache digest as its publisher makes it now, delivered at once."""
        pool = rep.kv.pool
        if rep.digest is None or rep.digest_version != pool.cache_version:
            cached = pool.cached_blocks()
            filt = BlockFilter.build(self.cfg.digest_filter, cached.keys(), distinct=True)
            rep.digest = CacheDigest(ts=self.now, epoch=0, kv_seq=None, block_size=self.cfg.block_size,
                                     num_blocks=len(cached), filter=filt)
            rep.digest_version = pool.cache_version
            rep.digest_bytes = filt.size_bytes + HEADER_BYTES
        for inst in self.instances:
            inst[3].update(self._url[rep.rid], rep.digest, rep.digest_bytes)

    @staticmethod
    def _snapshot(rep: "_SimReplica") -> tuple:
        """A load report as the replica makes it now: its load, the steps made since the last
        report (at most 16, as a live report carries) and the time it was made."""
        engine = rep.engine
        new = min(engine.num_steps - rep.reported_steps, 16, len(engine.steps))
        steps = list(itertools.islice(reversed(engine.steps), new))[::-1]
        rep.reported_at, rep.reported_steps = rep.now, engine.num_steps
        loras = None if rep.loras is None else (frozenset(rep.loras.resident), rep.loras.mean_load_s)
        return rep.load(), steps, loras

    def _deliver(self, rep: "_SimReplica", url: str, report: tuple) -> None:
        load, steps, loras = report
        for registry, _, policy, _, router in self.instances:  # every instance gets every report
            registry.on_load(url, load)
            if loras is not None:  # the adapters resident when the report was made (LoadReport.loras)
                registry.set_loras(url, *loras)
            if steps:
                policy.observe_steps(url, steps)
                if router.pairs is not None and router.pairs.learner is not getattr(policy, "learner", None):
                    router.pairs.observe_steps(url, steps)

    def _arrive(self, i: int, r: SimRequest, t: float):
        memo = r.prompt
        root = self.root if r.lora_name is None else self._lora_roots[r.lora_name]
        if memo is not None and memo.block_size == self.cfg.block_size and memo.root == root:
            tokens, hashes = memo.token_ids(), memo.hashes
        else:
            tokens = r.token_ids()
            hashes = tuple(hash_blocks(tokens, self.cfg.block_size, root))
        if len(tokens) >= self.cfg.max_model_len or -(-(len(tokens) + 1) // self.cfg.block_size) > self.kv_blocks:
            # Scheduler.add_request's checks, before routing (see FleetConfig.max_model_len).
            return RequestRecord(i, t, "", len(tokens), rejected=True), None, None, None
        # Clients' max_tokens is unknown in traces: the router sees none, so predictions are
        # honest (the engine still stops at the trace's output length) -- unless the config says
        # the client sends it, as loadgen does live (FleetConfig.client_max_tokens).
        max_tokens = max(1, r.output_length) if self.cfg.client_max_tokens else None
        req = GenerationRequest(kind="completion", model=r.lora_name or MODEL, prompt_token_ids=None,
                                max_tokens=max_tokens)
        text = ""
        if self.policy.needs_text:
            text = memo.text() if memo is not None else ByteTokenizer().decode(tokens)
        session = r.session if r.session and self.cfg.sessions.enabled else None
        prepared = self.router.prepare_tokens(req, tokens, text, hashes, session=session)
        oracle = float(r.output_length) if self.cfg.oracle_lengths else None
        # The prompt is hashed once for every instance (same roots, tokenizer and adapters), and
        # each instance routes that one Prepared, session key included.
        router = self.instances[i % len(self.instances)][4]
        # Every request may be split over a pair on a disaggregated fleet (the proxy's
        # `handover.wanted` holds for any trace request): the pair stage of the same transaction.
        booking = router.route(prepared, str(i), predicted_output_tokens=oracle, split=self.cfg.disaggregated,
                               warmups=True)
        if isinstance(booking, PairBooking):
            return self._arrive_pair(i, r, t, booking, tokens)
        url = booking.replica_id
        if len(self.instances) > 1:  # would every other instance have sent it there now?
            others = (inst[4] for inst in self.instances if inst[4] is not router)
            self.compared += 1
            self.agreed += all(getattr(o.choose(prepared, str(i), predicted_output_tokens=oracle)[2],
                                       "replica_id", None) == url
                               for o in others)
        rep = self.replicas[self._rid[url]]
        params = SamplingParams(max_tokens=max(1, r.output_length), temperature=0.0, ignore_eos=True,
                                lora_name=r.lora_name)
        rec = RequestRecord(i, t, url, len(tokens), predicted_cached_tokens=booking.matched_tokens)
        return rec, booking, rep, (str(i), tokens, params)

    def _arrive_pair(self, i: int, r: SimRequest, t: float, pair: PairBooking, tokens: list[int]):
        """`_arrive` for a request the pair stage placed (balancer/disagg.py). Split, it goes
        first to the prefill replica for its first token only, and the booking slot carries its
        `_Split`; kept whole, it is sent like any routed request."""
        pre, dec = pair.prefill.replica_id, pair.decode.replica_id
        rep = self.replicas[self._rid[pre]]
        out = max(1, r.output_length) if pair.unified else 1
        params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True, lora_name=r.lora_name)
        rec = RequestRecord(i, t, dec, len(tokens), predicted_cached_tokens=pair.prefill.matched_tokens,
                            prefill_replica="" if pair.unified else pre)
        booking = pair.prefill if pair.unified else _Split(pair, rep, self.replicas[self._rid[dec]],
                                                             max(1, r.output_length), tokens, r.lora_name)
        return rec, booking, rep, (str(i), tokens, params)


class _Split(NamedTuple):
    """A request split over a pair, from its arrival to the end of its prefill."""

    pair: PairBooking
    prefill: _SimReplica
    decode: _SimReplica
    output_length: int
    tokens: list[int]
    lora_name: str | None
