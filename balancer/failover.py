"""Mid-stream failover: a stream whose replica was lost is continued on another replica.

    stream broken after some events ─▶ read what the client already has (balancer/sse.py:
        text, token ids, finished?) ─▶ loop while not finished:
            Router.route(prompt + tokens so far, exclude the replicas tried) ─▶ POST a
            greedy-exact continuation (token-id prompt, remaining max_tokens, same sampling)
            ─▶ relay its chunks re-shaped as the client's original stream (same id, object,
               created; text re-derived from all token ids) ─▶ Booking.finish / .fail
        nothing could continue it ─▶ one SSE error event, then the end of the stream

Only streams that can be continued exactly get here (`GenerationRequest.continuable`: greedy,
one sequence, no logprobs, no field whose effect depends on the output so far); a lost stream of
any other request ends with the error event (`give_up`). The balancer asked the first replica
for `return_token_ids` (vLLM's extension), so the continuation is built from exact token ids and
the stream is token-identical across a failover. A stop string that straddles the failover point is not detected (documented).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from balancer.exchange import Exchange
from balancer.metrics import BalancerMetrics
from balancer.registry import Registry, ReplicaState
from balancer.relay import UpstreamFailed, write
from balancer.router import Booking, Prepared, Router
from balancer.sse import event, event_data, read_progress, split_events
from balancer.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse
from protocol.openai_api import GenerationRequest, error_body


class Failover:
    def __init__(self, router: Router, registry: Registry, metrics: BalancerMetrics,
                 upstream: Callable[[], UpstreamPool]) -> None:
        self.router = router
        self.registry = registry
        self.metrics = metrics
        self.upstream = upstream

    async def continue_stream(self, out: Exchange, lost: ReplicaState, prepared: Prepared, relayed: bytes,
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
            cont = self._continuation(prepared, generated, remaining)
            booking = self.router.route(cont, request_id, frozenset(tried))
            if booking is None:
                break
            replica = booking.replica
            tried.add(replica.replica_id)
            self.metrics.failovers.labels(lost.replica_id).inc()
            body = _continuation_body(req, cont, remaining, len(generated))
            try:
                finished, new_ids = await self._relay(out, booking, body, req, progress, len(generated),
                                                      len(prepared.token_ids), request_id)
            except UpstreamFailed as e:
                booking.fail()
                self.registry.record_failure(replica, e.refused)
                why = e.reason
                continue
            except BaseException:
                booking.fail()
                raise
            # A continuation's tokens are only part of the answer: the predictor learns nothing.
            booking.finish(None, ok=finished)
            generated.extend(new_ids)
            if finished:
                return len(tried) - 1
            lost = replica
        if progress.finished:  # the last chunk arrived, only [DONE] was lost
            await write(out, b"data: [DONE]\n\n")
            return len(tried) - 1
        await self._error(out, f"the replica serving this stream was lost ({why}) and no other replica could "
                               f"continue it after {len(generated)} tokens ({len(text_so_far)} characters); "
                               f"retry the request")
        return len(tried) - 1

    async def give_up(self, out: Exchange, why: str, because: str) -> None:
        """End a broken stream that is not to be continued with one SSE error event."""
        await self._error(out, f"the replica serving this stream was lost ({why}); the balancer did not "
                               f"continue it because {because}; retry the request")

    async def _error(self, out: Exchange, message: str) -> None:
        self.metrics.failover_errors.inc()
        await write(out, event(error_body(502, message)))

    def _continuation(self, prepared: Prepared, generated: list[int], remaining: int | None) -> Prepared:
        tokens = prepared.token_ids + tuple(generated)
        req = GenerationRequest(kind="completion", model=prepared.request.model, prompt_token_ids=tokens,
                                max_tokens=remaining, cache_salt=prepared.request.cache_salt)
        return self.router.prepare(req, session=prepared.session)

    async def _relay(self, out: Exchange, booking: Booking, body: dict, req: GenerationRequest, progress,
                     generated_before: int, prompt_tokens: int, request_id: str) -> tuple[bool, list[int]]:
        """Relay a continuation's chunks re-shaped as the client's original stream."""
        replica = booking.replica
        new_ids: list[int] = []
        upstream: UpstreamResponse | None = None
        try:
            upstream = await self.upstream().post(replica.url, "/v1/completions", json.dumps(body).encode(),
                                                  {"Content-Type": "application/json", "X-Request-Id": request_id})
            if upstream.status != 200:
                raise UpstreamFailed(replica, f"HTTP {upstream.status}", refused=False)
            pending = bytearray()
            async for chunk in upstream.iter_any():
                pending += chunk
                for data in event_data(split_events(pending)):
                    if data == b"[DONE]":
                        await write(out, b"data: [DONE]\n\n")
                        self.registry.record_success(replica)
                        return True, new_ids
                    await write(out, _reshape(json.loads(data), req, progress, generated_before + len(new_ids),
                                              prompt_tokens, new_ids))
        except ConnectFailed as e:
            raise UpstreamFailed(replica, str(e), refused=True) from None
        except (UpstreamError, ValueError) as e:
            if not new_ids:
                raise UpstreamFailed(replica, f"{type(e).__name__}: {e}") from None
            return False, new_ids
        finally:
            if upstream is not None:
                upstream.release()
        return False, new_ids


def _continuation_body(req: GenerationRequest, cont: Prepared, remaining: int | None, generated: int) -> dict:
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
    if req.min_tokens > generated:
        body["min_tokens"] = req.min_tokens - generated
    return body


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
