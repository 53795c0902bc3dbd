"""The replica's OpenAI-compatible HTTP server (vLLM-shaped, design §5).

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not), GET /v1/models,
GET /health, POST /tokenize, POST /detokenize, GET /load, GET /kv_event_sources, GET /metrics,
GET /version, GET /step_log (with `--step-log N`). SIGTERM drains: new requests get 503,
in-flight ones finish (up to a timeout), then the process exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.openai_api import (KV_CAPACITY_EXCEEDED, USAGE_HEADER, APIError, GenerationRequest, decode_json_body,
                                 error_body, parse_chat, parse_completion, usage_header)
from protocol.tokenizer import apply_chat_template
from replica import auth, kv_state, kv_transfer
from replica.config import ServerConfig
from replica.choices import Logprobs, fan_out, merged
from replica.engine import RequestOutput
from replica.request import SamplingParams
from replica.scheduler import TooLarge, check_fits
from replica.service import EngineService
from replica.step_model import STEP_RECORD_FIELDS

log = logging.getLogger("kvfleet.replica")
access_log = logging.getLogger("kvfleet.replica.access")
# The access log's status of a request whose client went away before its answer ended (nginx's
# 499 "client closed request"; no response carries it).
CLIENT_CLOSED = 499
SERVICE = web.AppKey("service", EngineService)
VERSION = "0.1.0"


def _error(err: APIError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return _error(e)
    except web.HTTPRequestEntityTooLarge as e:
        return web.json_response(error_body(413, f"request body too large: {e.text}; send a smaller body"), status=413)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return web.json_response(error_body(e.status, e.reason or "error"), status=e.status)
        raise
    except web.RequestPayloadError as e:  # a body that cannot be read: bad gzip, broken chunking
        return web.json_response(error_body(400, f"the request body could not be read: {e}"), status=400)


async def _read_json(request: web.Request) -> Any:
    return decode_json_body(await request.read())


class _Handlers:
    def __init__(self, service: EngineService, model_name: str, sender=None, receiver=None) -> None:
        self.service = service
        # The KV hand-over's two sides (replica/kv_transfer.py; None where the role has none).
        self.sender = sender
        self.receiver = receiver
        self.model_name = model_name
        self.max_model_len = service.engine.scheduler.config.max_model_len
        self.tokenizer = service.engine.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.loras = service.engine.loras  # the LoRA adapters served, each under its own name (or None)

    # ------------------------------------------------------------- helpers
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name and (self.loras is None or model not in self.loras):
            served = [self.model_name, *(self.loras.modules if self.loras is not None else ())]
            raise APIError(404, f"The model `{model}` does not exist. This server serves "
                                f"{', '.join(f'`{m}`' for m in served)} (`GET /v1/models` lists them).", "model")

    def _lora_name(self, req: GenerationRequest) -> str | None:
        """The adapter a request runs with: its `model` when that names one (vLLM's way)."""
        return req.model if req.model is not None and req.model != self.model_name else None

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.kind == "chat":
            try:
                text = apply_chat_template(list(req.messages))
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            return self.tokenizer.encode(text)
        if req.prompt_token_ids is not None:
            bad = [t for t in req.prompt_token_ids if t >= self.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of the vocabulary (size {self.vocab_size})", "prompt")
            return list(req.prompt_token_ids)
        return self.tokenizer.encode(req.prompt)

    def _params(self, req: GenerationRequest, num_prompt: int) -> SamplingParams:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt has {num_prompt} "
                f"tokens; shorten the prompt.",
                "prompt" if req.kind == "completion" else "messages",
            )
        try:
            check_fits(self.service.engine.kv, num_prompt)
        except TooLarge as e:  # code: a balancer sends it to a replica with more KV memory (balancer/proxy.py)
            raise APIError(400, str(e), "prompt" if req.kind == "completion" else "messages",
                           code=KV_CAPACITY_EXCEEDED) from None
        max_tokens = req.max_tokens if req.max_tokens is not None else limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the completion); "
                f"reduce the prompt or max_tokens.",
                "max_tokens",
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # ------------------------------------------------------------- generation
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion(await _read_json(request)))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat(await _read_json(request)))

    async def _generate(self, request: web.Request, req: GenerationRequest) -> web.StreamResponse:
        start = time.perf_counter()
        self._check_model(req.model)
        if self.service.draining:
            raise APIError(503, "this replica is draining (shutting down); send the request to another replica")
        if not self.service.healthy:
            raise APIError(503, "the engine is not running; check the replica's log")
        if req.logprobs is not None and not getattr(self.service.engine.executor, "has_logits", True):
            raise APIError(400, "this replica runs the simulated executor, which has no logits: logprobs need a "
                                "torch replica", "logprobs")
        prompts = [self._prompt_ids(req)] + [self._prompt_ids(dataclasses.replace(
            req, prompt=p if isinstance(p, str) else None, prompt_token_ids=p if isinstance(p, tuple) else None))
            for p in req.more_prompts]
        params = [self._params(req, len(ids)) for ids in prompts]
        if req.logprobs is not None:
            params = [dataclasses.replace(p, logprobs=req.logprobs) for p in params]
        lora = self._lora_name(req)
        if lora is not None:
            params = [dataclasses.replace(p, lora_name=lora) for p in params]
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        base = request.headers.get("X-Request-Id") or f"{prefix}-{uuid.uuid4().hex}"
        rid = self.service.unique_id(base)
        headers = {"X-Request-Id": base}
        choices = fan_out(prompts, params, req.n)
        before_add, handover = await self._handover(req, rid, prompts, lora, len(choices))
        outputs = merged(self.service, rid, choices, before_add)
        seen = _Seen(start, sum(len(ids) for ids in prompts))
        echo = [self.tokenizer.decode(ids) for ids in prompts] if req.echo else None
        try:
            if req.stream:
                return await self._stream(request, req, rid, outputs, headers, seen, len(choices), echo)
            return await self._complete(req, rid, outputs, headers, seen, len(choices), echo, handover)
        except asyncio.CancelledError:
            if request.transport is None or request.transport.is_closing():  # not a shutdown: the client left
                _client_left(rid, seen)
            raise
        finally:
            if access_log.isEnabledFor(logging.INFO):
                _log_access(base, req, seen)

    async def _handover(self, req: GenerationRequest, rid: str, prompts: list[list[int]], lora: str | None,
                        num_choices: int):
        """The KV hand-over's part in a request with `kv_transfer_params` (vLLM's field):
        (before_add for the engine, the prefill's response params or None). A decode request
        pulls its prompt's blocks here; a prefill request keeps its blocks for the pull. A role
        without the side asked for serves the request as an ordinary one (as vLLM without a KV
        connector: no `kv_transfer_params` in the answer)."""
        params = req.kv_transfer_params
        if not params or num_choices != 1:
            return None, None
        if params.get("do_remote_prefill") and self.receiver is not None:
            tag = self.service.engine.lora_tags.get(lora) if lora is not None else None
            return await self.receiver.prepare(params, prompts[0], tag), None
        if params.get("do_remote_decode") and self.sender is not None and not req.stream:
            sender, n = self.sender, len(prompts[0])
            return sender.keep(rid), lambda: sender.park(rid, n)
        return None, None

    def _usage(self, finals: dict[int, RequestOutput], n: int) -> dict[str, Any]:
        """vLLM's accounting: each prompt once (its first sample's prompt and cached tokens),
        the outputs of every sample."""
        firsts = [o for i, o in finals.items() if i % n == 0]
        prompt = sum(o.num_prompt_tokens for o in firsts)
        completion = sum(o.num_output_tokens for o in finals.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(max(o.num_cached_tokens, 0) for o in firsts)},
        }

    async def _complete(self, req, rid, outputs: AsyncIterator[tuple[int, RequestOutput]], headers, seen: "_Seen",
                        num_choices: int, echo: list[str] | None, handover=None) -> web.Response:
        text: dict[int, list[str]] = {i: [] for i in range(num_choices)}
        token_ids: dict[int, list[int]] = {i: [] for i in range(num_choices)}
        outs: dict[int, list[RequestOutput]] = {i: [] for i in range(num_choices)}
        finals: dict[int, RequestOutput] = {}
        async for index, out in outputs:
            text[index].append(out.text)
            token_ids[index].extend(out.new_token_ids)
            if req.logprobs is not None:
                outs[index].append(out)
            finals[index] = seen.last = out
        chat = req.kind == "chat"
        shaper = Logprobs(self.tokenizer, chat)
        choices = []
        for index in range(num_choices):
            last = finals.get(index)
            body_text = "".join(text[index])
            if echo is not None:
                body_text = echo[index // req.n] + body_text
            finish = last.finish_reason if last else "abort"
            logprobs = shaper.of(index, outs[index]) if req.logprobs is not None else None
            if chat:
                choice = {"index": index, "message": {"role": "assistant", "content": body_text},
                          "logprobs": logprobs, "finish_reason": finish, "stop_reason": last.stop_reason if last else None}
            else:
                choice = {"index": index, "text": body_text, "logprobs": logprobs, "finish_reason": finish,
                          "stop_reason": last.stop_reason if last else None}
            if req.return_token_ids:
                choice["token_ids"] = token_ids[index]
            choices.append(choice)
        usage = self._usage(finals, req.n)
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self._lora_name(req) or self.model_name, "choices": choices, "usage": usage}
        if handover is not None:  # a prefill for a decode replica: where to pull its KV from
            body["kv_transfer_params"] = handover()
        return web.json_response(body, headers={**headers, USAGE_HEADER: usage_header(usage)})

    async def _stream(self, request, req, rid, outputs: AsyncIterator[tuple[int, RequestOutput]], headers,
                      seen: "_Seen", num_choices: int, echo: list[str] | None) -> web.StreamResponse:
        """The SSE answer. A client that goes away mid-stream (a write to its closed connection
        fails) is a client abort, not an error: the request is aborted in the engine (its KV
        blocks freed, its batch slot released) and one INFO line says so."""
        resp = web.StreamResponse(
            status=200, headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await self._write_stream(request, resp, req, rid, outputs, seen, num_choices, echo)
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError: the client closed the connection
            await outputs.aclose()  # aborts the request in the engine
            _client_left(rid, seen)
        except asyncio.CancelledError:
            await outputs.aclose()
            raise
        return resp  # aiohttp's write_eof on a closed connection is a quiet no-op

    async def _write_stream(self, request, resp: web.StreamResponse, req, rid,
                            outputs: AsyncIterator[tuple[int, RequestOutput]], seen: "_Seen", num_choices: int,
                            echo: list[str] | None) -> None:
        await resp.prepare(request)
        created = int(time.time())
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self._lora_name(req) or self.model_name
        shaper = Logprobs(self.tokenizer, chat) if req.logprobs is not None else None

        def chunk(choice: dict | None, usage: dict | None = None) -> bytes:
            body = {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [choice] if choice is not None else []}
            if usage is not None:
                body["usage"] = usage
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        finals: dict[int, RequestOutput] = {}
        try:
            for index in range(num_choices):
                if chat:
                    await resp.write(chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}))
                elif echo is not None:  # the prompt first, as its own chunk
                    await resp.write(chunk({"index": index, "text": echo[index // req.n], "logprobs": None,
                                            "finish_reason": None}))
            async for index, out in outputs:
                finals[index] = seen.last = out
                if not out.text and not out.finished and not req.return_token_ids and shaper is None:
                    continue
                logprobs = shaper.of(index, [out]) if shaper is not None else None
                finish = out.finish_reason if out.finished else None
                if chat:
                    choice = {"index": index, "delta": {"content": out.text} if out.text else {},
                              "logprobs": logprobs, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish}
                if out.finished:
                    choice["stop_reason"] = out.stop_reason
                if req.return_token_ids:
                    choice["token_ids"] = list(out.new_token_ids)
                await resp.write(chunk(choice))
            if req.include_usage:
                await resp.write(chunk(None, self._usage(finals, req.n)))
            await resp.write(b"data: [DONE]\n\n")
        except RuntimeError as e:  # the engine failed mid-stream: say so in-band, then end
            seen.status = 500
            err = error_body(500, f"the engine failed while generating: {e}")
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        await resp.write_eof()

    # ------------------------------------------------------------- other routes
    async def models(self, request: web.Request) -> web.Response:
        """The base model, then each LoRA adapter with `root` = its file and `parent` = the base
        model (vLLM's listing for `--lora-modules`)."""
        m, now = self.model_name, int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "kvfleet", "root": m,
                 "parent": None, "max_model_len": self.max_model_len}]
        for mod in (self.loras.modules.values() if self.loras is not None else ()):
            data.append({"id": mod.name, "object": "model", "created": now, "owned_by": "kvfleet", "root": mod.path,
                         "parent": m, "max_model_len": self.max_model_len})
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if self.service.draining:
            return web.json_response(error_body(503, "draining"), status=503)
        if not self.service.healthy:
            return web.json_response(error_body(503, "engine not running"), status=503)
        return web.Response(status=200)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self._check_model(body.get("model"))
        if "messages" in body:
            req = parse_chat({**body, "max_tokens": None, "stream": False})
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (or send 'messages')", "prompt")
            req = GenerationRequest(kind="completion", model=None, prompt=prompt)
        tokens = self._prompt_ids(req) if (req.prompt or req.messages) else []
        return web.json_response({"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in tokens):
            raise APIError(400, "'tokens' must be a list of token ids within the vocabulary", "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    async def load(self, request: web.Request) -> web.Response:
        body = dataclasses.asdict(self.service.load())
        body["draining"] = self.service.draining
        return web.json_response(body)

    async def step_log(self, request: web.Request) -> web.Response:
        """The logged steps with seq >= `since` (default 0), as `StepRecord.to_wire` arrays, and
        `next_seq`, the seq the next step will have."""
        log = self.service.engine.step_log
        if log is None:
            raise APIError(404, "this replica keeps no step log; start it with --step-log N")
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise APIError(400, "since must be an integer step number", "since") from None
        if not self.service.healthy:
            raise APIError(503, "the engine is not running; check the replica's log")
        engine = self.service.engine
        seq, steps = await self.service.between_steps(
            lambda: (engine.num_steps, [r.to_wire() for r in log if r.seq >= since]))
        return web.json_response({"fields": STEP_RECORD_FIELDS, "next_seq": seq, "steps": steps})

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        pub = self.service.publisher
        return web.json_response(pub.sources_info() if pub is not None else {"sources": []})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        # vLLM serves the same route (POST /reset_prefix_cache) for benchmarks between runs.
        if not await self.service.reset_prefix_cache():
            raise APIError(400, "requests are running; reset the prefix cache when the replica is idle")
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})


@dataclass(slots=True)
class _Seen:
    """What the access log line says about one request; the handler fills it in as it goes."""

    start: float
    prompt_tokens: int
    last: RequestOutput | None = None
    status: int = 200


def _client_left(rid: str, seen: _Seen) -> None:
    """The one line for a client that closed its connection before its answer was out (seen as
    a cancelled handler, or a stream's failed write); its request is aborted already (its engine
    stream was closed)."""
    seen.status = CLIENT_CLOSED
    last = seen.last
    if last is not None and last.finished:
        log.info("request %s: the client closed the connection before the end of its answer was written", rid)
    else:
        log.info("request %s: the client closed the connection after %d output tokens; aborted it", rid,
                 last.num_output_tokens if last is not None else 0)


def _log_access(request_id: str, req: GenerationRequest, seen: _Seen) -> None:
    """One line per request (never per token), keyed by the X-Request-Id the balancer sent."""
    last = seen.last
    finish = last.finish_reason if last is not None and last.finished else "abort"
    cached = last.num_cached_tokens if last is not None else 0
    output = last.num_output_tokens if last is not None else 0
    e2e = time.perf_counter() - seen.start
    access_log.info(
        "%s %s prompt_tokens=%d cached_tokens=%d output_tokens=%d finish=%s e2e=%.4fs", req.kind,
        "stream" if req.stream else "unary", seen.prompt_tokens, cached, output, finish, e2e,
        extra={"fields": {"request_id": request_id, "kind": req.kind, "stream": req.stream, "status": seen.status,
               "prompt_tokens": seen.prompt_tokens, "cached_tokens": cached, "output_tokens": output,
               "finish_reason": finish, "e2e_s": round(e2e, 6)}})


def create_app(service: EngineService, cfg: ServerConfig, model_name: str, sender=None,
               receiver=None) -> web.Application:
    """The replica's routes over `service`, which the app starts and stops (`cleanup_ctx`);
    clients name the model `model_name`. `sender` / `receiver`: the KV hand-over's prefill and
    decode sides (replica/kv_transfer.py), started and stopped with the app too."""
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[_errors, *auth.middlewares(cfg.api_keys)])
    app[SERVICE] = service
    h = _Handlers(service, model_name, sender, receiver)
    kv_state.add_routes(app, service)
    kv_transfer.add_routes(app, sender)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_post("/tokenize", h.tokenize)
    app.router.add_post("/detokenize", h.detokenize)
    app.router.add_get("/load", h.load)
    app.router.add_get("/kv_event_sources", h.kv_event_sources)
    app.router.add_get("/step_log", h.step_log)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/version", h.version)
    app.router.add_post("/reset_prefix_cache", h.reset_prefix_cache)

    async def lifecycle(app: web.Application):
        await service.start()
        if sender is not None:
            await sender.start()
        yield
        if sender is not None:
            await sender.stop()
        if receiver is not None:
            receiver.close()
        await service.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(app: web.Application, cfg: ServerConfig,
                ready: Callable[[list[str]], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (None: until SIGTERM/SIGINT), then drain: refuse new work, let
    in-flight requests finish (up to `drain_timeout_s`). `ready(urls)` runs once listening."""
    service = app[SERVICE]
    # handler_cancellation: a client that closes its connection cancels its handler, which
    # aborts its request in the engine at once, before its first token or in the middle of a
    # non-streamed answer (vLLM's API server does the same: `with_cancellation`,
    # vllm/entrypoints/utils.py). A stream's client that leaves is also seen by the failed write.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.drain_timeout_s, handler_cancellation=True)
    await runner.setup()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if stop is None else ()
    stop = stop or asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        if ready is not None:
            ready([f"http://{a[0]}:{a[1]}" for a in runner.addresses])
        await stop.wait()
        service.draining = True
        deadline = loop.time() + cfg.drain_timeout_s
        while service.num_inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
