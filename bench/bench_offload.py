"""TTFT of a prompt whose prefix is in the device KV pool, in the host-memory offload tier, or
nowhere (recomputed), at 2k and 8k tokens (issue #19 part 1).

1. The torch engine on the CPU (tiny preset, context raised to 16k so an 8k prompt fits; seeded
   weights). Per prompt length L: a prompt of L tokens whose first L - 16 tokens are a prefix
   seen before, then
   - device:    the prefix still in the KV pool;
   - host:      the prefix pushed out of the pool by other prompts, so it is in the host tier
                (--kv-offload-host-blocks) and is loaded back;
   - recompute: prefix caching off, every token computed.
   TTFT = add_request to the first token out of `engine.step()` (no HTTP), best of `--repeat`.
   Also the host tier's copy rate (bytes loaded / seconds the copies took): the figure the
   tiny-cpu sim preset uses (replica/step_model.TINY_CPU_COPY_BYTES_PER_S).
2. The same three cases on the sim engine with the llama3-8b-h100 preset: modelled TTFT (the sum
   of the modelled step times up to the first token), loads priced at the preset's PCIe figure.

    OMP_WAIT_POLICY=PASSIVE taskset -c 1 .venv/bin/python bench/bench_offload.py [--lengths 2048,8192]
        [--repeat 3] [--threads 1] [--out results/bench_offload.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import report  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine import LLMEngine, build_engine, build_sim_engine  # noqa: E402
from replica.model_config import ModelConfig  # noqa: E402
from replica.request import SamplingParams  # noqa: E402
from replica.step_model import get_preset  # noqa: E402

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
SUFFIX = 16  # tokens after the shared prefix: one block computed in every case
CASES = ("device", "host", "recompute")


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def _finish(engine: LLMEngine, rid: str, prompt: list[int]) -> None:
    engine.add_request(rid, prompt, ONE)
    while engine.has_unfinished():
        engine.step()


def _first_token(engine: LLMEngine, prompt: list[int]) -> tuple[float, float, int]:
    """(wall seconds, modelled seconds (sim) or 0, cached tokens) to the first token."""
    engine.add_request("measured", prompt, ONE)
    modelled = 0.0
    start = time.perf_counter()
    while True:
        outs = engine.step()
        modelled += getattr(engine.executor, "last_duration", 0.0)
        if outs:
            wall = time.perf_counter() - start
            while engine.has_unfinished():
                engine.step()
            return wall, modelled, outs[0].num_cached_tokens


def _prepare(engine: LLMEngine, case: str, length: int, seed: int) -> list[int]:
    """Leave the engine with the prompt's prefix where `case` says; return the prompt."""
    rng = random.Random(seed)
    prefix = _tokens(rng, length - SUFFIX)
    if case != "recompute":
        _finish(engine, "warm", prefix + _tokens(rng, SUFFIX))
    if case == "host":  # three prompts as long push every block of the prefix out of the pool
        for i in range(3):
            _finish(engine, f"filler{i}", _tokens(rng, length))
    return prefix + _tokens(rng, SUFFIX)


def _engine_config(case: str, length: int, threads: int, model_config_path: str | None) -> EngineConfig:
    blocks = -(-(length + 1) // 16)
    return EngineConfig(model="tiny", model_config_path=model_config_path, threads=threads,
                        num_blocks=2 * blocks + 8,  # room for two prompts: a third evicts the first
                        max_num_batched_tokens=2048, max_model_len=16_384,
                        enable_prefix_caching=case != "recompute",
                        host_kv_blocks=4 * blocks if case == "host" else 0)


def torch_part(lengths: list[int], repeat: int, threads: int) -> tuple[list[list], float]:
    cfg = ModelConfig.from_preset("tiny", max_position_embeddings=16_384)
    rows, loaded_bytes, load_s = [], 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg.to_hf_dict(), f)
        for length in lengths:
            best: dict[str, float] = {}
            cached: dict[str, int] = {}
            for r in range(repeat):
                for case in CASES:
                    engine = build_engine(_engine_config(case, length, threads, path))
                    prompt = _prepare(engine, case, length, seed=r)
                    wall, _, cached[case] = _first_token(engine, prompt)
                    best[case] = min(best.get(case, wall), wall)
                    if case == "host":
                        totals = engine.kv.offload.totals
                        loaded_bytes += totals.bytes.get("CPU_to_GPU", 0)
                        load_s += totals.seconds.get("CPU_to_GPU", 0.0)
            rows.append([length, *(round(best[c] * 1000, 1) for c in CASES),
                         *(cached[c] for c in CASES), round(best["recompute"] / best["host"], 1)])
    return rows, (loaded_bytes / load_s / 1e9 if load_s else 0.0)


def sim_part(lengths: list[int]) -> list[list]:
    preset = get_preset("llama3-8b-h100")
    rows = []
    for length in lengths:
        modelled = {}
        for case in CASES:
            cfg = _engine_config(case, length, 1, None)
            engine = build_sim_engine(EngineConfig(model="sim", num_blocks=cfg.num_blocks,
                                                   max_num_batched_tokens=preset.max_num_batched_tokens,
                                                   enable_prefix_caching=cfg.enable_prefix_caching,
                                                   host_kv_blocks=cfg.host_kv_blocks), preset, time_scale=1e9)
            prompt = _prepare(engine, case, length, seed=0)
            modelled[case] = _first_token(engine, prompt)[1]
        rows.append([length, *(round(modelled[c] * 1000, 2) for c in CASES),
                     round(modelled["recompute"] / modelled["host"], 1)])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=None, help="also write the tables as JSON here")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, gbps = torch_part(lengths, args.repeat, args.threads)
    report(f"TTFT, torch engine on the CPU (tiny preset, {args.threads} thread(s), best of {args.repeat}); "
           f"host tier copy rate {gbps:.2f} GB/s",
           ["prompt tokens", "device ms", "host ms", "recompute ms", "device cached", "host cached",
            "recompute cached", "recompute / host"], rows, args.out, {"host_copy_gb_per_s": gbps})
    report("Modelled TTFT, sim engine, llama3-8b-h100 preset (host loads at the preset's PCIe figure)",
           ["prompt tokens", "device ms", "host ms", "recompute ms", "recompute / host"], sim_part(lengths),
           args.out.replace(".json", "_sim.json") if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
