"""Forwarding one request: book a replica, send, relay, retry before the first byte.

    parse + validate (same 4xx as a replica) ─▶ Router.prepare ─▶ loop:
        Router.route (decide + record) ─▶ POST to the replica
          refused / reset / 5xx before any byte ─▶ Booking.fail, breaker, backoff, next replica
          4xx ─▶ relayed as is (the client's fault, not the replica's)
          200 ─▶ relay complete SSE events byte for byte (or the JSON body)
                 stream broken mid-way ─▶ balancer/failover.py continues it on another replica
    once the response is out (`_finish`): usage read, Booking.finish, metrics, access log

For streams the balancer asks the replica for `return_token_ids` (vLLM's extension) so that a
continuation can be built from exact token ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from balancer.exchange import Exchange
from balancer.failover import Failover
from balancer.metrics import NO_REPLICA, BalancerMetrics
from balancer.registry import Registry, ReplicaState
from balancer.relay import REPLICA_HEADER, ClientGone, UpstreamFailed, read_safely, relayed_headers, write
from balancer.router import Booking, Prepared, Router
from balancer.sse import DONE, split_events
from balancer.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse
from protocol.openai_api import APIError, GenerationRequest, decode_json_body, parse_chat, parse_completion

__all__ = ["Proxy", "REPLICA_HEADER", "read_json"]
access_log = logging.getLogger("kvfleet.balancer.access")


# An object nesting at most two levels of objects (usage -> prompt_tokens_details -> ...), no
# strings holding braces: what OpenAI-style `usage` objects are.
_USAGE_OBJECT = re.compile(rb"\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}")


def _tail_usage(data: bytes | bytearray) -> dict | None:
    """The last `"usage": {...}` object in data, parsed alone (without parsing the body)."""
    tail = bytes(data[-2048:])
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    m = _USAGE_OBJECT.search(tail, at)
    if m is None:
        return None
    try:
        usage = json.loads(m.group())
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None


_TOKEN_IDS = re.compile(rb'"token_ids":\[([0-9,]*)\]')


@dataclass(slots=True)
class _Outcome:
    """What the access log line says about one request; filled in as the request goes."""

    replica: str = NO_REPLICA
    status: int = 0
    ttft_s: float | None = None
    attempts: int = 0
    predicted_cached: int = 0
    reported_cached: int | None = None
    failovers: int = 0
    output_tokens: int | None = None  # for the output-length predictor (None: unknown)
    booking: Booking | None = None  # the attempt that answered; ended in `_finish`
    # A non-streaming response's bookkeeping, done after the client has its bytes (`_finish`):
    counted: ReplicaState | None = None  # the replica whose response was relayed
    e2e_s: float = 0.0
    body: bytes | None = None  # a 200 body, to read `usage` from


def _attempt_metrics(m: BalancerMetrics, replica_id: str, matched: int, prompt_tokens: int,
                     decision_s: float | None) -> None:
    """An attempt's metrics; called soon after the request is written (they need not delay it)."""
    if decision_s is not None:
        m.decision.observe(decision_s)
    m.series(m.predicted_cached, replica_id).inc(matched)
    m.series(m.prompt_tokens, replica_id).inc(prompt_tokens)


async def read_json(request) -> object:
    """The body of a request (aiohttp's or an `Exchange`) as JSON, or an `APIError(400)`."""
    return decode_json_body(await request.read())


class Proxy:
    def __init__(
        self,
        registry: Registry,
        router: Router,
        metrics: BalancerMetrics,
        upstream: Callable[[], UpstreamPool],
        retry,
        policy_name: str,
        model: Callable[[], str | None],
    ) -> None:
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.upstream = upstream
        self.retry = retry
        self.policy_name = policy_name
        self.model = model
        # Request ids: a random per-process prefix and a counter (unique across restarts and
        # balancers; a uuid4 per request costs several µs).
        self._id_prefix = f"kvf-{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count()
        self.failover = Failover(router, registry, metrics, upstream)

    # ------------------------------------------------------------------ entry points
    async def completions(self, ex: Exchange) -> None:
        """Serve one `/v1/completions` request; the response goes out through `ex`. Bad input
        raises `APIError` (the server turns it into an OpenAI-style error response)."""
        body = await read_json(ex)
        await self._handle(ex, body, parse_completion(body), "/v1/completions")

    async def chat(self, ex: Exchange) -> None:
        """`/v1/chat/completions`, as `completions`."""
        body = await read_json(ex)
        await self._handle(ex, body, parse_chat(body), "/v1/chat/completions")

    def check_model(self, req: GenerationRequest) -> None:
        served = self.model()
        if req.model is not None and served is not None and req.model != served:
            raise APIError(404, f"The model `{req.model}` does not exist. This server serves `{served}`.", "model")

    # ------------------------------------------------------------------ the loop
    async def _handle(self, ex: Exchange, body: dict, req: GenerationRequest, path: str) -> None:
        arrival = time.perf_counter()
        request_id = ex.header("X-Request-Id") or f"{self._id_prefix}{next(self._ids)}"
        outcome = _Outcome()
        prompt_tokens = 0
        try:
            self.check_model(req)
            t0 = time.perf_counter()
            prepared = self.router.prepare(req)
            prompt_tokens = len(prepared.token_ids)
            await self._route(ex, body, req, path, prepared, request_id, arrival, t0, outcome)
        except APIError as e:
            outcome.status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            outcome.status = outcome.status or 499  # the client went away (nginx's code for it)
            raise
        except Exception:
            outcome.status = outcome.status or 500
            raise
        finally:
            # Runs after the response is written (a non-streaming body goes out once this
            # returns): metrics, the predictor and the access line wait until the client has its bytes.
            asyncio.get_running_loop().call_soon(self._finish, request_id, path, req, prompt_tokens, outcome,
                                                 time.perf_counter() - arrival)

    def _finish(self, request_id: str, path: str, req: GenerationRequest, prompt_tokens: int, o: _Outcome,
                e2e_s: float) -> None:
        replica = o.counted
        if replica is not None:  # a relayed non-streaming response
            m = self.metrics
            m.series(m.requests, replica.replica_id, self.policy_name, f"{o.status // 100}xx").inc()
            m.e2e.observe(o.e2e_s)
            if o.ttft_s is not None:
                m.ttft.observe(o.ttft_s)
            if o.body is not None:
                self._note_usage(replica, o.body, o)
        booking = o.booking
        if booking is not None:
            booking.finish(o.output_tokens)
            m = self.metrics
            m.series(m.inflight, booking.replica_id).set(booking.replica.inflight_requests)
        if access_log.isEnabledFor(logging.INFO):
            self._log_access(request_id, path, req, prompt_tokens, o, e2e_s)

    def _log_access(self, request_id: str, path: str, req: GenerationRequest, prompt_tokens: int, o: _Outcome,
                    e2e_s: float) -> None:
        ttft = "-" if o.ttft_s is None else f"{o.ttft_s:.4f}s"
        access_log.info(
            "%s %s replica=%s status=%d ttft=%s e2e=%.4fs attempts=%d", path, "stream" if req.stream else "unary",
            o.replica, o.status, ttft, e2e_s, o.attempts,
            extra={"fields": {"request_id": request_id, "path": path, "stream": req.stream, "replica": o.replica,
                   "policy": self.policy_name, "status": o.status,
                   "ttft_s": None if o.ttft_s is None else round(o.ttft_s, 6), "e2e_s": round(e2e_s, 6),
                   "attempts": o.attempts, "prompt_tokens": prompt_tokens, "predicted_cached_tokens": o.predicted_cached,
                   "reported_cached_tokens": o.reported_cached, "failovers": o.failovers}})

    async def _route(self, ex: Exchange, body: dict, req: GenerationRequest, path: str, prepared: Prepared,
                     request_id: str, arrival: float, t0: float, outcome: _Outcome) -> None:
        stream_failover = req.stream and self.retry.failover
        if stream_failover and not req.return_token_ids:
            payload = json.dumps({**body, "return_token_ids": True}).encode()
        else:  # unchanged: forward the bytes the client sent (the server keeps them), no re-encoding
            payload = await ex.read()
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        authorization = ex.header("Authorization")
        if authorization is not None:
            headers["Authorization"] = authorization

        tried: set[str] = set()
        last: UpstreamFailed | None = None
        for attempt in range(self.retry.max_attempts):
            booking = self.router.route(prepared, request_id, frozenset(tried))
            if booking is None:
                break
            decision_s = time.perf_counter() - t0 if attempt == 0 else None
            replica = booking.replica
            self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
            asyncio.get_running_loop().call_soon(_attempt_metrics, self.metrics, replica.replica_id,
                                                 booking.matched_tokens, booking.rr.prompt_tokens, decision_s)
            outcome.replica, outcome.attempts, outcome.predicted_cached = (replica.replica_id, attempt + 1,
                                                                           booking.matched_tokens)
            try:
                await self._send(ex, booking, path, payload, headers, prepared, arrival, outcome)
            except UpstreamFailed as e:
                booking.fail()
                self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
                last = e
                tried.add(replica.replica_id)
                self.registry.record_failure(replica, e.refused)
                self.metrics.retries.labels(replica.replica_id).inc()
                await asyncio.sleep(min(self.retry.backoff_s * (2**attempt), self.retry.backoff_max_s))
                continue
            except BaseException:
                booking.fail()  # cancelled (the client left) or a bug: the replica owes nothing
                self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
                raise
            outcome.booking = booking  # ended once the response is out (`_finish`)
            return
        if last is None:
            self.metrics.no_replica.inc()
            self.metrics.series(self.metrics.requests, NO_REPLICA, self.policy_name, "5xx").inc()
            raise APIError(503, "no healthy replica is available; check `GET /admin/replicas` and the replicas' health")
        if last.status is not None and last.body is not None:
            status_class = f"{last.status // 100}xx"
            self.metrics.series(self.metrics.requests, last.replica.replica_id, self.policy_name, status_class).inc()
            outcome.status = last.status
            ex.reply(last.status, last.body,
                     {"Content-Type": "application/json", REPLICA_HEADER: last.replica.replica_id})
            return
        self.metrics.series(self.metrics.requests, last.replica.replica_id, self.policy_name, "5xx").inc()
        raise APIError(502, f"every replica tried failed ({len(tried)} tried); last error from "
                            f"{last.replica.replica_id}: {last.reason}")

    async def _send(self, ex: Exchange, booking: Booking, path: str, payload: bytes, headers: dict,
                    prepared: Prepared, arrival: float, outcome: _Outcome) -> None:
        replica = booking.replica
        try:
            upstream = await self.upstream().post(replica.url, path, payload, headers)
        except ConnectFailed as e:
            raise UpstreamFailed(replica, str(e), refused=True) from None
        except UpstreamError as e:
            raise UpstreamFailed(replica, str(e)) from None
        try:
            if upstream.status >= 500:
                body = await read_safely(upstream)
                raise UpstreamFailed(replica, f"HTTP {upstream.status}", status=upstream.status, body=body)
            if upstream.status >= 400 or not prepared.request.stream:
                try:
                    body = await upstream.read()
                except UpstreamError as e:
                    raise UpstreamFailed(replica, f"response cut: {e}") from None
                # Metrics and `usage` are read after the response is out (Proxy._finish).
                outcome.status, outcome.counted = upstream.status, replica
                outcome.e2e_s = time.perf_counter() - arrival
                if upstream.status == 200:
                    outcome.ttft_s, outcome.body = outcome.e2e_s, body
                self.registry.record_success(replica)
                ex.reply(upstream.status, body, relayed_headers(upstream, replica.replica_id, headers["X-Request-Id"]))
                return
            try:
                await self._relay_stream(ex, booking, upstream, headers, prepared, arrival, outcome)
            except ClientGone:
                outcome.status = 499  # the client went away (nginx's code for it)
        finally:
            upstream.release()

    # ------------------------------------------------------------------ streaming
    async def _relay_stream(self, ex: Exchange, booking: Booking, upstream: UpstreamResponse,
                            headers: dict, prepared: Prepared, arrival: float, outcome: _Outcome) -> None:
        replica = booking.replica
        pending = bytearray()
        relayed = bytearray()
        opened = False
        try:
            async for chunk in upstream.iter_any():
                pending += chunk
                complete = split_events(pending)
                if not complete:
                    continue
                if not opened:
                    opened = True
                    await self._open_stream(ex, replica, upstream, headers)
                    outcome.status = upstream.status
                    outcome.ttft_s = time.perf_counter() - arrival
                    self.metrics.ttft.observe(outcome.ttft_s)
                    self.registry.record_success(replica)
                await write(ex, complete)
                relayed += complete
        except UpstreamError as e:
            broken = str(e)
        else:
            broken = None if relayed.rstrip().endswith(DONE) else "stream ended without [DONE]"
        if broken is not None and not opened:
            raise UpstreamFailed(replica, f"stream broke before the first event: {broken}")
        if not opened:  # an empty but complete response: nothing to relay
            await self._open_stream(ex, replica, upstream, headers)
            outcome.status = upstream.status
        if broken is not None:
            self.registry.record_failure(replica, refused=False)
            booking.finish(None, ok=False)  # the lost replica holds nothing of it any more
            outcome.failovers = await self.failover.continue_stream(ex, replica, prepared, bytes(relayed), broken,
                                                                    headers["X-Request-Id"])
        else:
            self._note_usage(replica, relayed, outcome)
            # The stream asked for token ids (failover does): count them with one C-level scan.
            ids = _TOKEN_IDS.findall(relayed)
            if ids:
                outcome.output_tokens = sum(x.count(b",") + 1 for x in ids if x)
        self.metrics.series(self.metrics.requests, replica.replica_id, self.policy_name, "2xx").inc()
        self.metrics.e2e.observe(time.perf_counter() - arrival)
        await write(ex)

    @staticmethod
    async def _open_stream(ex: Exchange, replica: ReplicaState, upstream: UpstreamResponse, headers: dict) -> None:
        await ex.open_stream(upstream.status, relayed_headers(upstream, replica.replica_id, headers["X-Request-Id"]))

    def _note_usage(self, replica: ReplicaState, data: bytes | bytearray, outcome: _Outcome) -> None:
        """Read the `usage` object at the end of a JSON body or of an SSE stream (its usage
        chunk) without parsing the rest: cached tokens for the metrics and the access log,
        completion tokens for the output-length predictor."""
        usage = _tail_usage(data)
        if usage is None:
            return
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        self.metrics.series(self.metrics.reported_cached, replica.replica_id).inc(cached)
        outcome.reported_cached = cached
        if isinstance(usage.get("completion_tokens"), int):
            outcome.output_tokens = usage["completion_tokens"]
