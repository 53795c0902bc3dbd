"""Start a tiny replica, stream one completion from it over HTTP, and shut it down.

Needs nothing but this package: the tiny model is built from a seed.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

from kvfleet import procs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="The quick brown fox", help="prompt to complete")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")


def run(args: argparse.Namespace) -> int:
    print("starting a tiny replica ...", flush=True)
    proc = procs.start(["replica", "--port", "0", "--model", "tiny", "--num-blocks", "256", "--threads", "2"])
    try:
        body = json.dumps({"model": "tiny", "prompt": args.prompt, "max_tokens": args.max_tokens,
                           "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(f"{proc.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first = None
        print(f"\nprompt: {args.prompt!r}\ncompletion (greedy, tiny random-weight model): ", end="", flush=True)
        usage = None
        with urllib.request.urlopen(req, timeout=120) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if first is None:
                        first = time.perf_counter()
                    print(repr(choice["text"])[1:-1], end="", flush=True)
        total = time.perf_counter() - start
        print(f"\n\nTTFT {1000 * ((first or start) - start):.1f} ms, total {1000 * total:.1f} ms, usage {usage}")
    finally:
        proc.stop()
    return 0
