"""Engine benchmarks on this machine (issue: replica engine).

1. Output tokens/s of the kvfleet engine vs Hugging Face `transformers` `generate` on the same
   config and weights (tiny preset), batch 1, 16, 32: prompt 128 tokens, 128 new tokens, greedy.
2. TTFT of a 2,048-token prompt, cold vs fully cached.
3. KV memory wasted per running sequence (allocated slots minus tokens held), in blocks.

    .venv/bin/python bench/bench_engine.py [--threads 2] [--repeat 3] [--out results/bench_engine.json]

On a shared machine: OMP_WAIT_POLICY=PASSIVE taskset -c 1 .venv/bin/python bench/bench_engine.py --threads 1

Part 1 alternates the two sides `--repeat` times and keeps each side's best run, so a burst of
load on the machine handicaps neither; the load average before and after goes in the report.
Both sides run the same weights in the same dtype on the same torch threads, greedy, with a KV
cache, and produce exactly `--new-tokens` tokens per sequence (the engine ignores EOS, HF gets
`min_new_tokens`). Needs `pip install transformers` for part 1 (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine import build_engine  # noqa: E402
from replica.request import SamplingParams  # noqa: E402
from replica.weights import save_safetensors  # noqa: E402


def engine_throughput(batch: int, prompt_len: int, new: int, seed: int = 0) -> float:
    engine = build_engine(EngineConfig(model="tiny", num_blocks=4096, max_num_seqs=max(batch, 1),
                                       max_num_batched_tokens=4096, enable_prefix_caching=False))
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    # warm-up
    engine.add_request("warm", [rng.randrange(256) for _ in range(prompt_len)], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(256) for _ in range(prompt_len)], params)
    produced = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def hf_throughput(batch: int, prompt_len: int, new: int, seed: int = 0) -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    engine = build_engine(EngineConfig(model="tiny", num_blocks=16))
    model = engine.executor.model
    cfg = model.config
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_safetensors(model, path)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=256, eos_token_id=257, pad_token_id=257,
        )
        hf = transformers.LlamaForCausalLM(hf_cfg)
        from safetensors.torch import load_file

        missing, unexpected = hf.load_state_dict(load_file(str(path)), strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    hf.eval()
    rng = random.Random(seed)
    ids = torch.tensor([[rng.randrange(256) for _ in range(prompt_len)] for _ in range(batch)])
    with torch.inference_mode():
        warm = ids[:, :8]
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - prompt_len) * batch / elapsed


def ttft(cached: bool, prompt_len: int = 2048, seed: int = 1) -> float:
    engine = build_engine(EngineConfig(model="tiny", num_blocks=1024, max_num_batched_tokens=prompt_len))
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(prompt_len)]
    warm = [rng.randrange(256) for _ in range(prompt_len)]
    for p in ([warm, prompt] if cached else [warm]):
        engine.add_request(f"w{len(engine.steps)}", p, SamplingParams(max_tokens=1, temperature=0))
        while engine.has_unfinished():
            engine.step()
    engine.add_request("measured", prompt, SamplingParams(max_tokens=1, temperature=0))
    start = time.perf_counter()
    while True:
        outs = engine.step()
        if outs:
            return time.perf_counter() - start


def kv_waste(num_requests: int = 64, seed: int = 2) -> tuple[float, float]:
    """Mean over steps and running sequences of (allocated slots - tokens held) / block_size."""
    engine = build_engine(EngineConfig(model="tiny", num_blocks=4096, max_num_seqs=32, max_num_batched_tokens=1024))
    rng = random.Random(seed)
    for i in range(num_requests):
        engine.add_request(f"r{i}", [rng.randrange(256) for _ in range(rng.randint(10, 400))],
                           SamplingParams(max_tokens=rng.randint(5, 100), temperature=0, ignore_eos=True))
    samples = []
    bs = engine.kv.block_size
    while engine.has_unfinished():
        engine.step()
        for req in engine.scheduler.running:
            allocated = len(engine.kv.block_ids(req.request_id)) * bs
            samples.append((allocated - req.num_computed_tokens) / bs)
    return sum(samples) / len(samples), max(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side and batch (best kept)")
    ap.add_argument("--out", default="results/bench_engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    load_before = os.getloadavg()[0]
    for b in [int(x) for x in args.batches.split(",")]:
        ours, theirs = 0.0, None
        for _ in range(max(args.repeat, 1)):
            ours = max(ours, engine_throughput(b, args.prompt_len, args.new_tokens))
            hf = hf_throughput(b, args.prompt_len, args.new_tokens)
            theirs = None if hf is None else max(theirs or 0.0, hf)
        rows.append([b, round(ours, 1), "n/a" if theirs is None else round(theirs, 1),
                     "n/a" if theirs is None else f"{ours / theirs:.2f}x"])
    load = {"loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "threads": args.threads, "repeat": args.repeat}
    print(f"load average (1 min) before {load['loadavg_1min_before']}, after {load['loadavg_1min_after']}")
    report("Output tokens/s, tiny preset, greedy (kvfleet engine vs HF transformers generate), best of --repeat",
           ["batch", "kvfleet tok/s", "HF generate tok/s", "speed-up"], rows, args.out.replace(".json", "_tput.json"),
           extra=load)

    cold = min(ttft(False) for _ in range(3))
    hot = min(ttft(True) for _ in range(3))
    report("TTFT of a 2,048-token prompt (best of 3)", ["cache", "TTFT ms"],
           [["cold", round(cold * 1e3, 2)], ["fully cached", round(hot * 1e3, 2)], ["ratio", f"{cold / hot:.1f}x"]],
           args.out.replace(".json", "_ttft.json"))

    mean, worst = kv_waste()
    report("KV memory wasted per running sequence (allocated slots - tokens held)", ["mean blocks", "max blocks"],
           [[round(mean, 3), round(worst, 3)]], args.out.replace(".json", "_waste.json"))


if __name__ == "__main__":
    main()
