"""Continuous batching with chunked prefill and preemption by recompute.

One `schedule()` call plans one engine step under two budgets: `max_num_batched_tokens` new
tokens and `max_num_seqs` running requests. Order of service (as in vLLM v1):

1. Running requests, oldest first: each gets the tokens it still has to compute (one, in
   decode), cut to the remaining token budget (a long prefill continues in chunks).
   When the KV cache has no room, the *newest* running request is preempted: its blocks are
   freed, its progress reset, and it goes back to the front of the waiting queue to be
   recomputed later (its cached blocks may still be hit then).
2. Waiting requests, first come first served, while budgets allow and no request was
   preempted in this step: their cached prefix is looked up and only the rest is scheduled.

The scheduler speaks only in token counts and takes its clock as a parameter, so the same
code runs on wall time in a replica and on a virtual clock in the simulator.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from replica.kv_cache_manager import KVCacheManager
from replica.request import Request, RequestStatus


class TooLarge(ValueError):
    """A request needing more KV blocks than the whole cache: no wait makes room for it."""


def check_fits(kv: KVCacheManager, num_tokens: int) -> None:
    """`TooLarge` unless the whole cache can hold `num_tokens` tokens and the next one's KV (the
    scheduler's admission check; the server makes it before a request is queued)."""
    needed = -(-(num_tokens + 1) // kv.block_size)
    if needed > kv.num_blocks:
        raise TooLarge(f"the prompt's {num_tokens} tokens need {needed} KV blocks, but this replica's cache has "
                       f"only {kv.num_blocks}; shorten the prompt or give the replica more KV blocks")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    # LoRA adapters one batch may use (vLLM's --max-loras); a waiting request that would need
    # one more is skipped this step (vLLM v1's scheduler skips it too) and tried again later.
    max_loras: int = 1

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.max_loras < 1:
            raise ValueError("max_loras must be at least 1")


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int  # tokens computed in this step, starting at request.num_computed_tokens
    sample: bool  # this chunk reaches the request's last known token: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_prefill_tokens: int  # tokens of chunks that do not sample (or of first-token chunks)
    num_decode_tokens: int  # single-token steps of requests already past their prompt

    @property
    def total_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, clock: Callable[[], float]) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0
        self.prefix_queries_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which found cached in the device pool
        # With offload tiers, as vLLM counts a KV connector's hits (v1 scheduler,
        # `_update_connector_prefix_cache_stats`): prompt tokens looked up (the
        # whole prompt) and of which found in a tier (loaded, not recomputed).
        self.external_queries_tokens = 0
        self.external_hit_tokens = 0

    # ---------------------------------------------------------------- queue management
    def _check_admissible(self, request: Request) -> None:
        """ValueError for a request this replica could never hold (a duplicate id, past the
        model's context); `TooLarge` for one needing more KV blocks than the whole cache has."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens; the model's context is {self.config.max_model_len}"
            )
        check_fits(self.kv, request.num_tokens)

    def add_request(self, request: Request) -> None:
        self._check_admissible(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def add_prefilled(self, request: Request, ready: int | None = None) -> bool:
        """Admit a request whose prompt KV was computed elsewhere (a prefill replica handed it
        over, balancer/disagg.py): the one way a handed-over request enters, in the simulator
        and on a live decode replica (replica/kv_transfer.py) alike. Its blocks for the first
        `ready` tokens are taken now: the prefix this cache holds (device pool, offload tiers:
        the lookup a waiting request makes) is reused, the blocks after it are the handed-over
        KV, which the caller writes (`KVCacheManager.block_ids`) before the next step. It runs at
        once from token `ready`: by default every token but the newest (`request.token_ids` is
        the prompt plus what the prefill sampled, and it decodes next, without a prefill chunk);
        a live hand-over moves full blocks only, so the rest of its prompt (at least the last
        token, whose logits give the first output token) is computed here as a running chunk.

        False, with nothing changed, when the blocks or a running slot are not free now: the
        caller tries again later. Raises `TooLarge` for a request needing more KV blocks than
        this whole cache (never False: it would never fit, and a caller retrying would wait
        forever), ValueError as `add_request` does for a duplicate id or one past the context."""
        self._check_admissible(request)
        if ready is None:
            ready = request.num_tokens - 1  # the KV of every token but the newest (decoded next)
        if not 0 < ready < request.num_tokens:
            raise ValueError(f"handed-over KV of {ready} tokens for a request of {request.num_tokens}")
        if len(self.running) >= self.config.max_num_seqs:
            return False
        hit = self.kv.get_computed_blocks(request.request_id, request.token_ids, request.lora)
        ready = max(ready, hit.num_tokens)  # a longer local hit needs nothing handed over
        if not self.kv.allocate_slots(request.request_id, request.token_ids, hit.num_tokens,
                                      ready - hit.num_tokens, hit, request.lora):
            self.kv.free(request.request_id)  # forget the lookup: nothing is held
            return False
        request.num_cached_tokens = hit.num_tokens
        request.num_handed_tokens = ready - hit.num_tokens
        request.num_computed_tokens = ready
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.requests[request.request_id] = request
        return True

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a request (aborted, or stopped by a stop string) and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(request_id)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed, over waiting and running requests."""
        total = 0
        for req in self.waiting:
            total += req.num_tokens - req.num_computed_tokens
        for req in self.running:
            if req.num_computed_tokens < req.num_prompt_tokens:
                total += req.num_prompt_tokens - req.num_computed_tokens
        return total

    def running_decode_tokens(self) -> int:
        """KV tokens held by running requests (the context every decode step attends to)."""
        return sum(req.num_computed_tokens for req in self.running)

    # ---------------------------------------------------------------- planning
    def _preempt_newest(self) -> Request:
        victim = self.running.pop()
        self.kv.free(victim.request_id)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(victim)
        return victim

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        prefill = decode = 0

        running = self.running  # `_preempt_newest` pops from this same list
        allocate_slots = self.kv.allocate_slots
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed_tokens
            num_tokens = len(req.token_ids)
            num_new = min(num_tokens - computed, budget)
            allocated = False
            while True:
                if allocate_slots(req.request_id, req.token_ids, computed, num_new, lora=req.lora):
                    allocated = True
                    break
                victim = self._preempt_newest()
                preempted.append(victim)
                if victim is req:
                    break
            if not allocated:
                break
            scheduled.append(ScheduledRequest(req, num_new, computed + num_new == num_tokens))
            if num_new == 1 and computed >= req.num_prompt_tokens:
                decode += 1
            else:
                prefill += num_new
            budget -= num_new
            i += 1

        if not preempted and self.waiting:
            loras = {r.lora_name for r in self.running if r.lora is not None}
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                name = req.lora_name
                if name is not None and name not in loras and len(loras) >= self.config.max_loras:
                    skipped.append(self.waiting.popleft())  # its adapter would not fit in this batch
                    continue
                computed = self.kv.get_computed_blocks(req.request_id, req.token_ids, req.lora)
                num_new = min(req.num_tokens - computed.num_tokens, budget)
                if not self.kv.allocate_slots(
                    req.request_id, req.token_ids, computed.num_tokens, num_new, computed, req.lora
                ):
                    break
                self.waiting.popleft()
                if name is not None:
                    loras.add(name)
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = computed.num_tokens
                    self.prefix_queries_tokens += req.num_prompt_tokens
                    self.prefix_hit_tokens += computed.num_tokens - computed.num_tier_tokens
                    if self.kv.offload is not None:
                        self.external_queries_tokens += req.num_prompt_tokens
                        self.external_hit_tokens += computed.num_tier_tokens
                req.num_computed_tokens = computed.num_tokens
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                sample = req.num_computed_tokens + num_new == req.num_tokens
                scheduled.append(ScheduledRequest(req, num_new, sample))
                prefill += num_new
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))  # back at the front, in their order

        return SchedulerOutput(scheduled, preempted, prefill, decode)

    # ---------------------------------------------------------------- post-processing
    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance progress, append sampled tokens, finish requests that hit EOS or a limit.

        Returns the requests that received a new token (finished ones included, with their
        final status set and their blocks freed).
        """
        now = self.clock()
        touched: list[Request] = []
        any_finished = False
        check_stop = self._check_stop
        for req, num_new, sample in output.scheduled:
            req.num_computed_tokens += num_new
            if not sample:
                continue
            token = sampled[req.request_id]
            req.token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            status = check_stop(req, token)
            if status is not None:
                # Released here; dropped from `running` in one pass below (no O(n) remove).
                del self.requests[req.request_id]
                req.status = status
                self.kv.free(req.request_id)
                any_finished = True
            touched.append(req)
        if any_finished:
            self.running = [r for r in self.running if not r.status.finished]
        return touched

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.params
        num_tokens = len(req.token_ids)
        n_out = num_tokens - req.num_prompt_tokens  # req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token == req.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= params.max_tokens or num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
