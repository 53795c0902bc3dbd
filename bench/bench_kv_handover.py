"""The live KV hand-over of prefill/decode disaggregation (replica/kv_transfer.py) on real replica
processes: for each prompt length, the time to first token of one replica computing the prompt
alone, against the two legs of a pair (the prefill replica's prompt + one token, then the decode
replica's pull of the full blocks over ZMQ, their install and its first token), with the bytes
moved, the transfer time and rate as the decode replica measured them (`vllm:nixl_*`). Each cell
is the median over --repeats distinct prompts (nothing cached before).

    .venv/bin/python bench/bench_kv_handover.py [--lengths 256,1024,2048] [--repeats 3] [--model tiny]
        [--out results/kv_handover.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from harness import procs  # noqa: E402
from harness.fleet import http  # noqa: E402


def _metric(url: str, name: str) -> float:
    text = http("GET", url + "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _post(url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    status, _, raw = http("POST", url + "/v1/completions", body, timeout=300)
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"{url} answered {status}: {raw[:300]!r}")
    return elapsed, json.loads(raw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024,2048", help="prompt lengths in tokens (byte tokenizer)")
    ap.add_argument("--repeats", type=int, default=3, help="distinct prompts per length (the median is shown)")
    ap.add_argument("--model", default="tiny", help="model preset of all three replicas")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    common = ["replica", "--port", "0", "--model", args.model, "--threads", str(args.threads), "--num-blocks", "1024",
              "--max-model-len", str(max(lengths) + 64)]
    started = []
    try:
        for role in ("both", "prefill", "decode"):
            started.append(procs.start(common + ["--role", role]))
        single, prefill, decode = (p.url for p in started)
        rows = []
        for n in lengths:
            cells = {"single": [], "prefill": [], "decode": [], "xfer": [], "bytes": []}
            for i in range(args.repeats):
                prompt = (f"[{n}/{i}] " + "kv hand-over benchmark text. " * (n // 20 + 1))[: n - 1]
                body = {"model": args.model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                cells["single"].append(_post(single, body)[0])
                t_pre, pre = _post(prefill, {**body, "kv_transfer_params": {"do_remote_decode": True}})
                before = (_metric(decode, "vllm:nixl_xfer_time_seconds_sum"),
                          _metric(decode, "vllm:nixl_bytes_transferred_sum"))
                t_dec, _ = _post(decode, {**body, "kv_transfer_params": pre["kv_transfer_params"]})
                cells["prefill"].append(t_pre)
                cells["decode"].append(t_dec)
                cells["xfer"].append(_metric(decode, "vllm:nixl_xfer_time_seconds_sum") - before[0])
                cells["bytes"].append(_metric(decode, "vllm:nixl_bytes_transferred_sum") - before[1])
            med = {k: statistics.median(v) for k, v in cells.items()}
            rate = med["bytes"] / med["xfer"] / 1e6 if med["xfer"] > 0 else 0.0
            rows.append([n, round(med["single"] * 1e3, 1), round(med["prefill"] * 1e3, 1),
                         round(med["decode"] * 1e3, 1), round((med["prefill"] + med["decode"]) * 1e3, 1),
                         round(med["bytes"] / 2**20, 2), round(med["xfer"] * 1e3, 2), round(rate, 1)])
        report(f"KV hand-over, live replicas ({args.model}, CPU, {args.threads} torch thread each)",
               ["prompt tokens", "single TTFT ms", "prefill leg ms", "decode leg ms", "pair TTFT ms",
                "KV MiB moved", "transfer ms", "MB/s"], rows, args.out)
    finally:
        for p in started:
            p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
