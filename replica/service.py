"""Runs an `LLMEngine` behind asyncio: requests in, streamed outputs out.

The engine is single-threaded and synchronous. Its steps run on one worker thread so the event
loop keeps answering `/health` while the model computes. Every change to engine state happens
either inside a step (worker thread) or between steps on the loop thread — new requests and
aborts wait in an inbox that the loop drains only while no step is running — so no lock is
needed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from protocol.load import LoadReport, TierUsage
from protocol.roles import BOTH
from replica.engine import LLMEngine, RequestOutput
from replica.metrics import ReplicaMetrics
from replica.request import SamplingParams

log = logging.getLogger("kvfleet.replica")


@dataclass(frozen=True)
class ServiceConfig:
    load_report_interval_s: float = 0.1  # at least this often a load report is published

    def __post_init__(self) -> None:
        if self.load_report_interval_s <= 0:
            raise ValueError("load_report_interval_s must be positive")


class _Stream:
    __slots__ = ("queue", "arrival", "first_token", "last_token", "scheduled")

    def __init__(self, arrival: float) -> None:
        # RequestOutputs, or an exception that ends the stream
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None


class EngineService:
    def __init__(
        self,
        engine: LLMEngine,
        metrics: ReplicaMetrics,
        publisher: Any = None,
        config: ServiceConfig = ServiceConfig(),
        replica_id: str = "replica",
        role: str = BOTH,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.publisher = publisher
        self.config = config
        self.replica_id = replica_id
        self.role = role  # prefill | decode | both (`--role`), reported in every load report
        self._inbox: list[tuple[str, Any]] = []
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._last_load = 0.0
        self._last_prefix = (0, 0)  # scheduler counters already exported to metrics
        self._last_preempt = 0
        self.draining = False
        self.error: BaseException | None = None
        if engine.loras is not None:  # the adapters loaded at start are resident from the first scrape
            metrics.update_loras(engine.loras)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._pool.shutdown(wait=True)
        if self.publisher is not None:
            self.publisher.close()

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._task is not None and not self._task.done()

    def unique_id(self, base: str) -> str:
        rid = base
        while rid in self._streams:
            rid = f"{base}-{next(self._ids)}"
        return rid

    # ---------------------------------------------------------------- requests
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       before_add: Callable[[str, list[int], SamplingParams], Any] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until it finishes; aborts it if the consumer goes away.
        `before_add(request_id, prompt_ids, params)` runs between steps just before the engine
        takes the request; True means it admitted the request itself (a KV hand-over's decode
        side: `LLMEngine.add_prefilled` with the pulled KV), anything else that the engine adds
        it as usual (the prefill side marks its blocks to be kept there)."""
        stream = _Stream(time.monotonic())
        self._streams[request_id] = stream
        self._inbox.append(("add", (request_id, prompt_ids, params, before_add)))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.append(("abort", request_id))
                self._wake.set()
            self._streams.pop(request_id, None)

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached block (between steps). False if blocks are in use by requests."""
        fut = asyncio.get_running_loop().create_future()
        self._inbox.append(("reset", fut))
        self._wake.set()
        return await fut

    async def between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the loop thread between two engine steps (the block pool is still) and
        return its result. `fn` may read anything and change the block pool's bookkeeping (the
        KV hand-over releases held blocks so), never a request's progress."""
        fut = asyncio.get_running_loop().create_future()
        self._inbox.append(("call", (fn, fut)))
        self._wake.set()
        return await fut

    # ---------------------------------------------------------------- the loop
    def _drain_inbox(self) -> None:
        inbox, self._inbox = self._inbox, []
        added = aborted = False
        for op, arg in inbox:
            if op == "add":
                rid, prompt_ids, params, before_add = arg
                admitted = False
                if before_add is not None and rid in self._streams:
                    try:
                        admitted = before_add(rid, prompt_ids, params) is True
                    except Exception:  # noqa: BLE001 - best effort: the request computes what is missing
                        log.exception("preparing request %s's KV failed; it computes its prompt itself", rid)
                try:
                    if not admitted:
                        self.engine.add_request(rid, prompt_ids, params)
                except ValueError as e:  # validated before; a last guard so nothing hangs
                    self._fail_stream(rid, e)
                    continue
                self.metrics.prompt_tokens.inc(len(prompt_ids))
                self.metrics.request_prompt_tokens.observe(len(prompt_ids))
                added = True
            elif op == "abort":
                self.engine.abort_request(arg)
                aborted = True
            elif op == "call":
                fn, fut = arg
                if not fut.done():
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            else:  # "reset": arg is a future for the result
                if not arg.done():
                    arg.set_result(self.engine.kv.reset_prefix_cache())
        if aborted:  # the gauges now, not at the next step (there may be none for a while)
            self._set_gauges()
        if added and self.publisher is not None and self.publisher.config.load_report_on_arrival:
            self._maybe_report_load(force=True)  # the queue with them, before the step that admits them

    def _set_gauges(self) -> None:
        sched = self.engine.scheduler
        self.metrics.num_running.set(sched.num_running)
        self.metrics.num_waiting.set(sched.num_waiting)
        self.metrics.kv_usage.set(self.engine.kv.usage)

    def _fail_stream(self, rid: str, err: BaseException) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.queue.put_nowait(err)

    def _step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        self._publish_events()
        return outputs

    def _publish_events(self) -> None:
        if self.publisher is None:
            self.engine.kv.take_events()
            return
        events = self.engine.kv.take_events()
        if events:
            self.publisher.publish(events)
        if self.publisher.snapshot_requested():
            self.publisher.publish_snapshot(self.engine.kv.snapshot_events())
        if self.publisher.digest_due():
            kv = self.engine.kv
            self.publisher.publish_digest(kv.digest_hashes(self.publisher.digest_limit),
                                          len(kv.pool.cached_blocks()), kv.block_size)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._publish_events()  # aborts may have freed blocks; snapshots on request
                    self._maybe_report_load(force=False)
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=self.config.load_report_interval_s)
                    except TimeoutError:
                        pass
                    continue
                outputs = await loop.run_in_executor(self._pool, self._step)
                self._dispatch(outputs)
                self._maybe_report_load(force=False)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # an engine bug: fail every stream loudly, never hang them
            self.error = e
            for stream in self._streams.values():
                stream.queue.put_nowait(RuntimeError(f"engine failed: {e!r}"))
            raise

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        sched = self.engine.scheduler
        for out in outputs:
            stream = self._streams.get(out.request_id)
            m.generation_tokens.inc(len(out.new_token_ids))
            if stream is not None:
                if stream.first_token is None:
                    stream.first_token = now
                    m.ttft.observe(now - stream.arrival)
                else:
                    m.itl.observe(now - stream.last_token)
                stream.last_token = now
                stream.queue.put_nowait(out)
            if out.finished:
                m.success(out.finish_reason or "abort")
                m.request_generation_tokens.observe(out.num_output_tokens)
                if stream is not None:
                    m.e2e.observe(now - stream.arrival)
        self._set_gauges()
        q, h = sched.prefix_queries_tokens, sched.prefix_hit_tokens
        m.prefix_queries.inc(q - self._last_prefix[0])
        m.prefix_hits.inc(h - self._last_prefix[1])
        self._last_prefix = (q, h)
        m.preemptions.inc(sched.num_preemptions_total - self._last_preempt)
        self._last_preempt = sched.num_preemptions_total
        if self.engine.loras is not None:
            m.update_loras(self.engine.loras)
        if self.engine.kv.offload is not None:
            m.update_offload(self.engine.kv.offload, self.engine.kv.block_size, sched.external_queries_tokens,
                             sched.external_hit_tokens)
        if self.engine.steps:
            last = self.engine.steps[-1]
            m.iteration_tokens.observe(last.prefill_tokens + last.decode_tokens)

    # ---------------------------------------------------------------- load
    def load(self) -> LoadReport:
        """The replica's load now (requests still in the inbox count as waiting)."""
        sched = self.engine.scheduler
        kv = self.engine.kv
        loras = self.engine.loras
        # Requests still in the inbox wait, their prompts queued: a balancer that sent them before
        # this report counts them here, not as its own sends any more.
        inbox = [arg[1] for op, arg in self._inbox if op == "add"]
        return LoadReport(
            replica_id=self.replica_id,
            ts=time.time(),
            num_running=sched.num_running,
            num_waiting=sched.num_waiting + len(inbox),
            queued_prefill_tokens=sched.queued_prefill_tokens() + sum(map(len, inbox)),
            running_decode_tokens=sched.running_decode_tokens(),
            free_blocks=kv.num_free_blocks,
            total_blocks=kv.num_blocks,
            block_size=kv.block_size,
            kv_usage=min(1.0, max(0.0, kv.usage)),
            num_preemptions_total=sched.num_preemptions_total,
            steps=tuple(list(self.engine.steps)[-16:]),
            loras=() if loras is None else loras.resident,
            lora_load_s=0.0 if loras is None else loras.mean_load_s,
            tiers=() if kv.offload is None else tuple(TierUsage(t.medium, len(t), t.num_blocks)
                                                      for t in kv.offload.tiers),
            role=self.role,
        )

    def _maybe_report_load(self, force: bool) -> None:
        if self.publisher is None:
            return
        now = time.monotonic()
        if force or now - self._last_load >= self.config.load_report_interval_s:
            self._last_load = now
            self.publisher.publish_load(self.load())
