"""A minimal OpenAI-shaped backend that answers at once, for measuring a proxy's own overhead.

A raw asyncio protocol (on uvloop when installed) with a tiny HTTP/1.1 parser, so that it costs
a few microseconds per request and is never the bottleneck of the measurement:

    POST /v1/completions, /v1/chat/completions, /generate
        non-streaming: a small completion JSON (Content-Length, keep-alive), its usage in an
            X-Kvfleet-Usage header too as kvfleet replicas send it (not with --no-usage-header)
        "stream": true: N SSE events `data: {...}\\n\\n` then `data: [DONE]\\n\\n`, chunked
        transfer encoding, one write per event; N = the body's max_tokens (default --chunks)
    GET /health, /health_generate   200
    GET /v1/models                  {"data": [{"id": MODEL}]}
    GET /load                       an idle replica's load (what kvfleet's balancer polls)
    GET /get_server_info, /get_model_info   small JSON (what some routers ask a worker)

Not a general HTTP server: chunked request bodies without trailers only, no Expect: 100-continue. Requests on one
connection are answered in order (a pipelined request waits for the stream before it).

    .venv/bin/python bench/fake_backend.py --port 0        # prints "listening on http://..."
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

_CRLF2 = b"\r\n\r\n"
_MAX_HEADER = 64 * 1024


def _response(status: str, body: bytes, ctype: bytes = b"application/json", extra: bytes = b"") -> bytes:
    """extra: one more header line (without its CRLF)."""
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + (extra + b"\r\n" if extra else b"") + b"\r\n" + body)


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 §7.1)."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _dechunk(buf: bytearray, at: int) -> tuple[bytes, int] | None:
    """A chunked body (RFC 9112 §7.1, no trailers) starting at `at`: (body, end offset), or None
    while incomplete."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buf[at:eol]).split(b";", 1)[0], 16)
        if size == 0:
            return (bytes(body), eol + 4) if len(buf) >= eol + 4 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2 : eol + 2 + size]
        at = eol + 2 + size + 2


class Backend:
    """Pre-built responses shared by all connections."""

    def __init__(self, model: str, default_chunks: int, usage_header: bool = True) -> None:
        self.model = model
        self.default_chunks = default_chunks
        self.started = int(time.time())
        self.served = 0
        self.connections = 0
        self.health = _response("200 OK", b'{"status":"ok"}')
        self.models = _response("200 OK", json.dumps(
            {"object": "list",
             "data": [{"id": model, "object": "model", "owned_by": "bench", "max_model_len": 1 << 20}]}
        ).encode())
        self.load = _response("200 OK", json.dumps(
            {"num_running": 0, "num_waiting": 0, "queued_prefill_tokens": 0, "running_decode_tokens": 0,
             "free_blocks": 1000, "total_blocks": 1000, "kv_usage": 0.0}).encode())
        self.info = _response("200 OK", json.dumps(
            {"model_path": model, "tokenizer_path": model, "is_generation": True, "served_model_name": model,
             "max_total_num_tokens": 1 << 20}).encode())
        self.not_found = _response("404 Not Found", b'{"error":{"message":"not found","code":404}}')
        self.bad = _response("400 Bad Request", b'{"error":{"message":"bad request body","code":400}}')
        body = {"id": "cmpl-bench", "object": "text_completion", "created": self.started, "model": model,
                "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length",
                             "token_ids": [42]}],
                "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9,
                          "prompt_tokens_details": {"cached_tokens": 0}}}
        # The usage in a header too, as kvfleet replicas send it (protocol/openai_api.py USAGE_HEADER).
        usage = json.dumps(body["usage"], separators=(",", ":")).encode()
        self.completion = _response("200 OK", json.dumps(body, separators=(",", ":")).encode(),
                                    extra=b"X-Kvfleet-Usage: " + usage if usage_header else b"")
        self.stream_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n")
        # A typical vLLM completion chunk (~190 bytes), token_ids included (kvfleet asks for them).
        tok = {"id": "cmpl-bench", "object": "text_completion", "created": self.started, "model": model,
               "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": None, "stop_reason": None,
                            "token_ids": [1234]}]}
        self.event = _chunk(b"data: " + json.dumps(tok, separators=(",", ":")).encode() + b"\n\n")
        tok["choices"][0]["finish_reason"] = "length"
        self.last_event = _chunk(b"data: " + json.dumps(tok, separators=(",", ":")).encode() + b"\n\n")
        self.stream_tail = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Conn(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False
        self.closing = False
        self.can_write: asyncio.Event | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.b.connections += 1
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.can_write is not None:
            self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 64 * 1024 * 1024:
            self.transport.close()
            return
        if not self.streaming:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        while not self.streaming and not self.closing:
            end = buf.find(_CRLF2)
            if end < 0:
                if len(buf) > _MAX_HEADER:
                    self.transport.close()
                return
            head = bytes(buf[:end]).split(b"\r\n")
            try:
                method, path, _ = head[0].split(b" ", 2)
            except ValueError:
                self.transport.close()
                return
            length = 0
            close = chunked = False
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:  # what Envoy sends when an ext_proc filter streams the request body
                parsed = _dechunk(buf, end + 4)
                if parsed is None:
                    return
                body, stop = parsed
                del buf[:stop]
            else:
                if len(buf) < end + 4 + length:
                    return
                body = bytes(buf[end + 4 : end + 4 + length])
                del buf[: end + 4 + length]
            self.b.served += 1
            self._answer(method, path.split(b"?", 1)[0], body)
            if close:
                self.closing = True
                if not self.streaming:
                    self.transport.close()

    def _answer(self, method: bytes, path: bytes, body: bytes) -> None:
        b, w = self.b, self.transport.write
        if method == b"POST" and path in (b"/v1/completions", b"/v1/chat/completions", b"/generate"):
            if b'"stream"' not in body:  # the common case, without a JSON parse
                w(b.completion)
                return
            try:
                req = json.loads(body)
            except ValueError:
                w(b.bad)
                return
            if req.get("stream"):
                n = (req.get("max_tokens") or (req.get("sampling_params") or {}).get("max_new_tokens")
                     or b.default_chunks)
                self.streaming = True
                asyncio.get_running_loop().create_task(self._stream(int(n)))
            else:
                w(b.completion)
        elif method == b"GET" and path in (b"/health", b"/health_generate"):
            w(b.health)
        elif method == b"GET" and path == b"/v1/models":
            w(b.models)
        elif method == b"GET" and path == b"/load":
            w(b.load)
        elif method == b"GET" and path in (b"/get_server_info", b"/get_model_info", b"/server_info", b"/model_info"):
            w(b.info)
        else:
            w(b.not_found)

    async def _stream(self, n: int) -> None:
        """n events, one write each, yielding to the loop between them (as a server whose tokens
        come from elsewhere does), and honouring the transport's flow control."""
        b, t = self.b, self.transport
        t.write(b.stream_head)
        for i in range(n):
            if self.closing and t.is_closing():
                return
            if not self.can_write.is_set():
                await self.can_write.wait()
            t.write(b.event if i < n - 1 else b.last_event)
            await asyncio.sleep(0)
        t.write(b.stream_tail)
        self.streaming = False
        if self.closing:
            t.close()
        elif self.buf:
            self._process()


async def serve(host: str, port: int, model: str, chunks: int, usage_header: bool = True) -> None:
    loop = asyncio.get_running_loop()
    backend = Backend(model, chunks, usage_header)
    server = await loop.create_server(lambda: Conn(backend), host, port, backlog=4096, reuse_address=True)
    addr = server.sockets[0].getsockname()
    print(f"fake backend ready: model={model} listening on http://{addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(f"fake backend: served {backend.served} requests on {backend.connections} connections", file=sys.stderr,
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--chunks", type=int, default=16, help="SSE events per stream when the body has no max_tokens")
    ap.add_argument("--no-usage-header", action="store_true",
                    help="no X-Kvfleet-Usage header on non-streamed answers (as vLLM and SGLang: the usage is only "
                         "in the body)")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.model, args.chunks, not args.no_usage_header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
