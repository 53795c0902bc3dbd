"""A vLLM-shaped test server that answers every request with what it received.

    python -m harness.echo_server --model NAME [--port 0]

It serves `/health`, `/v1/models` (one model, NAME) and `/version` as a vLLM server does, and
answers any other request (any method, any path) with the exact request it got: method, target
(path and query, undecoded), headers and the body's bytes (base64), in an OpenAI-shaped body so
that the openai client parses it — a completion (`choices[0].text`), a chat completion
(`choices[0].message.content`), or with `"stream": true` server-sent chunks and `[DONE]` (on
`/v1/responses`: two typed events, `response.output_text.delta` and `response.completed`). The echo
itself is the top-level `echo` field (and in the first stream chunk). A body holding
`"echo_status": N` (N >= 400) is refused with status N and an OpenAI error whose message is the
body's `echo_message`: a refusal by the upstream that the balancer must relay unchanged. A
unary completion asking `kv_transfer_params: {"do_remote_decode": true}` is answered as a vLLM
prefill server with NixlConnector answers (`kv_transfer_params` with `do_remote_prefill`, and the
prefill request's echo inside them): the prefill/decode tests of the balancer's two legs.

The pass-through tests (tests/test_passthrough.py) put the real balancer in front of several of
these and compare what arrived with what the client sent, byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

from aiohttp import web


def _echo(request: web.Request, raw: bytes, model: str) -> dict:
    return {"method": request.method, "target": request.raw_path, "served_by": model,
            "headers": {k: v for k, v in request.headers.items()},
            "body_b64": base64.b64encode(raw).decode()}


def _completion_shape(path: str, model: str, echo: dict, chunk: bool) -> dict:
    text = json.dumps(echo)
    if path == "/v1/chat/completions":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        choice = ({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None} if chunk
                  else {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
    else:
        obj = "text_completion"
        choice = {"index": 0, "text": text, "finish_reason": None if chunk else "stop", "logprobs": None}
    return {"id": "echo-1", "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "echo": echo}


def make_app(model: str) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "echo", "root": model}]})

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": f"echo-{model}"})

    async def anything(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        echo = _echo(request, raw, model)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("echo_status"), int) and body["echo_status"] >= 400:
            status = body["echo_status"]
            return web.json_response({"error": {"message": str(body.get("echo_message", "refused")),
                                                "type": "BadRequestError", "param": None, "code": status}},
                                     status=status)
        if isinstance(body, dict) and body.get("stream") is True:
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await out.prepare(request)
            if request.path == "/v1/responses":  # the Responses API's typed events, no [DONE]
                for name, data in (("response.output_text.delta", {"delta": "hi", "echo": echo}),
                                   ("response.completed", {"response": {"status": "completed"}})):
                    await out.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                await out.write_eof()
                return out
            first = _completion_shape(request.path, model, echo, chunk=True)
            await out.write(b"data: " + json.dumps(first).encode() + b"\n\n")
            last = _completion_shape(request.path, model, {}, chunk=True)
            choice = last["choices"][0]
            choice.update(finish_reason="stop", **({"delta": {}} if "delta" in choice else {"text": ""}))
            await asyncio.sleep(0.01)
            await out.write(b"data: " + json.dumps(last).encode() + b"\n\n")
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        if request.path in ("/v1/completions", "/v1/chat/completions"):
            out = _completion_shape(request.path, model, echo, chunk=False)
            params = body.get("kv_transfer_params") if isinstance(body, dict) else None
            if isinstance(params, dict) and params.get("do_remote_decode"):
                # A vLLM prefill server with NixlConnector answers with where its KV waits
                # (NixlConnector.request_finished's keys); `echo` carries the prefill request on.
                host, port = request.transport.get_extra_info("sockname")[:2]
                out["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                             "remote_engine_id": f"echo-{port}", "remote_block_ids": [0, 1],
                                             "remote_host": host, "remote_port": port, "echo": echo}
            return web.json_response(out)
        return web.json_response({"object": "echo", "echo": echo})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/version", version)
    app.router.add_route("*", "/{path:.*}", anything)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.echo_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the one model its /v1/models lists")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (the ready line says which)")
    args = p.parse_args(argv)

    async def serve() -> None:
        runner = web.AppRunner(make_app(args.model), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"echo server for {args.model} listening on http://{host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
