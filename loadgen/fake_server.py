"""An OpenAI-shaped streaming server with a known delay profile, for testing and benchmarking the
load generator (not a model: it streams placeholder tokens).

    POST /v1/completions, /v1/chat/completions   (stream or not)
        the first token comes `ttft_ms` after the request arrived, token k at
        ttft_ms + k * itl_ms (absolute deadlines, so timer jitter never accumulates);
        `max_tokens` tokens (default 16); usage (with stream_options.include_usage) reports
        prompt_tokens and cached_tokens from a simulated prefix cache of 16-token blocks
        (prompts given as token ids; text prompts count bytes and never hit)
    GET /health, /v1/models

With `--fail-every N` every N-th request gets a 500, with `--error-in-stream-every N` every N-th
stream sends one token and then an in-band error event (tests of error accounting). Prints
`listening on http://HOST:PORT` once ready.

    python -m loadgen.fake_server --port 0 --ttft-ms 50 --itl-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass

from aiohttp import web

_BLOCK = 16


@dataclass(frozen=True)
class FakeServerConfig:
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    default_tokens: int = 16
    replica_name: str | None = None  # sent as X-Kvfleet-Replica when set
    fail_every: int = 0
    error_in_stream_every: int = 0  # every N-th stream sends one token, then an in-band error event
    model: str = "tiny"

    def __post_init__(self) -> None:
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError("ttft_ms and itl_ms must not be negative")
        if min(self.default_tokens, self.fail_every, self.error_in_stream_every) < 0:
            raise ValueError("default_tokens, fail_every and error_in_stream_every must not be negative")


class FakeServer:
    def __init__(self, cfg: FakeServerConfig) -> None:
        self.cfg = cfg
        self.blocks: set[tuple[int, ...]] = set()  # simulated prefix cache (never evicts)
        self.count = 0

    def _cached(self, prompt) -> tuple[int, int]:
        if not isinstance(prompt, list):
            return len(str(prompt).encode()), 0
        hit, prefix_ok = 0, True
        for i in range(len(prompt) // _BLOCK):
            key = tuple(prompt[: (i + 1) * _BLOCK])
            if prefix_ok and key in self.blocks:
                hit += _BLOCK
            else:
                prefix_ok = False
                self.blocks.add(key)
        return len(prompt), hit

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        body = await request.json()
        self.count += 1
        headers = {"X-Kvfleet-Replica": self.cfg.replica_name} if self.cfg.replica_name else {}
        if self.cfg.fail_every and self.count % self.cfg.fail_every == 0:
            return web.json_response({"error": {"message": "injected failure", "type": "InternalServerError",
                                                "param": None, "code": 500}}, status=500, headers=headers)
        chat = request.path.endswith("/chat/completions")
        prompt = body.get("messages") if chat else body.get("prompt", "")
        n_prompt, cached = self._cached(prompt if not chat else json.dumps(prompt))
        n = int(body.get("max_tokens") or self.cfg.default_tokens)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        if not body.get("stream"):
            await asyncio.sleep(max(0.0, (self.cfg.ttft_ms + max(0, n - 1) * self.cfg.itl_ms) / 1000))
            choice = ({"index": 0, "message": {"role": "assistant", "content": " tok" * n}} if chat
                      else {"index": 0, "text": " tok" * n})
            return web.json_response({"id": "cmpl-fake", "object": "text_completion", "model": self.cfg.model,
                                      "choices": [{**choice, "finish_reason": "length"}], "usage": usage},
                                     headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        broken = self.cfg.error_in_stream_every and self.count % self.cfg.error_in_stream_every == 0
        for k in range(n):
            if broken and k == 1:
                await resp.write(b'data: {"error": {"message": "injected engine failure", "code": 500}}\n\n')
                await resp.write_eof()
                return resp
            delay = arrived + (self.cfg.ttft_ms + k * self.cfg.itl_ms) / 1000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            choice = {"index": 0, "delta": {"content": " tok"}} if chat else {"index": 0, "text": " tok"}
            choice["finish_reason"] = "length" if k == n - 1 else None
            await resp.write(b"data: " + json.dumps({"id": "cmpl-fake", "object": obj, "model": self.cfg.model,
                                                     "choices": [choice]}).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + json.dumps({"id": "cmpl-fake", "object": obj, "model": self.cfg.model,
                                                     "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.cfg.model, "object": "model"}]})


def create_app(cfg: FakeServerConfig) -> web.Application:
    srv = FakeServer(cfg)
    app = web.Application()
    app.router.add_post("/v1/completions", srv.completions)
    app.router.add_post("/v1/chat/completions", srv.completions)
    app.router.add_get("/health", srv.health)
    app.router.add_get("/v1/models", srv.models)
    return app


async def serve(cfg: FakeServerConfig, host: str, port: int) -> None:
    runner = web.AppRunner(create_app(cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    h, p = runner.addresses[0][:2]
    print(f"fake server listening on http://{h}:{p}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per response when the body has no max_tokens")
    ap.add_argument("--replica-name", default=None)
    ap.add_argument("--fail-every", type=int, default=0, help="every N-th request gets HTTP 500")
    ap.add_argument("--error-in-stream-every", type=int, default=0, help="every N-th stream ends in an error event")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (default: asyncio's own loop)")
    args = ap.parse_args(argv)
    cfg = FakeServerConfig(args.ttft_ms, args.itl_ms, args.tokens, args.replica_name, args.fail_every,
                           args.error_in_stream_every)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(cfg, args.host, args.port))
    else:
        asyncio.run(serve(cfg, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
