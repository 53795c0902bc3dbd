"""The engine: one step = the scheduler plans, the executor runs, the scheduler post-processes.

    add_request ──▶ Scheduler.waiting
    step():  Scheduler.schedule() ─▶ executor.execute() ─▶ Scheduler.update_from_output()
             ─▶ detokenize, stop strings ─▶ [RequestOutput]

The executor is the torch `ModelRunner` here; the simulator plugs in one that only advances a
clock. The engine is synchronous and single-threaded; the server runs `step()` on a worker
thread and hands requests in between steps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from protocol.hashing import root_hash
from protocol.load import StepSample
from protocol.tokenizer import IncrementalDetokenizer
from replica.kv_cache_manager import KVCacheManager
from replica.kv_offload import MEDIUM_DISK
from replica.lora import AdapterSlots, LoraTag
from replica.request import Request, RequestStatus, SamplingParams
from replica.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from replica.step_model import StepRecord, features_of


class Executor(Protocol):
    # True when `execute` drains and applies (or prices) the KV cache manager's queued offload
    # copies (`KVCacheManager.take_transfers`); an engine with offload tiers needs one that does.
    moves_kv: bool

    def execute(self, out: SchedulerOutput) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    text: str  # text delta since the previous output (stop strings held back and cut)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: str | int | None  # the stop string or token that ended it
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    # new_token_ids[-1]'s (logprob, top alternatives as (token id, logprob)), if asked for
    logprobs: tuple[float, tuple[tuple[int, float], ...]] | None = None


class _TextState:
    """Incremental text of one request with stop strings held back until they cannot match."""

    __slots__ = ("detok", "text", "emitted", "stop", "hold")

    def __init__(self, detok: IncrementalDetokenizer, stop: tuple[str, ...]) -> None:
        self.detok = detok
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token_id: int, final: bool) -> tuple[str, str | None]:
        """Add a token; returns (text delta to emit, stop string hit or None)."""
        self.text += self.detok.add((token_id,))
        if self.stop:
            search_from = max(0, self.emitted - self.hold)
            hit_at, hit = -1, None
            for s in self.stop:
                j = self.text.find(s, search_from)
                if j >= 0 and (hit_at < 0 or j < hit_at):
                    hit_at, hit = j, s
            if hit is not None:
                self.text = self.text[:hit_at]
                return self._flush(), hit
        if final:
            self.text += self.detok.flush()
            return self._flush(), None
        upto = len(self.text) - self.hold
        if upto <= self.emitted:
            return "", None
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta, None

    def _flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


class LLMEngine:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        tokenizer,
        clock: Callable[[], float] = time.monotonic,
        step_history: int = 64,
        detokenize: bool = True,
        loras: AdapterSlots | None = None,
        lora_tags: dict[str, LoraTag] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.loras = loras  # the LoRA adapters served (None: none), shared with the executor
        self.lora_tags = lora_tags or {}  # adapter name -> its KV tag (id, chain root)
        self.kv: KVCacheManager = scheduler.kv
        if self.kv.offload is not None and not getattr(executor, "moves_kv", False):
            raise ValueError("the KV cache has offload tiers but the executor does not move their blocks: build a "
                             "ModelRunner with tier_store= or a SimExecutor with kv=")
        self.executor = executor
        self.tokenizer = tokenizer
        self.clock = clock
        self._text: dict[str, _TextState] = {}
        self.steps: deque[StepSample] = deque(maxlen=step_history)
        self.num_steps = 0
        self.detokenize = detokenize  # False: outputs carry token ids only (the offline simulator)
        # Every step with its step-model features, when set (`kvfleet replica --step-log N`, read
        # by `kvfleet calibrate`); None costs nothing per step.
        self.step_log: deque[StepRecord] | None = None

    # ---------------------------------------------------------------- requests
    def _lora(self, params: SamplingParams) -> LoraTag | None:
        if params.lora_name is None:
            return None
        lora = self.lora_tags.get(params.lora_name)
        if lora is None:
            raise ValueError(f"this replica serves no LoRA adapter {params.lora_name!r}")
        return lora

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        req = Request(request_id, prompt_token_ids, params, self.clock(), self.tokenizer.eos_token_id,
                      self._lora(params))
        self.scheduler.add_request(req)
        if self.detokenize:
            self._text[request_id] = _TextState(IncrementalDetokenizer(self.tokenizer, prompt_token_ids), params.stop)
        return req

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], sampled: list[int],
                      params: SamplingParams, ready: int | None = None,
                      fill: Callable[[int, list[int]], None] | None = None) -> Request | None:
        """A request handed over by a prefill replica (`Scheduler.add_prefilled`): the KV of its
        first `ready` tokens arrived (default: the prompt's, with the tokens the prefill sampled,
        `sampled`, at least the first: it decodes from there). `fill(first, block_ids)` writes the
        handed-over KV into the blocks taken for it, after the local prefix hit of `first`
        blocks (the live decode replica; the simulator has no bytes to write). None when there is
        no room now: try again after a step. `TooLarge` when this cache could never hold it."""
        if not sampled and ready is None:
            raise ValueError("a handed-over request carries at least the first sampled token")
        req = Request(request_id, prompt_token_ids, params, self.clock(), self.tokenizer.eos_token_id,
                      self._lora(params))
        req.token_ids.extend(sampled)
        if not self.scheduler.add_prefilled(req, ready):
            return None
        if fill is not None and req.num_handed_tokens:
            bs = self.kv.block_size
            first = req.num_cached_tokens // bs
            try:
                fill(first, self.kv.block_ids(request_id)[first : -(-req.num_computed_tokens // bs)])
            except BaseException:
                self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
                raise
        if self.detokenize:
            self._text[request_id] = _TextState(IncrementalDetokenizer(self.tokenizer, prompt_token_ids), params.stop)
        return req

    def abort_request(self, request_id: str) -> bool:
        self._text.pop(request_id, None)
        return self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        return [self._output(req) for req in self.step_requests()]

    def step_requests(self) -> list[Request]:
        """One step without building outputs: the requests that received a token (finished
        ones with their final status). `step` wraps it; the offline simulator, which has no
        text or stop strings, reads the requests directly."""
        sched = self.scheduler
        offload = self.kv.offload
        disk = offload.tier(MEDIUM_DISK) if offload is not None else None
        loaded = offload.loaded_blocks_total if offload is not None else 0
        loaded_disk = disk.stats.loaded_blocks if disk is not None else 0
        out = sched.schedule()
        if out.empty:
            return []
        if offload is not None:  # blocks this step's admissions load from a tier (not computed)
            loaded = (offload.loaded_blocks_total - loaded) * self.kv.block_size
            loaded_disk = (disk.stats.loaded_blocks - loaded_disk) * self.kv.block_size if disk is not None else 0
        start = self.clock()
        context = decode_context = 0
        attention = 0.0  # Σ new × (context + new / 2) over prefill chunks, as step_model.features_of
        for req, num_new, _ in out.scheduled:
            context += req.num_computed_tokens + num_new
            if num_new == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                decode_context += req.num_computed_tokens
            else:
                attention += num_new * (req.num_computed_tokens + num_new / 2)
        features = features_of(out.scheduled) if self.step_log is not None else None
        sampled = self.executor.execute(out)
        touched = sched.update_from_output(out, sampled)
        end = self.clock()
        self.steps.append(
            StepSample(start, end - start, out.num_prefill_tokens, out.num_decode_tokens, len(out.scheduled), context,
                       decode_context, loaded, loaded_disk, attention)
        )
        if features is not None:
            self.step_log.append(StepRecord(self.num_steps, start, end - start, features, sched.has_unfinished()))
        self.num_steps += 1
        return touched

    def _output(self, req: Request) -> RequestOutput:
        token = req.token_ids[-1]
        finished = req.status.finished
        state = self._text.get(req.request_id)
        delta, stop_hit = state.push(token, finished) if state is not None else ("", None)
        stop_reason: str | int | None = None
        if stop_hit is not None and not finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            finished = True
            stop_reason = stop_hit
        elif stop_hit is not None:
            req.status = RequestStatus.FINISHED_STOPPED
            stop_reason = stop_hit
        elif req.status == RequestStatus.FINISHED_STOPPED and token != req.eos_token_id:
            stop_reason = token
        if finished:
            self._text.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=(token,),
            text=delta,
            finished=finished,
            finish_reason=req.status.value if finished else None,
            stop_reason=stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            # vLLM's usage counts KV a connector brought as cached (v1 scheduler: num_cached_tokens
            # = local + external computed tokens at admission).
            num_cached_tokens=max(req.num_cached_tokens, 0) + req.num_handed_tokens,
            num_output_tokens=req.num_output_tokens,
            logprobs=req.new_logprobs,
        )


SIM_MAX_MODEL_LEN = 131_072  # a sim replica's context length unless configured (Llama 3.1's)


def build_sim_engine(config, preset, time_scale: float = 1.0,
                     clock: Callable[[], float] = time.monotonic) -> LLMEngine:
    """An engine with the simulated executor: real scheduler and block pool, modelled step
    times held in wall time (`sim_executor.Pacer`, `duration / time_scale`), no torch."""
    from protocol.tokenizer import ByteTokenizer
    from replica.sim_executor import Pacer, SimExecutor
    from replica.step_model import get_preset

    if isinstance(preset, str):
        preset = get_preset(preset)
    num_blocks = config.num_blocks or preset.kv_blocks
    kv = KVCacheManager(num_blocks, config.block_size, root_hash(config.model_name, config.cache_salt),
                        enable_caching=config.enable_prefix_caching, tiers=config.kv_tiers)
    sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                config.max_model_len or SIM_MAX_MODEL_LEN, config.max_loras)
    scheduler = Scheduler(sched_cfg, kv, clock)
    # A sim adapter has no weights: its load costs modelled time, added to the step that loads it.
    loras = lora_slots(config, lambda m: None, modelled_load_s=config.lora_load_s)
    executor = SimExecutor(preset.model, Pacer(time_scale, clock=clock), loras, kv=kv,
                           tier_cost=sim_tier_cost(preset, config.block_size))
    return LLMEngine(scheduler, executor, ByteTokenizer(), clock, loras=loras, lora_tags=lora_tags(config))


def sim_tier_cost(preset, block_size: int):
    """The preset's offload transfer costs for blocks of `block_size` tokens (the preset's
    figures are per block of its own block_size)."""
    from dataclasses import replace

    cost = preset.tier_cost
    return replace(cost, block_bytes=cost.block_bytes * block_size // preset.block_size)


def lora_tags(config) -> dict[str, LoraTag]:
    """Each served adapter's KV tag: its id and its chain root (protocol.hashing.root_hash)."""
    return {m.name: LoraTag(m.name, m.lora_id, root_hash(config.model_name, config.cache_salt, m.name))
            for m in config.lora_modules}


def lora_slots(config, load, modelled_load_s: float | None = None) -> AdapterSlots | None:
    """The resident-adapter slots for `config`'s --lora-modules, the first max_loras loaded."""
    if not config.lora_modules:
        return None
    slots = AdapterSlots(config.lora_modules, config.max_loras, load, modelled_load_s)
    slots.preload()
    return slots


def build_engine(config, clock: Callable[[], float] = time.monotonic) -> LLMEngine:
    """A torch engine from an `EngineConfig` (imports torch; the balancer never calls this)."""
    import torch

    from protocol.tokenizer import load_tokenizer
    from replica.kv_cache import allocate_kv_caches, num_blocks_for_budget
    from replica.lora_weights import load_lora
    from replica.model_config import ModelConfig
    from replica.runner import ModelRunner
    from replica.weights import build_model

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.model_config_path:
        mcfg = ModelConfig.from_hf_config(config.model_config_path)
    else:
        mcfg = ModelConfig.from_preset(config.model)
    tokenizer = load_tokenizer(config.tokenizer)
    model = build_model(mcfg, seed=config.seed, weights_path=config.weights, device=config.device)
    num_blocks = config.num_blocks or num_blocks_for_budget(mcfg, config.block_size, config.kv_cache_memory_bytes)
    max_model_len = config.max_model_len or mcfg.max_position_embeddings
    if max_model_len > mcfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {mcfg.max_position_embeddings}"
        )
    kv = KVCacheManager(
        num_blocks,
        config.block_size,
        root_hash(config.model_name, config.cache_salt),
        enable_caching=config.enable_prefix_caching,
        tiers=config.kv_tiers,
    )
    caches = allocate_kv_caches(mcfg, num_blocks, config.block_size, config.device)
    tier_store = None
    if kv.offload is not None:
        from replica.kv_offload_store import TierStore

        tier_store = TierStore(mcfg, config.block_size, kv.offload, caches, config.disk_kv_path)
    sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len, config.max_loras)
    scheduler = Scheduler(sched_cfg, kv, clock)
    dtype = next(model.parameters()).dtype
    loras = lora_slots(config, lambda m: load_lora(m.name, m.path, mcfg, dtype, config.device))
    runner = ModelRunner(model, caches, kv, seed=config.seed, device=config.device, loras=loras,
                         tier_store=tier_store)
    return LLMEngine(scheduler, runner, tokenizer, clock, loras=loras, lora_tags=lora_tags(config))
