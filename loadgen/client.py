"""The async load generator: open-loop replay with streaming measurement.

Open loop: one scheduler coroutine launches every request at its scheduled time and never waits
on a response, so a slow server never holds back later sends (closed-loop benchmarks under-load
a slow server: coordinated omission). Each request runs in its own task, which measures

    schedule lag = send time - scheduled time   (how late the generator itself was)
    TTFT         = first chunk that carries tokens - send time
    ITL          = gaps between successive chunks that carry tokens
    E2E          = end of stream - send time
    TPOT         = (E2E - TTFT) / (output_tokens - 1)   (computed in metrics.py)

which are `vllm bench serve`'s definitions (vllm/benchmarks/lib/endpoint_request_func.py: the
clock starts just before the POST, TTFT at the first chunk with text, ITL between chunks with
text). Output tokens come from `usage` (stream_options.include_usage) or else from the chunks
(`token_ids` lengths when present, one per chunk otherwise). Requests ask for
`max_tokens = output_length` with `ignore_eos`, so the trace's output lengths are reproduced.

Closed loop (`concurrency`): that many workers each send the next request as soon as their last
one finishes, ignoring arrival times (schedule lag is then 0 by definition).

Prompt bodies are built (and JSON-encoded) before the clock starts, so the hot path only sends
bytes and parses the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadgen.prompts import PromptConfig, prompt_text, prompt_token_ids
from loadgen.traces import TraceRequest

REPLICA_HEADER = "X-Kvfleet-Replica"  # balancer/proxy.py names the serving replica here
_decode_json = json.JSONDecoder().decode  # str in: skips json.loads' encoding detection per chunk


@dataclass(frozen=True)
class LoadConfig:
    """How to send a workload. `endpoint` is "completions" (token or text prompts) or "chat"
    (text prompts as one user message)."""

    model: str = "tiny"
    endpoint: str = "completions"
    token_prompts: bool = True  # False: text prompts (servers that take no token ids)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    concurrency: int | None = None  # closed loop with this many workers; None = open loop
    ignore_eos: bool = True
    include_usage: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0  # no byte for this long -> the request fails as a timeout
    connect_timeout_s: float = 10.0
    max_connections: int = 0  # 0 = no limit (open loop needs one connection per request in flight)
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # Each request's trace session id as the OpenAI `user` field: the session key of a balancer
    # run with sticky sessions (`kvfleet balancer --sessions`, balancer/sessions.py).
    session_user: bool = False
    # Each request's class (its trace's `tenant`) in this header: a balancer with --fairness reads
    # the request class there (balancer/fairness.py, `X-Kvfleet-Class`); None: no header.
    class_header: str | None = None
    progress: bool | None = None  # None: a progress bar when stderr is a TTY

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.endpoint == "chat" and self.token_prompts:
            raise ValueError("the chat endpoint takes text: use token_prompts=False (--text-prompts)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if not self.request_timeout_s > 0 or not self.connect_timeout_s > 0:
            raise ValueError("timeouts must be positive")
        if self.max_connections < 0:
            raise ValueError("max_connections must not be negative (0 = no limit)")

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds; `scheduled_s` and `sent_s` are from the
    run's start, the latencies from `sent_s`."""

    index: int
    scheduled_s: float
    input_length: int  # what the trace asked for
    output_length: int
    session_id: str | None = None
    tenant: str | None = None
    sent_s: float | None = None
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    replica: str | None = None
    status: int | None = None
    error: str | None = None
    error_kind: str | None = None  # http, timeout, connection, in_band, incomplete, other

    @property
    def success(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def lag_s(self) -> float | None:
        return None if self.sent_s is None else self.sent_s - self.scheduled_s


@dataclass
class RunResult:
    url: str
    config: LoadConfig
    records: list[RequestRecord]
    duration_s: float  # run start to the last response
    started_at: float  # wall-clock (unix) time of the run's start
    closed_loop: bool = False


def build_body(req: TraceRequest, index: int, cfg: LoadConfig) -> bytes:
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": max(1, req.output_length), "stream": True,
                            "temperature": cfg.temperature}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt_text(req, index, cfg.prompt)}]
    elif cfg.token_prompts:
        body["prompt"] = prompt_token_ids(req, index, cfg.prompt).tolist()
    else:
        body["prompt"] = prompt_text(req, index, cfg.prompt)
    if cfg.session_user and req.session_id:
        body["user"] = req.session_id
    body.update(cfg.extra_body)
    return json.dumps(body, separators=(",", ":")).encode()


def _url(base: str, cfg: LoadConfig) -> str:
    base = base.rstrip("/")
    return base if base.endswith(("/completions", "/chat/completions")) else base + cfg.path


def _tokens_in(chunk: dict) -> int:
    """Tokens a streamed chunk carries (0 for role-only, usage-only and empty chunks)."""
    n = 0
    for ch in chunk.get("choices") or ():
        ids = ch.get("token_ids")
        if ids:
            n += len(ids)
            continue
        text = ch.get("text")
        if text is None:
            text = (ch.get("delta") or {}).get("content")
        if text:
            n += 1
    return n


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, rec: RequestRecord, t0: float,
                headers: dict[str, str]) -> None:
    perf = time.perf_counter
    st = perf()
    rec.sent_s = st - t0
    last = st
    chunk_tokens = 0
    usage = None
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            rec.status = resp.status
            rec.replica = resp.headers.get(REPLICA_HEADER)
            if resp.status != 200:
                text = await resp.text()
                try:
                    msg = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = text[:200]
                rec.error, rec.error_kind = f"HTTP {resp.status}: {msg}", "http"
                return
            buf = b""
            async for piece in resp.content.iter_any():
                now = perf()
                lines = (buf + piece).split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, event: / id: fields
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    try:
                        chunk = _decode_json(data.decode())
                    except ValueError:
                        chunk = None
                    if not isinstance(chunk, dict):
                        rec.error, rec.error_kind = f"unparsable stream event: {data[:100]!r}", "other"
                        return
                    if "error" in chunk:  # an in-band error event (vLLM / kvfleet style)
                        err = chunk["error"]
                        msg = err.get("message") if isinstance(err, dict) else str(err)
                        rec.error, rec.error_kind = f"in-band error: {msg}", "in_band"
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    n = _tokens_in(chunk)
                    if n:
                        if rec.ttft_s is None:
                            rec.ttft_s = now - st
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        chunk_tokens += n
            rec.e2el_s = perf() - st
            if not done:
                rec.error, rec.error_kind = "the stream ended before data: [DONE]", "incomplete"
            elif rec.ttft_s is None:
                rec.error, rec.error_kind = "the stream carried no tokens", "incomplete"
    except asyncio.TimeoutError:
        rec.error, rec.error_kind = "timed out waiting for the server", "timeout"
    except aiohttp.ClientConnectorError as e:
        rec.error, rec.error_kind = f"could not connect: {e}", "connection"
    except (aiohttp.ClientError, ConnectionError) as e:
        rec.error, rec.error_kind = f"{type(e).__name__}: {e}", "connection"
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, never raised into the run
        rec.error, rec.error_kind = f"{type(e).__name__}: {e}", "other"
    finally:
        if usage:
            rec.output_tokens = int(usage.get("completion_tokens") or chunk_tokens)
            rec.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens")
        else:
            rec.output_tokens = chunk_tokens


# The scheduler starts each request's task this long before its time; the task sleeps the rest
# on its own timer and sends the moment that timer fires, instead of one event-loop pass after
# the scheduler wakes (a task created at the due time first waits for the next pass).
_LEAD_S = 0.05


async def _timed_send(session, target, body, rec, t0, headers) -> None:
    await _sleep_until(t0 + rec.scheduled_s)
    await _send(session, target, body, rec, t0, headers)


async def _open_loop(session, target, records, bodies, t0, headers, progress) -> None:
    """Launch each request at t0 + scheduled_s; never wait on a response before the next send.
    `headers`: one dict per request."""
    in_flight: set[asyncio.Task] = set()
    for rec, body, hdrs in zip(records, bodies, headers):
        await _sleep_until(t0 + rec.scheduled_s - _LEAD_S)
        task = asyncio.create_task(_timed_send(session, target, body, rec, t0, hdrs))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        if progress:
            progress.sent += 1
    while in_flight:
        await asyncio.gather(*list(in_flight))


async def _closed_loop(session, target, records, bodies, t0, headers, progress, concurrency: int) -> None:
    """`concurrency` workers, each sending the next request when its last one is done."""
    queue = iter(zip(records, bodies, headers))

    async def worker() -> None:
        for rec, body, hdrs in queue:
            rec.scheduled_s = time.perf_counter() - t0
            if progress:
                progress.sent += 1
            await _send(session, target, body, rec, t0, hdrs)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(records)) or 1)))


class _Progress:
    """A one-line progress bar on stderr (TTY only), redrawn a few times a second."""

    def __init__(self, total: int, records: list[RequestRecord]) -> None:
        self.total, self.records = total, records
        self.sent = 0

    async def run(self) -> None:
        try:
            while True:
                self.draw()
                await asyncio.sleep(0.25)
        except asyncio.CancelledError:
            self.draw()
            sys.stderr.write("\n")
            raise

    def draw(self) -> None:
        done = sum(1 for r in self.records if r.e2el_s is not None or r.error is not None)
        errors = sum(1 for r in self.records if r.error is not None)
        width = 30
        filled = int(width * done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} done, "
                         f"{self.sent} sent, {errors} errors ")
        sys.stderr.flush()


async def _sleep_until(t: float) -> None:
    """Sleep until perf_counter() reaches t. The loop's timers have ~1 ms resolution and may
    fire a little early, so re-check and sleep the remainder."""
    perf = time.perf_counter
    while True:
        d = t - perf()
        if d <= 0:
            return
        await asyncio.sleep(d)


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """No garbage-collector pauses during the run.

    Everything allocated so far (bodies, records) is frozen out of the collector's sight, and
    automatic collection is off until the run ends: measured on this project's 2-core machine,
    collections during a 1,000 req/s run took 7-67 ms of CPU each, while a 5,000-request run
    left no cyclic garbage at all (gc.collect() found 0 objects after it), so nothing piles up.
    vllm bench serve freezes its heap the same way (vllm.utils.gc_utils.freeze_gc_heap)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.unfreeze()


async def run_load(url: str, requests: list[TraceRequest], config: LoadConfig) -> RunResult:
    """Send `requests` to the OpenAI-compatible server at `url` (base URL, or a full
    /v1/completions URL) and measure each one. Never raises for a failed request: failures are
    recorded in the RunResult."""
    cfg = config
    target = _url(url, cfg)
    bodies = [build_body(r, i, cfg) for i, r in enumerate(requests)]
    records = [RequestRecord(index=i, scheduled_s=r.arrival_s, input_length=r.input_length,
                             output_length=r.output_length, session_id=r.session_id, tenant=r.tenant)
               for i, r in enumerate(requests)]
    common = {"Content-Type": "application/json", **cfg.headers}
    headers = [common if not cfg.class_header or r.tenant is None else {**common, cfg.class_header: r.tenant}
               for r in requests]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=0, force_close=False)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    progress = _Progress(len(requests), records) if show else None
    progress_task = asyncio.create_task(progress.run()) if progress else None
    started_at = time.time()
    with _quiet_gc():
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            t0 = time.perf_counter()
            if cfg.concurrency is None:
                await _open_loop(session, target, records, bodies, t0, headers, progress)
            else:
                await _closed_loop(session, target, records, bodies, t0, headers, progress, cfg.concurrency)
            duration = time.perf_counter() - t0
    if progress_task:
        progress_task.cancel()
        try:
            await progress_task
        except asyncio.CancelledError:
            pass
    return RunResult(url=url, config=cfg, records=records, duration_s=duration, started_at=started_at,
                     closed_loop=cfg.concurrency is not None)


def run_load_sync(url: str, requests: list[TraceRequest], config: LoadConfig) -> RunResult:
    """run_load on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        return uvloop.run(run_load(url, requests, config))
    except ImportError:
        return asyncio.run(run_load(url, requests, config))


def bare_timer_lag_p99_ms(rate: float, ticks: int) -> float:
    """Schedule lag p99 (ms) of an event loop that only sleeps to a schedule of `ticks` at `rate`
    per second: this machine's own noise floor, beside which the load generator's schedule lag
    is judged (tests, bench_loadgen)."""
    import numpy as np
    import uvloop

    async def probe() -> float:
        t0, lags = time.perf_counter(), []
        for i in range(ticks):
            t = t0 + i / rate
            while (d := t - time.perf_counter()) > 0:
                await asyncio.sleep(d)
            lags.append(time.perf_counter() - t)
        return float(np.percentile(lags, 99) * 1000)

    return uvloop.run(probe())
