"""Forwarding one request: book a replica, send, relay, retry before the first byte.

    parse + validate (same 4xx as a replica) ─▶ Router.prepare ─▶ loop:
        Router.route (decide + record) ─▶ POST to the replica
          refused / reset / 5xx before any byte ─▶ Booking.fail, breaker, backoff, next replica
          4xx ─▶ relayed as is (the client's fault, not the replica's)
          200 ─▶ relay complete SSE events byte for byte (or the JSON body)
                 stream broken mid-way ─▶ balancer/failover.py continues it on another replica
    once the response is out (`_finish`): usage read, the decision audited (balancer/audit.py),
        Booking.finish, metrics, access log

For streams the balancer asks the replica for `return_token_ids` (vLLM's extension) so that a
continuation can be built from exact token ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from balancer import handover
from balancer.access_log import AccessLog
from balancer.audit import DecisionAudit
from balancer.exchange import Exchange
from balancer.failover import Failover
from balancer.fairness import FairQueue, Refused, Ticket, api_key_of
from balancer.metrics import NO_REPLICA, BalancerMetrics
from balancer.registry import Registry, ReplicaState
from balancer.relay import REPLICA_HEADER, CannotHold, ClientGone, UpstreamFailed, read_safely, relayed_headers, write
from balancer.router import Booking, PairBooking, Prepared, Router, WarmUp
from balancer.sse import DONE, split_events
from balancer.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse
from protocol.openai_api import (KV_CAPACITY_EXCEEDED, APIError, GenerationRequest, decode_json_body, error_body,
                                 error_code, parse_for_routing)

__all__ = ["Proxy", "REPLICA_HEADER", "read_json"]


def _with_token_ids(payload: bytes, body: dict) -> bytes:
    """The client's body asking for `return_token_ids` (vLLM's extension) too. Spliced in
    after the opening brace, so every byte the client sent goes on as it was; a body that
    already holds the field (false) is re-encoded instead, since a repeated key's meaning varies."""
    if "return_token_ids" in body:
        return json.dumps({**body, "return_token_ids": True}).encode()
    at = payload.index(b"{") + 1
    rest = payload[at:].lstrip()
    return payload[:at] + (b'"return_token_ids":true' if rest.startswith(b"}") else b'"return_token_ids":true,') \
        + payload[at:]


_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_decode_one = json.JSONDecoder().raw_decode  # one JSON value from an offset; the rest is not read


def tail_usage(data: bytes | bytearray) -> dict | None:
    """The last `"usage": {...}` object in data, parsed alone (without parsing the body)."""
    tail = bytes(data[-2048:])
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    key = _USAGE_KEY.match(tail, at)
    if key is None:
        return None
    try:  # from the key on, whole characters (the quote is ASCII); UnicodeDecodeError is a ValueError
        usage, _ = _decode_one(tail[key.end():].decode("utf-8"))
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


def attempt_metrics(m: BalancerMetrics, replica_id: str, matched: int, prompt_tokens: int,
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
        models: Callable[[], list[str]],
        audit: DecisionAudit,
        fairness: FairQueue | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.upstream = upstream
        self.retry = retry
        self.policy_name = policy_name
        self.models = models  # every model the fleet serves now
        self.audit = audit  # predicted against delivered cached tokens, the latest decisions
        self.fairness = fairness  # the fair admission queue (balancer/fairness.py); None: off
        self.access = access if access is not None else AccessLog()  # one line per request
        # Request ids: a random per-process prefix and a counter (unique across restarts and
        # balancers; a uuid4 per request costs several µs).
        self._id_prefix = f"kvf-{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count()
        self.failover = Failover(router, registry, metrics, upstream)
        self._warmups: set[asyncio.Task] = set()  # prefill-only warm-ups in flight (Booking.warm)

    # ------------------------------------------------------------------ entry points
    async def completions(self, ex: Exchange) -> None:
        """Serve one `/v1/completions` request; the response goes out through `ex`. Only what
        routing needs is checked (`parse_for_routing`); the replica judges the rest, and its
        answer reaches the client unchanged. A body that is not JSON raises `APIError`."""
        await self._generation(ex, "completion", "/v1/completions")

    async def chat(self, ex: Exchange) -> None:
        """`/v1/chat/completions`, as `completions`."""
        await self._generation(ex, "chat", "/v1/chat/completions")

    async def responses(self, ex: Exchange) -> None:
        """`/v1/responses` (OpenAI's Responses API, which vLLM serves): routed by the prefix of
        the chat it renders to, as `chat`; never continued mid-stream (its events are not
        completion chunks)."""
        await self._generation(ex, "responses", "/v1/responses")

    async def _generation(self, ex: Exchange, kind: str, path: str) -> None:
        body = await read_json(ex)
        try:
            req = parse_for_routing(body, kind, self.retry.failover_max_stop)
        except APIError:
            # Nothing to hash (no prompt, a model that is not a string...): a replica chosen by
            # load answers it, so the client gets the replica's own error, as without a balancer.
            return await self.forward(ex)
        await self._handle(ex, body, req, path)

    async def forward(self, ex: Exchange) -> None:
        """Any other route a replica serves (`/v1/embeddings`, `/v1/responses`, `/tokenize`,
        `/detokenize`, `/version`, a `/v1/*` route the balancer does not know): sent as the
        client sent it (method, path, query, body) to the replica with the fewest requests in
        flight among those serving the body's `model`; retried on another replica while none
        has answered; the answer relayed as it comes (a stream as a stream)."""
        arrival = time.perf_counter()
        request_id = ex.header("X-Request-Id") or f"{self._id_prefix}{next(self._ids)}"
        payload = await ex.read() if ex.method not in ("GET", "HEAD") else b""
        model = json_model(payload, ex.header("Content-Type"))
        if model is not None:
            self.check_model(GenerationRequest(kind="other", model=model))
        headers = {"X-Request-Id": request_id}
        for name in ("Content-Type", "Accept", "Authorization"):
            value = ex.header(name)
            if value is not None:
                headers[name] = value
        method = "GET" if ex.method == "HEAD" else ex.method  # the server answers a HEAD with the head alone
        tried: set[str] = set()
        last: UpstreamFailed | None = None
        status = 0
        for attempt in range(self.retry.max_attempts):
            booking = self.router.route_by_load(model, request_id, frozenset(tried))
            if booking is None:
                break
            replica = booking.replica
            try:
                status = await self._forward_once(ex, replica, method, payload, headers)
            except UpstreamFailed as e:
                last = e
                await self._failed(booking, e, tried, attempt)
                continue
            except BaseException:
                booking.fail()
                raise
            booking.finish(None)
            self.metrics.series(self.metrics.requests, replica.replica_id, self.policy_name,
                                f"{status // 100}xx").inc()
            if self.access.enabled:
                rid = replica.replica_id
                self.access.write(f"{ex.method} {ex.path} replica={rid} status={status:d} "
                                  f"e2e={time.perf_counter() - arrival:.4f}s attempts={attempt + 1:d}",
                                  {"request_id": request_id, "path": ex.path, "replica": rid, "status": status,
                                   "attempts": attempt + 1})
            return
        if last is None:
            self.metrics.no_replica.inc()
            raise APIError(503, "no healthy replica is available"
                                + (f" for model `{model}`" if model else "") + "; check `GET /admin/replicas`")
        if last.status is not None and last.body is not None:
            ex.reply(last.status, last.body, {"Content-Type": "application/json", REPLICA_HEADER: last.replica.replica_id})
            return
        raise APIError(502, f"every replica tried failed ({len(tried)} tried); last error from "
                            f"{last.replica.replica_id}: {last.reason}")

    async def _forward_once(self, ex: Exchange, replica: ReplicaState, method: str, payload: bytes,
                            headers: dict) -> int:
        upstream = await self._answer(replica, method, ex.target, payload, headers)
        try:
            out_headers = relayed_headers(upstream, replica.replica_id, headers["X-Request-Id"])
            if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    body = await upstream.read()
                except UpstreamError as e:
                    raise UpstreamFailed(replica, f"response cut: {e}") from None
                self.registry.record_success(replica)
                ex.reply(upstream.status, body, out_headers)
                return upstream.status
            opened = False
            try:
                async for chunk in upstream.iter_any():
                    if not opened:
                        opened = True
                        self.registry.record_success(replica)
                        await ex.open_stream(upstream.status, out_headers)
                    await write(ex, chunk)
            except UpstreamError as e:
                if not opened:
                    raise UpstreamFailed(replica, f"stream broke before the first byte: {e}") from None
                self.registry.record_failure(replica, refused=False)
                await self.failover.give_up(ex, str(e), "only completions and chat completions streams are "
                                                        "continued on another replica")
            except ClientGone:
                return 499
            if not opened:
                await ex.open_stream(upstream.status, out_headers)
            await write(ex)
            return upstream.status
        finally:
            upstream.release()

    def check_model(self, req: GenerationRequest) -> None:
        served = self.models()
        if req.model is not None and served and req.model not in served:
            self.metrics.lora_routed.labels("unserved").inc()
            raise APIError(404, f"The model `{req.model}` does not exist. This fleet serves "
                                f"{', '.join(f'`{m}`' for m in served)} (`GET /v1/models` lists them).", "model")

    # ------------------------------------------------------------------ the loop
    async def _handle(self, ex: Exchange, body: dict, req: GenerationRequest, path: str) -> None:
        arrival = time.perf_counter()
        request_id = ex.header("X-Request-Id") or f"{self._id_prefix}{next(self._ids)}"
        outcome = _Outcome()
        prompt_tokens = 0
        try:
            self.check_model(req)
            t0 = time.perf_counter()
            sessions = self.router.sessions
            key = sessions.key_of(ex.header, req) if sessions is not None else None
            last_turn = key is not None and sessions.releases(ex.header)  # checked (400) before routing
            prepared = self.router.prepare(req, key)
            prompt_tokens = len(prepared.token_ids)
            ticket = predicted = None
            if self.fairness is not None:
                # Admitted before routing: the cached prefix is predicted when the request is sent.
                # The output length is predicted once, for the queue's cost and the policy.
                predictor = self.router.predictor
                predicted = predictor.predict_point(prepared) if predictor is not None else None
                ticket = await self._admit(ex, prepared, predicted)
                if ticket is None:
                    outcome.status = 429
                    return
                t0 = time.perf_counter()  # the decision's latency, not the queue's
            try:
                await self._route(ex, body, req, path, prepared, request_id, arrival, t0, outcome, predicted)
            finally:
                if last_turn:
                    sessions.release(key)
                if ticket is not None:
                    ticket.release(outcome.ttft_s)
        except APIError as e:
            outcome.status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            # the client went away (nginx's code for it), also from a stream already opened with 200
            outcome.status = 499
            raise
        except Exception:
            outcome.status = outcome.status or 500
            raise
        finally:
            # Runs after the response is written (a non-streaming body goes out once this
            # returns): metrics, the predictor and the access line wait until the client has its bytes.
            asyncio.get_running_loop().call_soon(self._finish, request_id, path, req, prompt_tokens, outcome,
                                                 time.perf_counter() - arrival)

    async def _admit(self, ex: Exchange, prepared: Prepared, predicted: float | None) -> Ticket | None:
        """The request's turn in the fair admission queue, or None when it was shed (answered
        with 429 and Retry-After). Its cost: prompt tokens + `predicted` output tokens (None:
        nothing predicts them; max_tokens, else the queue's default)."""
        fair = self.fairness
        klass, tenant = fair.identify(ex.header, api_key_of(ex))
        req = prepared.request
        sequences = req.n * (1 + len(req.more_prompts))
        limit = req.max_tokens or fair.cfg.default_output_tokens
        output = limit if predicted is None else min(predicted, limit)
        cost = len(prepared.token_ids) + prepared.extra_prompt_tokens + int(output) * sequences
        try:
            return await fair.admit(klass, tenant, cost)
        except Refused as e:
            self.metrics.series(self.metrics.requests, NO_REPLICA, self.policy_name, "4xx").inc()
            ex.reply(429, json.dumps(error_body(429, f"{e}; retry after the Retry-After header's seconds, or "
                                                     f"send less of this class's traffic")).encode(),
                     {"Content-Type": "application/json", "Retry-After": str(e.retry_after_s),
                      "X-Kvfleet-Class": klass.name})
            return None

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
            self.audit.record(request_id, path, booking, o.status, o.reported_cached)
            booking.finish(o.output_tokens)
            m = self.metrics
            m.series(m.inflight, booking.replica_id).set(booking.replica.inflight_requests)
        if self.access.enabled:
            self._log_access(request_id, path, req, prompt_tokens, o, e2e_s)

    def _log_access(self, request_id: str, path: str, req: GenerationRequest, prompt_tokens: int, o: _Outcome,
                    e2e_s: float) -> None:
        ttft = "-" if o.ttft_s is None else f"{o.ttft_s:.4f}s"
        self.access.write(
            f"{path} {'stream' if req.stream else 'unary'} replica={o.replica} status={o.status:d} ttft={ttft} "
            f"e2e={e2e_s:.4f}s attempts={o.attempts:d}",
            {"request_id": request_id, "path": path, "stream": req.stream, "replica": o.replica,
             "policy": self.policy_name, "status": o.status,
             "ttft_s": None if o.ttft_s is None else round(o.ttft_s, 6), "e2e_s": round(e2e_s, 6),
             "attempts": o.attempts, "prompt_tokens": prompt_tokens, "predicted_cached_tokens": o.predicted_cached,
             "reported_cached_tokens": o.reported_cached, "failovers": o.failovers})

    async def _route(self, ex: Exchange, body: dict, req: GenerationRequest, path: str, prepared: Prepared,
                     request_id: str, arrival: float, t0: float, outcome: _Outcome,
                     predicted: float | None = None) -> None:
        """Serve the request on a booked replica, retrying before the first byte. `predicted`:
        its output length as already predicted (the fair queue's), else None (the router predicts)."""
        payload = await ex.read()  # forwarded as the client sent it (the server keeps the bytes)
        if req.continuable and self.retry.failover and not req.return_token_ids:
            payload = _with_token_ids(payload, body)  # exact failover needs the token ids
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        authorization = ex.header("Authorization")
        if authorization is not None:
            headers["Authorization"] = authorization

        tried: set[str] = set()
        # A request a prefill/decode pair can serve, on a fleet with single-role replicas
        # (Registry.disaggregated is kept as state: nothing is scanned per request otherwise).
        split = self.registry.disaggregated and handover.wanted(path, body, prepared)
        first = self.router.route(prepared, request_id, predicted_output_tokens=predicted, split=split,
                                  warmups=True)  # the one routing transaction
        if isinstance(first, PairBooking):
            if first.unified:
                self.metrics.disagg.labels("unified").inc()
                first = first.decode
            elif await self._disaggregated(ex, body, req, path, prepared, first, headers, arrival, outcome, tried):
                return
            else:
                first = None  # a member failed before the client got anything: on one replica, without it
        elif split and first is not None and self.router.pairs is not None:
            self.metrics.disagg.labels("fallback_no_pair").inc()
        last: UpstreamFailed | None = None
        attempt = sent = 0  # failed attempts so far; replicas sent to
        while attempt < self.retry.max_attempts:
            booking = first if attempt == 0 and first is not None else \
                self.router.route(prepared, request_id, frozenset(tried), predicted, warmups=True)
            first = None
            if booking is None:
                break
            decision_s = time.perf_counter() - t0 if sent == 0 else None
            sent += 1
            replica = booking.replica
            self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
            if prepared.lora_name is not None:
                self.metrics.lora_routed.labels("resident" if prepared.lora_name in replica.loras else "load").inc()
            asyncio.get_running_loop().call_soon(attempt_metrics, self.metrics, replica.replica_id,
                                                 booking.matched_tokens, booking.rr.prompt_tokens, decision_s)
            outcome.replica, outcome.attempts, outcome.predicted_cached = (replica.replica_id, sent,
                                                                           booking.matched_tokens)
            if booking.warm is not None:
                self._start_warmup(booking.warm, authorization)
            try:
                await self._send(ex, booking, path, payload, headers, prepared, arrival, outcome)
            except UpstreamFailed as e:
                last = e
                await self._failed(booking, e, tried, attempt)
                # A replica too small for it is no failed attempt: each excludes one replica, so
                # the fleet's size bounds them, and a larger replica is always reached.
                attempt += not isinstance(e, CannotHold)
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
        if isinstance(last, CannotHold):
            self.metrics.series(self.metrics.requests, last.replica.replica_id, self.policy_name, "4xx").inc()
            raise APIError(400, f"no replica can hold this request's KV: every one tried ({len(tried)}) answered that "
                                f"its whole cache is too small (last, {last.replica.replica_id}: {last.reason}); "
                                f"shorten the prompt or add a replica with more KV memory", "prompt",
                           code=KV_CAPACITY_EXCEEDED)
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

    async def _disaggregated(self, ex: Exchange, body: dict, req: GenerationRequest, path: str, prepared: Prepared,
                             pair: PairBooking, headers: dict, arrival: float, outcome: _Outcome,
                             tried: set[str]) -> bool:
        """Serve the request through the split pair the router booked (balancer/disagg.py, legs in
        balancer/handover.py): True once it is answered; False when a member failed before the
        client got anything (the failed member is then in `tried`, both bookings ended): the
        caller serves it on one replica."""
        m = self.metrics
        started = time.perf_counter()
        answered, params = await self._leg(pair.prefill, self._prefill(pair.prefill, path, body, headers), tried,
                                           "fallback_prefill")
        if answered:
            pair.prefill.finish(None)  # its one token is not the request's output
        if params is None:
            pair.decode.fail()  # never sent
            if answered:  # an answer without kv_transfer_params: it cannot hand over
                m.disagg.labels("fallback_prefill").inc()
            return False
        m.disagg_prefill.observe(time.perf_counter() - started)
        booking = pair.decode
        outcome.replica, outcome.attempts, outcome.predicted_cached = booking.replica_id, 1, booking.matched_tokens
        payload = handover.decode_payload(body, params, req.continuable and self.retry.failover
                                          and not req.return_token_ids)
        answered, _ = await self._leg(booking, self._send(ex, booking, path, payload, headers, prepared, arrival,
                                                          outcome), tried, "fallback_decode")
        if not answered:
            return False
        outcome.booking = booking  # ended once the response is out (`_finish`)
        m.disagg.labels("disaggregated").inc()
        return True

    async def _leg(self, booking: Booking, leg, tried: set[str], failed: str) -> tuple[bool, object]:
        """Await one leg of a disaggregated request: (True, its result); (False, None) when its
        replica gave no answer (the booking failed, the replica in `tried`, `failed` counted)."""
        try:
            return True, await leg
        except UpstreamFailed as e:
            await self._failed(booking, e, tried, 0)
            self.metrics.disagg.labels(failed).inc()
            return False, None
        except BaseException:
            booking.fail()
            raise

    def _start_warmup(self, warm: WarmUp, authorization: str | None) -> None:
        """Send `warm` (a prefix the policy asked to be computed on another replica) as a
        prefill-only completion beside the request; the booking ends when it returns."""
        task = asyncio.get_running_loop().create_task(self._warmup(warm, authorization))
        self._warmups.add(task)
        task.add_done_callback(self._warmups.discard)

    async def _warmup(self, warm: WarmUp, authorization: str | None) -> None:
        booking = warm.booking
        req = warm.prepared.request
        body = {"model": req.model, "prompt": list(warm.prepared.token_ids), "max_tokens": 1, "temperature": 0.0}
        if req.cache_salt is not None:  # the same salt, or the blocks hash apart
            body["cache_salt"] = req.cache_salt
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "X-Request-Id": booking.rr.request_id}
        if authorization is not None:  # the client's key: the balancer has none of its own
            headers["Authorization"] = authorization
        outcome = "failed"
        try:
            upstream = await self.upstream().request("POST", booking.replica.url, "/v1/completions", payload, headers)
            try:
                await upstream.read()
            finally:
                upstream.release()
            outcome = "ok" if upstream.status == 200 else "refused"
        except UpstreamError:
            pass
        finally:  # cancelled too (shutdown): the replica owes it nothing we wait for
            booking.finish(1, ok=outcome == "ok")
            self.metrics.warmups.labels(outcome).inc()

    async def close(self) -> None:
        """Cancel the warm-ups still in flight (shutdown)."""
        tasks = list(self._warmups)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _prefill(self, booking: Booking, path: str, body: dict, headers: dict) -> dict | None:
        """The prefill leg: its kv_transfer_params, None when its answer has none (a 4xx, or a
        replica that cannot hand over); `UpstreamFailed` when it gave no answer, `CannotHold`
        when its cache is too small for the prompt."""
        replica = booking.replica
        upstream = await self._answer(replica, "POST", path, handover.prefill_payload(body), headers)
        try:
            raw = await upstream.read()
        except UpstreamError as e:
            raise UpstreamFailed(replica, f"prefill answer cut: {e}") from None
        finally:
            upstream.release()
        if upstream.status == 400 and error_code(raw) == KV_CAPACITY_EXCEEDED:
            raise CannotHold(replica, _message(raw), status=400, body=raw)
        self.registry.record_success(replica)
        return handover.params_of(raw) if upstream.status == 200 else None

    async def _failed(self, booking: Booking, e: UpstreamFailed, tried: set[str], attempt: int) -> None:
        """An attempt that got no answer: end its booking, tell the breaker, back off (a replica
        too small for the request, `CannotHold`: neither; it answered, and is healthy)."""
        replica = booking.replica
        booking.fail()
        self.metrics.series(self.metrics.inflight, replica.replica_id).set(replica.inflight_requests)
        tried.add(replica.replica_id)
        if isinstance(e, CannotHold):
            self.registry.record_success(replica)
            return
        self.registry.record_failure(replica, e.refused)
        self.metrics.retries.labels(replica.replica_id).inc()
        await asyncio.sleep(min(self.retry.backoff_s * (2**attempt), self.retry.backoff_max_s))

    async def _answer(self, replica: ReplicaState, method: str, target: str, payload: bytes,
                      headers: dict) -> UpstreamResponse:
        """The replica's response, once its head is in; `UpstreamFailed` for no answer or a 5xx
        (worth another replica: the caller retries)."""
        try:
            upstream = await self.upstream().request(method, replica.url, target, payload, headers)
        except ConnectFailed as e:
            raise UpstreamFailed(replica, str(e), refused=True) from None
        except UpstreamError as e:
            raise UpstreamFailed(replica, str(e)) from None
        if upstream.status >= 500:
            try:
                body = await read_safely(upstream)
            finally:
                upstream.release()
            raise UpstreamFailed(replica, f"HTTP {upstream.status}", status=upstream.status, body=body)
        return upstream

    async def _send(self, ex: Exchange, booking: Booking, path: str, payload: bytes, headers: dict,
                    prepared: Prepared, arrival: float, outcome: _Outcome) -> None:
        replica = booking.replica
        upstream = await self._answer(replica, "POST", path, payload, headers)
        try:
            if upstream.status >= 400 or not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    body = await upstream.read()
                except UpstreamError as e:
                    raise UpstreamFailed(replica, f"response cut: {e}") from None
                if upstream.status == 400 and error_code(body) == KV_CAPACITY_EXCEEDED:
                    raise CannotHold(replica, _message(body), status=400, body=body)
                # Metrics and `usage` are read after the response is out (Proxy._finish).
                outcome.status, outcome.counted = upstream.status, replica
                outcome.e2e_s = time.perf_counter() - arrival
                if upstream.status == 200:
                    outcome.ttft_s, outcome.body = outcome.e2e_s, body
                self.registry.record_success(replica)
                ex.reply(upstream.status, body, relayed_headers(upstream, replica.replica_id, headers["X-Request-Id"]))
                return
            try:
                await self._relay_stream(ex, booking, upstream, headers, prepared, arrival, outcome,
                                         ends_with_done=path != "/v1/responses")
            except ClientGone:
                outcome.status = 499  # the client went away (nginx's code for it)
        finally:
            upstream.release()

    # ------------------------------------------------------------------ streaming
    async def _relay_stream(self, ex: Exchange, booking: Booking, upstream: UpstreamResponse,
                            headers: dict, prepared: Prepared, arrival: float, outcome: _Outcome,
                            ends_with_done: bool = True) -> None:
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
        else:  # a completions or chat stream ends with [DONE]; a Responses API stream does not
            broken = None if not ends_with_done or relayed.rstrip().endswith(DONE) else "stream ended without [DONE]"
        if broken is not None and not opened:
            raise UpstreamFailed(replica, f"stream broke before the first event: {broken}")
        if not opened:  # an empty but complete response: nothing to relay
            await self._open_stream(ex, replica, upstream, headers)
            outcome.status = upstream.status
        if broken is not None:
            self.registry.record_failure(replica, refused=False)
            booking.finish(None, ok=False)  # the lost replica holds nothing of it any more
            if prepared.request.continuable and self.retry.failover:
                outcome.failovers = await self.failover.continue_stream(ex, replica, prepared, bytes(relayed),
                                                                        broken, headers["X-Request-Id"])
            else:
                await self.failover.give_up(ex, broken, "it cannot be continued exactly on another replica (it "
                                            "is not greedy, has n > 1, logprobs or fields whose effect depends "
                                            "on the output so far)" if self.retry.failover else
                                            "failover is off (`--no-failover`)")
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
        cached, completion = note_usage(self.metrics, replica.replica_id, data)
        if cached is not None:
            outcome.reported_cached = cached
        if completion is not None:
            outcome.output_tokens = completion


def _message(raw: bytes) -> str:
    """The `error.message` of a replica's error body (its first 300 characters)."""
    try:
        return str(json.loads(raw)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode("utf-8", "replace")


def json_model(payload: bytes, content_type: str | None) -> str | None:
    """The `model` string of a JSON body (None: no JSON, or no such string), for a request that
    is routed by load among the replicas serving its model."""
    if not payload or not (content_type or "").startswith("application/json"):
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return None  # the replica says what is wrong with it
    return body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None


def note_usage(m: BalancerMetrics, replica_id: str, data: bytes | bytearray) -> tuple[int | None, int | None]:
    """Read the `usage` object at the end of a JSON body or of an SSE stream (its usage chunk)
    without parsing the rest: (cached prompt tokens, counted in the metrics; completion tokens,
    for the output-length predictor), None for what the response does not say. The proxy and
    the endpoint picker (balancer/picker/) read responses with it."""
    return count_usage(m, replica_id, tail_usage(data))


def count_usage(m: BalancerMetrics, replica_id: str, usage: dict | None) -> tuple[int | None, int | None]:
    """A response's `usage` object (None: it had none) counted as note_usage does."""
    if usage is None:
        return None, None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    m.series(m.reported_cached, replica_id).inc(cached)
    completion = usage.get("completion_tokens")
    return cached, completion if isinstance(completion, int) else None
