"""Forwarding one request: choose, send, relay, retry before the first byte, fail over after.

    parse + validate (same 4xx as a replica) ─▶ Router.prepare ─▶ loop:
        Registry.usable ─▶ Router.decide ─▶ POST to the replica
          refused / reset / 5xx before any byte ─▶ breaker, backoff, next replica
          4xx ─▶ relayed as is (the client's fault, not the replica's)
          200 ─▶ relay complete SSE events byte for byte (or the JSON body)
                 stream broken mid-way ─▶ continue on another replica from prompt + tokens so far

For streams the balancer asks the replica for `return_token_ids` (vLLM's extension) so that a
continuation is built from exact token ids, which makes a greedy stream token-identical across
a failover. A stop string that straddles the failover point is not detected (documented).
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
from balancer.metrics import NO_REPLICA, BalancerMetrics
from balancer.registry import Registry, ReplicaState
from balancer.router import Prepared, Router
from balancer.sse import DONE, event, event_data, read_progress, split_events
from balancer.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse
from protocol.openai_api import (APIError, GenerationRequest, decode_json_body, error_body, parse_chat,
                                 parse_completion)

_RELAY_HEADERS = (("content-type", "Content-Type"), ("cache-control", "Cache-Control"))
REPLICA_HEADER = "X-Kvfleet-Replica"
access_log = logging.getLogger("kvfleet.balancer.access")


class _UpstreamFailed(Exception):
    def __init__(self, replica: ReplicaState, reason: str, refused: bool = False, status: int | None = None,
                 body: bytes | None = None) -> None:
        super().__init__(reason)
        self.replica = replica
        self.reason = reason
        self.refused = refused
        self.status = status
        self.body = body


class _ClientGone(Exception):
    """Writing to the client failed: it went away. Not the replica's fault: no retry, no
    failover, no breaker penalty; the handler just stops."""


async def _write(out: Exchange, data: bytes | None = None) -> None:
    """Write to the client (`None`: end the response), telling a client that left (`_ClientGone`)
    apart from a replica that failed (aiohttp raises ClientConnectionResetError, a ClientError,
    for both)."""
    try:
        await (out.write(data) if data is not None else out.end())
    except ConnectionResetError:
        raise _ClientGone() from None


@dataclass
class _Attempt:
    replica: ReplicaState
    tokens: int  # prompt + expected output, for in-flight token bookkeeping


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
    rr: object = None  # the RoutingRequest that succeeded (for the predictor)
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
        if o.rr is not None and o.output_tokens is not None and self.router.predictor is not None:
            self.router.finished(o.rr, o.output_tokens)
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
        last: _UpstreamFailed | None = None
        for attempt in range(self.retry.max_attempts):
            candidates = self.registry.usable(frozenset(tried))
            if not candidates:
                break
            rr = self.router.routing_request(prepared, request_id)
            decision = self.router.decide(rr, candidates)
            decision_s = time.perf_counter() - t0 if attempt == 0 else None
            replica = self.registry.get(decision.replica_id)
            matched = rr.matched_blocks.get(replica.replica_id, 0) * rr.block_size
            n_prompt = len(prepared.token_ids)
            att = _Attempt(replica, n_prompt + (req.max_tokens or 0))
            self.registry.on_sent(replica, att.tokens, max(0, n_prompt - matched))
            # The policy and the approximate index learn of it now: the next decision, maybe for a
            # request already waiting in this loop turn, must see it.
            self.router.routed(rr, decision)
            self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
            asyncio.get_running_loop().call_soon(_attempt_metrics, self.metrics, replica.replica_id, matched, n_prompt,
                                                 decision_s)
            outcome.replica, outcome.attempts, outcome.predicted_cached = replica.replica_id, attempt + 1, matched
            ok = False
            try:
                await self._send(ex, replica, path, payload, headers, prepared, rr, arrival, outcome)
                ok = True
                return
            except _UpstreamFailed as e:
                last = e
                tried.add(replica.replica_id)
                self.registry.record_failure(replica, e.refused)
                self.metrics.retries.labels(replica.replica_id).inc()
                await asyncio.sleep(min(self.retry.backoff_s * (2**attempt), self.retry.backoff_max_s))
            finally:
                self.registry.on_done(replica, att.tokens)
                self.router.policy.on_complete(rr, replica.replica_id, ok)
                if ok:
                    outcome.rr = rr  # the predictor learns from it once the response is out
                self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
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

    async def _send(self, ex: Exchange, replica: ReplicaState, path: str, payload: bytes, headers: dict,
                    prepared: Prepared, rr, arrival: float, outcome: _Outcome) -> None:
        try:
            upstream = await self.upstream().post(replica.url, path, payload, headers)
        except ConnectFailed as e:
            raise _UpstreamFailed(replica, str(e), refused=True) from None
        except UpstreamError as e:
            raise _UpstreamFailed(replica, str(e)) from None
        try:
            if upstream.status >= 500:
                body = await _read_safely(upstream)
                raise _UpstreamFailed(replica, f"HTTP {upstream.status}", status=upstream.status, body=body)
            if upstream.status >= 400 or not prepared.request.stream:
                try:
                    body = await upstream.read()
                except UpstreamError as e:
                    raise _UpstreamFailed(replica, f"response cut: {e}") from None
                # Metrics and `usage` are read after the response is out (Proxy._finish).
                outcome.status, outcome.counted = upstream.status, replica
                outcome.e2e_s = time.perf_counter() - arrival
                if upstream.status == 200:
                    outcome.ttft_s, outcome.body = outcome.e2e_s, body
                self.registry.record_success(replica)
                out_headers = _relayed_headers(upstream)
                out_headers[REPLICA_HEADER] = replica.replica_id
                out_headers["X-Request-Id"] = headers["X-Request-Id"]
                ex.reply(upstream.status, body, out_headers)
                return
            try:
                await self._relay_stream(ex, replica, upstream, headers, prepared, rr, arrival, outcome)
            except _ClientGone:
                outcome.status = 499  # the client went away (nginx's code for it)
        finally:
            upstream.release()

    # ------------------------------------------------------------------ streaming
    async def _relay_stream(self, ex: Exchange, replica: ReplicaState, upstream: UpstreamResponse,
                            headers: dict, prepared: Prepared, rr, arrival: float, outcome: _Outcome) -> None:
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
                await _write(ex, complete)
                relayed += complete
        except UpstreamError as e:
            broken = str(e)
        else:
            broken = None if relayed.rstrip().endswith(DONE) else "stream ended without [DONE]"
        if broken is not None and not opened:
            raise _UpstreamFailed(replica, f"stream broke before the first event: {broken}")
        if not opened:  # an empty but complete response: nothing to relay
            await self._open_stream(ex, replica, upstream, headers)
            outcome.status = upstream.status
        if broken is not None:
            self.registry.record_failure(replica, refused=False)
            outcome.failovers = await self._failover(ex, replica, prepared, bytes(relayed), broken,
                                                     headers["X-Request-Id"])
        else:
            self._note_usage(replica, relayed, outcome)
            # The stream asked for token ids (failover does): count them with one C-level scan.
            ids = _TOKEN_IDS.findall(relayed)
            if ids:
                outcome.output_tokens = sum(x.count(b",") + 1 for x in ids if x)
        self.metrics.series(self.metrics.requests, replica.replica_id, self.policy_name, "2xx").inc()
        self.metrics.e2e.observe(time.perf_counter() - arrival)
        await _write(ex)

    @staticmethod
    async def _open_stream(ex: Exchange, replica: ReplicaState, upstream: UpstreamResponse, headers: dict) -> None:
        out_headers = _relayed_headers(upstream)
        out_headers[REPLICA_HEADER] = replica.replica_id
        out_headers["X-Request-Id"] = headers["X-Request-Id"]
        await ex.open_stream(upstream.status, out_headers)

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

    async def _failover(self, out: Exchange, lost: ReplicaState, prepared: Prepared, relayed: bytes,
                        why: str, request_id: str) -> int:
        """Continue a broken stream on other replicas; the client sees one stream. Returns the
        number of continuations tried."""
        req = prepared.request
        progress = read_progress(relayed)
        tried = {lost.replica_id}
        generated = list(progress.token_ids)
        text_so_far = "".join(progress.text)
        # The client's text is re-derived from token ids from here on: the lost replica may
        # have held back the first bytes of a character, which the new one never saw as text.
        progress.text_state = _FailoverText(self.router.tokenizer, generated, len(text_so_far))
        while not progress.finished:
            if not progress.has_token_ids:
                break  # the replica did not give token ids: an exact continuation is impossible
            remaining = None if req.max_tokens is None else req.max_tokens - len(generated)
            if remaining is not None and remaining <= 0:
                break
            candidates = self.registry.usable(frozenset(tried))
            if not candidates:
                break
            cont = self._continuation(prepared, generated, remaining)
            rr = self.router.routing_request(cont, progress.id or "failover")
            decision = self.router.decide(rr, candidates)
            replica = self.registry.get(decision.replica_id)
            tried.add(replica.replica_id)
            self.metrics.failovers.labels(lost.replica_id).inc()
            body = self._continuation_body(req, cont, remaining)
            try:
                finished, new_ids = await self._relay_continuation(out, replica, body, req, progress, len(generated),
                                                                   len(prepared.token_ids), request_id)
            except _UpstreamFailed as e:
                self.registry.record_failure(replica, e.refused)
                why = e.reason
                continue
            generated.extend(new_ids)
            if finished:
                return len(tried) - 1
            lost = replica
        if progress.finished:  # the last chunk arrived, only [DONE] was lost
            await _write(out, b"data: [DONE]\n\n")
            return len(tried) - 1
        self.metrics.failover_errors.inc()
        err = error_body(502, f"the replica serving this stream was lost ({why}) and no other replica could "
                              f"continue it after {len(generated)} tokens ({len(text_so_far)} characters); "
                              f"retry the request")
        await _write(out, event(err))
        return len(tried) - 1

    def _continuation(self, prepared: Prepared, generated: list[int], remaining: int | None) -> Prepared:
        tokens = prepared.token_ids + tuple(generated)
        req = GenerationRequest(kind="completion", model=prepared.request.model, prompt_token_ids=tokens,
                                cache_salt=prepared.request.cache_salt)
        return self.router.prepare(req)

    def _continuation_body(self, req: GenerationRequest, cont: Prepared, remaining: int | None) -> dict:
        body = {
            "prompt": list(cont.token_ids), "stream": True, "return_token_ids": True,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "ignore_eos": req.ignore_eos,
            "stop": list(req.stop), "stop_token_ids": list(req.stop_token_ids),
            "stream_options": {"include_usage": req.include_usage},
        }
        if req.model is not None:
            body["model"] = req.model
        if remaining is not None:
            body["max_tokens"] = remaining
        if req.seed is not None:
            body["seed"] = req.seed
        if req.cache_salt is not None:
            body["cache_salt"] = req.cache_salt
        return body

    async def _relay_continuation(self, out: Exchange, replica: ReplicaState, body: dict, req: GenerationRequest, progress,
                                  generated_before: int, prompt_tokens: int,
                                  request_id: str) -> tuple[bool, list[int]]:
        """Relay a continuation's chunks re-shaped as the client's original stream."""
        new_ids: list[int] = []
        self.registry.on_sent(replica, len(body["prompt"]), 0)
        upstream: UpstreamResponse | None = None
        try:
            upstream = await self.upstream().post(replica.url, "/v1/completions", json.dumps(body).encode(),
                                                  {"Content-Type": "application/json", "X-Request-Id": request_id})
            if upstream.status != 200:
                raise _UpstreamFailed(replica, f"HTTP {upstream.status}", refused=False)
            pending = bytearray()
            async for chunk in upstream.iter_any():
                pending += chunk
                for data in event_data(split_events(pending)):
                    if data == b"[DONE]":
                        await _write(out, b"data: [DONE]\n\n")
                        self.registry.record_success(replica)
                        return True, new_ids
                    await _write(out, self._reshape(json.loads(data), req, progress, generated_before + len(new_ids),
                                                  prompt_tokens, new_ids))
        except ConnectFailed as e:
            raise _UpstreamFailed(replica, str(e), refused=True) from None
        except (UpstreamError, ValueError) as e:
            if not new_ids:
                raise _UpstreamFailed(replica, f"{type(e).__name__}: {e}") from None
            return False, new_ids
        finally:
            if upstream is not None:
                upstream.release()
            self.registry.on_done(replica, len(body["prompt"]))
        return False, new_ids

    @staticmethod
    def _reshape(chunk: dict, req: GenerationRequest, progress, generated: int, prompt_tokens: int,
                 new_ids: list[int]) -> bytes:
        base = {"id": progress.id, "object": progress.object, "created": progress.created, "model": chunk.get("model")}
        choices = []
        for c in chunk.get("choices") or []:
            ids = c.get("token_ids") or []
            new_ids.extend(ids)
            text = progress.text_state.add(ids, final=bool(c.get("finish_reason")))
            if req.kind == "chat":
                delta = {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": c.get("finish_reason")}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": c.get("finish_reason")}
            if c.get("finish_reason"):
                choice["stop_reason"] = c.get("stop_reason")
                progress.finished = True
            choice["token_ids"] = ids
            choices.append(choice)
        base["choices"] = choices
        usage = chunk.get("usage")
        if usage:
            done = generated + sum(len(c.get("token_ids") or []) for c in chunk.get("choices") or [])
            base["usage"] = {**usage, "prompt_tokens": prompt_tokens, "completion_tokens": done,
                             "total_tokens": prompt_tokens + done}
        return event(base)


class _FailoverText:
    """Text deltas of a continued stream, from all token ids generated so far.

    Decodes the whole generated sequence on every chunk (failover only, so the quadratic cost
    is acceptable) and holds back a trailing incomplete character, as a replica does.
    """

    def __init__(self, tokenizer, generated: list[int], sent_chars: int) -> None:
        self.tokenizer = tokenizer
        self.ids = list(generated)
        self.sent = sent_chars

    def add(self, ids: list[int], final: bool) -> str:
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids)
        if not final and full.endswith("\ufffd"):
            return ""
        delta = full[self.sent:]
        self.sent = max(self.sent, len(full))
        return delta


async def _read_safely(resp: UpstreamResponse) -> bytes | None:
    try:
        return await resp.read()
    except UpstreamError:
        return None


def _relayed_headers(upstream: UpstreamResponse) -> dict[str, str]:
    """The replica's response headers that go on to the client (Content-Type, Cache-Control)."""
    h = upstream.headers
    return {name: h[key] for key, name in _RELAY_HEADERS if key in h}
