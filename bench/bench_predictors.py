"""Output-length predictor costs: microseconds per predict and per observe, and memory.

1. Cost: each predictor (default config) is warmed with --warm requests, then times --calls
   predicts and observes of fresh requests one call at a time (perf_counter_ns; p50 and mean).
   Requests look like the balancer's: 16-token blocks, so a 1k-token prompt has 64 block hashes
   and an 8k-token one 512 (PrefixHistory then keys 8 and 11 depths); 50 shared system prompts of
   512 tokens, the rest of each prompt new, output lengths depending on the system prompt.
2. Memory at the bound: the predictor is filled until its tables are full (PrefixHistory: every
   one of its max_keys keys holding a full ring), then the bytes reachable from it are counted
   (sys.getsizeof over gc referents), beside its documented bound in items.

    .venv/bin/python bench/bench_predictors.py [--calls 5000] [--warm 20000] [--out results/bench_predictors.json]

Torch-free: it imports only predictors/ and bench/common.py.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from predictors.base import deep_size
from predictors import Features, make_predictor, predictor_names  # noqa: E402
from predictors.features import chain_ids  # noqa: E402

BLOCK = 16
SYSTEM_BLOCKS = 32  # 512-token system prompts


def requests(n: int, prompt_tokens: int, seed: int) -> list[tuple[Features, int]]:
    rng = random.Random(seed)
    blocks = prompt_tokens // BLOCK
    out = []
    for _ in range(n):
        g = rng.randrange(50)
        ids = [g * 1000 + b for b in range(SYSTEM_BLOCKS)]
        ids += [rng.getrandbits(60) for _ in range(blocks - SYSTEM_BLOCKS)]
        f = Features(prompt_tokens=prompt_tokens, block_hashes=chain_ids(ids), max_tokens=rng.choice([None, 1024]),
                     tenant=f"t{g % 4}", model="m")
        out.append((f, max(1, int(rng.lognormvariate(3 + g / 12, 0.5)))))
    return out


def timed(fn, items) -> list[float]:
    clock = time.perf_counter_ns
    out = []
    for args in items:
        t0 = clock()
        fn(*args)
        out.append((clock() - t0) / 1e3)
    return out


def fill(name: str) -> tuple[int, int, int]:
    """(bytes, items, bound) of a predictor whose tables are full."""
    p = make_predictor(name)
    inner = getattr(p, "inner", p)  # Calibrated wraps the learned ones
    keys = max((getattr(getattr(m, "config", None), "max_keys", 0) for m in (inner, *getattr(inner, "members", ()))),
               default=0)
    # distinct 64-block prompts keying 7 depths each (1..64 blocks), each seen 16 times (a full ring)
    prompts = max(1, keys // 7)  # no more keys than the table holds: a cyclic scan would evict every key
    rng = random.Random(0)
    chains = [chain_ids([rng.getrandbits(60) for _ in range(64)]) for _ in range(prompts)]
    reps = 16 if keys else 1
    for _ in range(reps):
        for bh in chains:
            p.observe(Features(1024, bh), rng.randrange(1, 1000))
    for _ in range(5000):  # fill the windows
        p.observe(Features(1024, chains[0]), rng.randrange(1, 1000))
    return deep_size(p), p.memory_items(), p.max_memory_items()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--warm", type=int, default=20000)
    ap.add_argument("--predictors", default=",".join(predictor_names()))
    ap.add_argument("--no-memory", action="store_true", help="skip the memory fill (the slow part)")
    ap.add_argument("--out", default="results/bench_predictors.json")
    args = ap.parse_args()
    names = [n.strip() for n in args.predictors.split(",") if n.strip()]

    rows, extra = [], {"cost": {}, "memory": {}}
    for tokens in (1024, 8192):
        warm = requests(args.warm, tokens, seed=1)
        fresh = requests(args.calls, tokens, seed=2)
        for name in names:
            p = make_predictor(name)
            for f, y in warm:
                p.observe(f, y)
            gc.collect()
            pred = timed(p.predict, [(f,) for f, _ in fresh])
            obs = timed(p.observe, fresh)
            r = {"predict_p50_us": statistics.median(pred), "predict_mean_us": statistics.fmean(pred),
                 "observe_p50_us": statistics.median(obs), "observe_mean_us": statistics.fmean(obs)}
            extra["cost"][f"{name}@{tokens}"] = r
            rows.append([name, tokens, tokens // BLOCK, r["predict_p50_us"], r["predict_mean_us"],
                         r["observe_p50_us"], r["observe_mean_us"]])
    cost_headers = ["predictor", "prompt tokens", "blocks", "predict p50", "predict mean", "observe p50",
                    "observe mean"]
    cost_title = "Output-length predictors: cost per call (µs), default configs, warm"
    if args.no_memory:
        report(cost_title, cost_headers, rows, out=args.out, extra=extra)
        return
    report(cost_title, cost_headers, rows)
    mem_rows = []
    for name in names:
        size, items, bound = fill(name)
        extra["memory"][name] = {"bytes": size, "items": items, "max_items": bound}
        mem_rows.append([name, items, bound, round(size / 2**20, 2)])
    report("Output-length predictors: memory with full tables", ["predictor", "items", "bound (items)", "MiB"],
           mem_rows, out=args.out, extra={**extra, "cost_title": cost_title, "cost_headers": cost_headers,
                                          "cost_rows": rows})
    print(f"\nwrote {args.out}")

if __name__ == "__main__":
    main()
