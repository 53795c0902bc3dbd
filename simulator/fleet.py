"""A discrete-event simulation of a fleet behind the balancer.

Events are request arrivals and replica step ends, on one virtual clock. Each replica is the
real `LLMEngine` (scheduler, KV cache manager, block pool) with the `SimExecutor`; routing is
the balancer's own `Router` and policy objects over a `PrefixIndex` fed by the replicas'
block-pool events and a `Registry` fed by their load after every step — the code the live
balancer runs, minus the sockets.

    arrival(t) ─▶ hash prompt ─▶ index.match ─▶ policy.select ─▶ engine.add_request
    step(replica, t): engine.step() advances the replica's clock by the modelled duration;
                      block events ─▶ index; load ─▶ registry; outputs ─▶ per-request records;
                      next step at the new time while the replica has work.

A request that arrives while its replica is mid-step joins at the next step, as in a real
engine. Load reports and events reach the balancer instantly (a live fleet adds ~ms).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from balancer.approx_index import ApproxIndex
from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Prepared, Router
from protocol.hashing import hash_blocks, root_hash
from protocol.openai_api import GenerationRequest
from protocol.tokenizer import ByteTokenizer
from replica.engine import LLMEngine
from replica.kv_cache_manager import KVCacheManager
from replica.request import SamplingParams
from replica.scheduler import Scheduler, SchedulerConfig
from replica.sim_executor import SimExecutor
from replica.step_model import SimPreset

MODEL = "sim"


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulation: when it arrives, its prompt, how much it generates."""

    arrival_s: float
    token_ids: Callable[[], list[int]]  # materialised lazily, at arrival
    output_length: int
    input_length: int
    tag: str = ""  # tenant / session, for reports


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

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")


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
    def __init__(self, rid: str, cfg: FleetConfig) -> None:
        self.rid = rid
        self.now = 0.0
        self.busy = False
        p = cfg.preset
        self.kv = KVCacheManager(cfg.kv_blocks or p.kv_blocks, cfg.block_size, root_hash(MODEL))
        sched_cfg = SchedulerConfig(cfg.max_num_seqs or p.max_num_seqs,
                                    cfg.max_num_batched_tokens or p.max_num_batched_tokens, 1 << 30)
        clock = self._clock
        self.engine = LLMEngine(Scheduler(sched_cfg, self.kv, clock), SimExecutor(p.model, self._advance),
                                ByteTokenizer(), clock, detokenize=False)

    def _clock(self) -> float:
        return self.now

    def _advance(self, duration: float) -> None:
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
    def __init__(self, cfg: FleetConfig, predictor=None) -> None:
        self.cfg = cfg
        self.now = 0.0
        self.replicas = {f"r{i}": _SimReplica(f"r{i}", cfg) for i in range(cfg.replicas)}
        self.registry = Registry(BreakerConfig(), HealthConfig(), self._clock)
        for rid in self.replicas:
            self.registry.add(ReplicaSpec(url=f"http://{rid}.sim:80"))
        # Registry ids are URLs; keep a map both ways.
        self._url = {rid: f"http://{rid}.sim:80" for rid in self.replicas}
        self._rid = {v: k for k, v in self._url.items()}
        self.index = PrefixIndex(cfg.block_size, MODEL)
        self.policy = make_policy(cfg.policy, dict(cfg.policy_options))
        self.router = Router(MODEL, cfg.block_size, ByteTokenizer(), self.index,
                             ApproxIndex(clock=self._clock), self.policy, self.registry,
                             has_events=lambda rid: True, predictor=predictor, clock=self._clock)
        self.root = root_hash(MODEL)
        self.predictor = predictor

    def _clock(self) -> float:
        return self.now

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        import time as _time

        wall = _time.perf_counter()
        heap: list[tuple[float, int, int, object]] = []
        seq = itertools.count()
        ARRIVE, STEP = 0, 1
        for i, r in enumerate(requests):
            heapq.heappush(heap, (r.arrival_s, next(seq), ARRIVE, i))
        records: list[RequestRecord] = []
        live: dict[str, tuple[RequestRecord, object, object]] = {}
        steps = 0
        while heap:
            t, _, kind, x = heapq.heappop(heap)
            self.now = t
            if kind == ARRIVE:
                rec, rr, dec, rep = self._arrive(x, requests[x], t)
                records.append(rec)
                live[str(x)] = (rec, rr, dec)
                if not rep.busy:
                    rep.busy = True
                    rep.now = max(rep.now, t)
                    heapq.heappush(heap, (rep.now, next(seq), STEP, rep))
            else:
                rep = x
                rep.now = max(rep.now, t)
                outputs = rep.engine.step()
                steps += 1
                for ev in rep.kv.take_events():
                    self.index.apply(self._url[rep.rid], ev)
                self.registry.on_load(self._url[rep.rid], rep.load())
                if rep.engine.steps:
                    self.policy.observe_steps(self._url[rep.rid], (rep.engine.steps[-1],))
                for out in outputs:
                    rec, rr, dec = live[out.request_id]
                    if rec.first_token is None:
                        rec.first_token = rep.now
                        rec.cached_tokens = out.num_cached_tokens
                    if out.finished:
                        rec.finish = rep.now
                        rec.output_tokens = out.num_output_tokens
                        state = self.registry.get(self._url[rep.rid])
                        self.registry.on_done(state, rec.prompt_tokens + requests[rec.index].output_length)
                        self.policy.on_complete(rr, dec.replica_id, True)
                        if self.predictor is not None:
                            self.predictor.observe_done(rr, out.num_output_tokens)
                        del live[out.request_id]
                if rep.engine.has_unfinished():
                    heapq.heappush(heap, (rep.now, next(seq), STEP, rep))
                else:
                    rep.busy = False
        return SimResult(self.cfg.policy, records, [self._url[r] for r in self.replicas], steps,
                         _time.perf_counter() - wall)

    def _arrive(self, i: int, r: SimRequest, t: float):
        tokens = r.token_ids()
        hashes = hash_blocks(tokens, self.cfg.block_size, self.root)
        # Clients' max_tokens is unknown in traces: the router sees none, so predictions are
        # honest (the engine still stops at the trace's output length).
        req = GenerationRequest(kind="completion", model=MODEL, prompt_token_ids=None, max_tokens=None)
        prepared = Prepared(req, tuple(tokens), "", tuple(hashes), None, hashes[-1] if hashes else i)
        if self.policy.needs_text:
            prepared = Prepared(req, prepared.token_ids, ByteTokenizer().decode(tokens), prepared.block_hashes,
                                prepared.first_user_message, prepared.rng_seed)
        rr = self.router.routing_request(prepared, str(i))
        if self.cfg.oracle_lengths:
            rr = dataclasses.replace(rr, predicted_output_tokens=float(r.output_length))
        decision = self.router.decide(rr, self.registry.usable())
        self.router.routed(rr, decision)
        url = decision.replica_id
        state = self.registry.get(url)
        matched = rr.matched_blocks.get(url, 0) * self.cfg.block_size
        self.registry.on_sent(state, len(tokens) + r.output_length, max(0, len(tokens) - matched))
        rep = self.replicas[self._rid[url]]
        params = SamplingParams(max_tokens=max(1, r.output_length), temperature=0.0, ignore_eos=True)
        rep.engine.add_request(str(i), tokens, params)
        rec = RequestRecord(i, t, url, len(tokens), predicted_cached_tokens=matched)
        return rec, rr, decision, rep
