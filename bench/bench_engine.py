"""Engine benchmarks on this machine (issue: replica engine).

1. Output tokens/s of the kvfleet engine vs Hugging Face `transformers` `generate` on the same
   config and weights (tiny preset), batch 1, 16, 32, greedy, in two workloads (`--workload`):
   a. uniform: every prompt `--prompt-len` (128) tokens, every output `--new-tokens` (128) tokens.
      HF's best case: no padding, every sequence of a batch finishes at the same step.
   b. varied: the comparison vLLM's "up to 24x HF" claim and `vllm bench throughput --backend hf`
      use, prompt and output lengths varying per request as in ShareGPT. ShareGPT itself may not
      be downloaded here and the shared traces do not look like it (Azure code: prompts of
      thousands of tokens, ~20-token outputs; Mooncake: ~15k-token prompts), so lengths are drawn
      from a ShareGPT-shaped lognormal, scaled down so a CPU run stays short (fixed seed):
      prompt ~ round(lognormal(median 96, sigma 1.0)) clipped to [8, 512] (mean about 140),
      output ~ round(lognormal(median 96, sigma 0.9)) clipped to [8, 256] (mean about 120).
      ShareGPT (vLLM paper, fig. 11) has mean input 161 and mean output 338 tokens, both with a
      long tail. Prompt token ids are random bytes (0-255), the same ids on both sides.
      For batch size B there are `--varied-waves` x B requests (default 1 x B):
      - HF, as `run_hf` in vLLM's benchmarks/benchmark_throughput.py: the requests go in order,
        B at a time, each batch left-padded to its longest prompt (pad = EOS id 257, attention
        mask 0 there), one `generate(use_cache=True, max_new_tokens=max output in the batch)`
        per batch; here greedy and with `min_new_tokens` equal, so EOS cannot end it early
        (vLLM samples at temperature 1; the cost of a step is the same).
      - kvfleet: all requests submitted at once to an engine with max_num_seqs = B (at most B
        sequences decoded together, as on the HF side), each with max_tokens = its own output
        length and ignore_eos; KV blocks for B sequences of the longest length, so nothing is
        preempted (the preemption count is reported).
      Output tokens on both sides = the sum of the requested output lengths (what users asked
      for), over wall time. HF also decodes padding: every sequence of a batch runs to the
      batch's longest output; that total is reported as "HF generated" for transparency, with
      the share of requests whose greedy tokens agree exactly between the two sides.
2. TTFT of a 2,048-token prompt, cold vs fully cached.
3. KV memory wasted per running sequence (allocated slots minus tokens held), in blocks.
4. (`--parts decode`) the C decode kernel (kernels/_cpu_decode.c) against the torch path it
   replaced: one layer's decode attention, and the varied workload at batch 32 with it off / on.

    .venv/bin/python bench/bench_engine.py [--threads 2] [--repeat 3] [--workload uniform|varied|both]
        [--out results/bench_engine.json]

On a shared machine: OMP_WAIT_POLICY=PASSIVE taskset -c 1 .venv/bin/python bench/bench_engine.py --threads 1

Part 1 alternates the two sides `--repeat` times and keeps each side's best run, so a burst of
load on the machine handicaps neither; the load average before and after goes in the report.
Both sides run the same weights in the same dtype on the same torch threads, greedy, with a KV
cache, and produce exactly the requested tokens per sequence (the engine ignores EOS, HF gets
`min_new_tokens`). The goal of the issue is >= 3x HF at batch 16 and up; each table says whether
it is met. Needs `pip install transformers` for part 1 (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
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


@functools.lru_cache(maxsize=1)
def _hf_model():
    """HF `LlamaForCausalLM` with the engine's tiny-preset weights (None without transformers)."""
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
            bos_token_id=256, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        )
        hf = transformers.LlamaForCausalLM(hf_cfg)
        from safetensors.torch import load_file

        missing, unexpected = hf.load_state_dict(load_file(str(path)), strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    hf.eval()
    return hf


def hf_throughput(batch: int, prompt_len: int, new: int, seed: int = 0) -> float | None:
    hf = _hf_model()
    if hf is None:
        return None
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


# ------------------------------------------------------------------ varied (ShareGPT-like) lengths
EOS_ID = 257  # the byte tokenizer's EOS; HF pads with it, as vLLM's run_hf pads Llama with EOS
VARIED_PROMPT = (96.0, 1.0, 8, 512)  # lognormal median, sigma, clip low, clip high
VARIED_OUTPUT = (96.0, 0.9, 8, 256)


def varied_requests(n: int, seed: int = 3) -> list[tuple[list[int], int]]:
    """n fixed-seed requests (prompt token ids, output length), ShareGPT-shaped lengths."""
    rng = random.Random(seed)

    def draw(median: float, sigma: float, lo: int, hi: int) -> int:
        return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))

    out = []
    for _ in range(n):
        p_len, o_len = draw(*VARIED_PROMPT), draw(*VARIED_OUTPUT)
        out.append(([rng.randrange(256) for _ in range(p_len)], o_len))
    return out


@dataclass
class VariedRun:
    tok_s: float  # requested output tokens / wall seconds
    seconds: float
    outputs: list[list[int]]  # each request's first `output_len` generated tokens
    generated: int  # tokens actually decoded (HF: padded to each batch's longest output)
    info: dict


def engine_varied(requests: list[tuple[list[int], int]], batch: int) -> VariedRun:
    max_len = max(len(p) + o for p, o in requests)
    bs = 16
    num_blocks = batch * -(-max_len // bs) + 64  # every running sequence at its longest: no preemption
    engine = build_engine(EngineConfig(model="tiny", block_size=bs, num_blocks=num_blocks, max_num_seqs=batch,
                                       max_num_batched_tokens=4096, enable_prefix_caching=False))
    engine.add_request("warm", list(range(64)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(requests))}
    for i, (prompt, o_len) in enumerate(requests):
        engine.add_request(f"r{i}", list(prompt), SamplingParams(max_tokens=o_len, temperature=0.0, ignore_eos=True))
    steps0 = engine.num_steps
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].extend(o.new_token_ids)
    elapsed = time.perf_counter() - start
    useful = sum(o for _, o in requests)
    got = [outs[f"r{i}"] for i in range(len(requests))]
    assert [len(g) for g in got] == [o for _, o in requests], "engine produced the wrong number of tokens"
    return VariedRun(useful / elapsed, elapsed, got, useful,
                     {"max_num_seqs": batch, "num_blocks": num_blocks, "block_size": bs,
                      "steps": engine.num_steps - steps0,
                      "preemptions": engine.scheduler.num_preemptions_total})


def hf_varied(requests: list[tuple[list[int], int]], batch: int) -> VariedRun | None:
    hf = _hf_model()
    if hf is None:
        return None
    with torch.inference_mode():
        warm = torch.arange(8).unsqueeze(0)
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        got: list[list[int]] = []
        generated = 0
        start = time.perf_counter()
        for b0 in range(0, len(requests), batch):
            chunk = requests[b0 : b0 + batch]
            width = max(len(p) for p, _ in chunk)
            new = max(o for _, o in chunk)
            ids = torch.full((len(chunk), width), EOS_ID, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, _) in enumerate(chunk):  # left padding, as a Llama tokenizer pads
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = hf.generate(input_ids=ids, attention_mask=mask, use_cache=True, do_sample=False,
                              max_new_tokens=new, min_new_tokens=new)
            generated += (out.shape[1] - width) * len(chunk)
            got += [out[r, width : width + o].tolist() for r, (_, o) in enumerate(chunk)]
        elapsed = time.perf_counter() - start
    useful = sum(o for _, o in requests)
    return VariedRun(useful / elapsed, elapsed, got, generated, {})


def run_varied(batches: list[int], repeat: int, waves: int) -> tuple[list[list], dict]:
    rows, details = [], {}
    for b in batches:
        reqs = varied_requests(b * waves, seed=3 + b)
        ours: VariedRun | None = None
        theirs: VariedRun | None = None
        for _ in range(max(repeat, 1)):
            e = engine_varied(reqs, b)
            ours = e if ours is None or e.tok_s > ours.tok_s else ours
            h = hf_varied(reqs, b)
            if h is not None:
                theirs = h if theirs is None or h.tok_s > theirs.tok_s else theirs
        useful = sum(o for _, o in reqs)
        p_lens = [len(p) for p, _ in reqs]
        o_lens = [o for _, o in reqs]
        agree = "n/a" if theirs is None else f"{sum(a == c for a, c in zip(ours.outputs, theirs.outputs))}/{len(reqs)}"
        rows.append([b, len(reqs), f"{min(p_lens)}/{round(sum(p_lens) / len(p_lens))}/{max(p_lens)}",
                     f"{min(o_lens)}/{round(sum(o_lens) / len(o_lens))}/{max(o_lens)}", useful,
                     "n/a" if theirs is None else theirs.generated,
                     round(ours.tok_s, 1), "n/a" if theirs is None else round(theirs.tok_s, 1),
                     "n/a" if theirs is None else f"{ours.tok_s / theirs.tok_s:.2f}x", agree])
        details[str(b)] = {"engine": {**ours.info, "seconds": round(ours.seconds, 3)},
                           "hf_seconds": None if theirs is None else round(theirs.seconds, 3)}
    return rows, details


def goal_line(rows: list[list], speedup_col: int) -> str:
    big = [r for r in rows if r[0] >= 16 and str(r[speedup_col]).endswith("x")]
    if not big:
        return "goal (>= 3x HF at batch 16 and up): not measured"
    worst = min(float(str(r[speedup_col])[:-1]) for r in big)
    return (f"goal (>= 3x HF at batch 16 and up): {'MET' if worst >= 3 else 'NOT met'} "
            f"(lowest speed-up at batch >= 16: {worst:.2f}x)")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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


def _thread_time_ms(fn, runs: int) -> float:
    """Fastest of `runs` calls of fn, in ms of this thread's CPU time (steadier than wall time on
    a machine shared with other work)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best * 1e3


def decode_kernel_rows(runs: int) -> list[list]:
    """Decode attention of one layer (tiny preset's heads: 8 query, 4 KV, head dim 32), the torch
    planned path against the C kernel (kernels/_cpu_decode.c), on the same random paged cache;
    each sequence's length drawn in [L/2, L] (a step's decode group is ragged)."""
    from kernels import AttentionMetadata, cpu_decode
    from kernels.paged_attention import _planned_decode

    if not cpu_decode.NATIVE:
        return [["-", "-", "n/a (kernels._cpu_decode not built)", "-", "-"]]
    rows = []
    real_usable = cpu_decode.usable
    for batch, length in ((16, 256), (16, 640), (32, 256), (32, 640)):
        g = torch.Generator().manual_seed(batch + length)
        bs, hkv, hq, d = 16, 4, 8, 32
        lens = torch.randint(length // 2, length + 1, (batch,), generator=g).tolist()
        need = [-(-n // bs) for n in lens]
        perm = torch.randperm(sum(need) + 8, generator=g).tolist()
        tables, at = [], 0
        for n in need:
            tables.append(perm[at:at + n])
            at += n
        k_cache = torch.randn(len(perm), bs, hkv, d, generator=g)
        v_cache = torch.randn(len(perm), bs, hkv, d, generator=g)
        q = torch.randn(batch, hq, d, generator=g)
        group = AttentionMetadata.build(tables, lens, [1] * batch, bs).plan.decode
        times = {}
        for name, usable in (("torch", lambda *a: False), ("C", real_usable)):
            cpu_decode.usable = usable
            try:
                times[name] = _thread_time_ms(lambda: _planned_decode(q, k_cache, v_cache, group, d ** -0.5), runs)
            finally:
                cpu_decode.usable = real_usable
        rows.append([batch, length, round(times["torch"], 3), round(times["C"], 3),
                     f"{times['torch'] / times['C']:.2f}x"])
    return rows


def decode_engine_rows(batch: int, runs: int) -> list[list]:
    """The varied workload at `batch` through the engine with the C decode kernel off and on,
    in turns, in this process: CPU seconds (process time), best of `runs`."""
    from kernels import cpu_decode

    requests = varied_requests(batch)
    engine_varied(requests[:8], 8)  # warm-up
    real_usable = cpu_decode.usable
    best = {"torch": float("inf"), "C": float("inf")}
    tokens = sum(o for _, o in requests)
    for _ in range(runs):
        for name, usable in (("torch", lambda *a: False), ("C", real_usable)):
            cpu_decode.usable = usable
            try:
                t = time.process_time()
                engine_varied(requests, batch)
                best[name] = min(best[name], time.process_time() - t)
            finally:
                cpu_decode.usable = real_usable
    return [[batch, tokens, round(best["torch"], 2), round(best["C"], 2), f"{best['torch'] / best['C']:.2f}x"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side and batch (best kept)")
    ap.add_argument("--workload", choices=["uniform", "varied", "both"], default="both",
                    help="part 1: uniform lengths, varied ShareGPT-like lengths, or both tables")
    ap.add_argument("--varied-waves", type=int, default=1,
                    help="varied: requests per batch size = waves x batch (HF runs them B at a time)")
    ap.add_argument("--parts", default="tput,ttft,waste",
                    help="which parts to run (comma list of tput, ttft, waste, decode; decode: the C decode "
                         "kernel against the torch path, per layer and on the varied workload)")
    ap.add_argument("--out", default="results/bench_engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    batches = [int(x) for x in args.batches.split(",")]
    parts = set(args.parts.split(","))
    if "tput" in parts and args.workload in ("uniform", "both"):
        rows = []
        load_before = _load()
        for b in batches:
            ours, theirs = 0.0, None
            for _ in range(max(args.repeat, 1)):
                ours = max(ours, engine_throughput(b, args.prompt_len, args.new_tokens))
                hf = hf_throughput(b, args.prompt_len, args.new_tokens)
                theirs = None if hf is None else max(theirs or 0.0, hf)
            rows.append([b, round(ours, 1), "n/a" if theirs is None else round(theirs, 1),
                         "n/a" if theirs is None else f"{ours / theirs:.2f}x"])
        load = {"loadavg_before_1_5_15min": load_before, "loadavg_after_1_5_15min": _load(),
                "threads": args.threads, "repeat": args.repeat, "workload": "uniform",
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
        print(f"load average (1/5/15 min) before {load_before}, after {load['loadavg_after_1_5_15min']}")
        report(f"Output tokens/s, UNIFORM lengths (every prompt {args.prompt_len}, every output "
               f"{args.new_tokens} tokens; HF's best case), tiny preset, greedy, kvfleet engine vs HF "
               "transformers generate, best of --repeat",
               ["batch", "kvfleet tok/s", "HF generate tok/s", "speed-up"], rows,
               args.out.replace(".json", "_tput.json"), extra=load)
        print(goal_line(rows, 3))

    if "tput" in parts and args.workload in ("varied", "both"):
        load_before = _load()
        rows, details = run_varied(batches, args.repeat, args.varied_waves)
        load = {"loadavg_before_1_5_15min": load_before, "loadavg_after_1_5_15min": _load(),
                "threads": args.threads, "repeat": args.repeat, "workload": "varied",
                "waves": args.varied_waves,
                "prompt_len_lognormal_median_sigma_lo_hi": VARIED_PROMPT,
                "output_len_lognormal_median_sigma_lo_hi": VARIED_OUTPUT, "per_batch": details}
        print(f"\nload average (1/5/15 min) before {load_before}, after {load['loadavg_after_1_5_15min']}")
        report("Output tokens/s, VARIED ShareGPT-like lengths (vLLM `bench throughput` vs `--backend hf` "
               "method: HF left-pads each batch and decodes to its longest output), tiny preset, greedy, "
               "best of --repeat; tok/s = requested output tokens / wall time on both sides",
               ["batch", "requests", "prompt min/mean/max", "output min/mean/max", "requested out tokens",
                "HF generated (padded)", "kvfleet tok/s", "HF generate tok/s", "speed-up", "same greedy tokens"],
               rows, args.out.replace(".json", "_tput_varied.json"), extra=load)
        print(goal_line(rows, 8))
        for b, d in details.items():
            print(f"  batch {b}: engine {d['engine']}, HF {d['hf_seconds']} s")

    if "ttft" in parts:
        cold = min(ttft(False) for _ in range(3))
        hot = min(ttft(True) for _ in range(3))
        report("TTFT of a 2,048-token prompt (best of 3)", ["cache", "TTFT ms"],
               [["cold", round(cold * 1e3, 2)], ["fully cached", round(hot * 1e3, 2)],
                ["ratio", f"{cold / hot:.1f}x"]],
               args.out.replace(".json", "_ttft.json"))

    if "decode" in parts:
        report("Decode attention, one layer (8 query / 4 KV heads, head dim 32, block size 16, lengths in "
               "[L/2, L]): torch planned path vs C kernel, ms of thread CPU time, best of 20",
               ["batch", "L", "torch ms", "C kernel ms", "speed-up"], decode_kernel_rows(20),
               args.out.replace(".json", "_decode_kernel.json"))
        report("Varied workload at batch 32 through the engine, C decode kernel off / on (same process, in "
               f"turns), CPU seconds, best of {max(args.repeat, 1)}",
               ["batch", "output tokens", "torch path s", "C kernel s", "speed-up"],
               decode_engine_rows(32, max(args.repeat, 1)), args.out.replace(".json", "_decode_engine.json"))

    if "waste" in parts:
        mean, worst = kv_waste()
        report("KV memory wasted per running sequence (allocated slots - tokens held)", ["mean blocks", "max blocks"],
               [[round(mean, 3), round(worst, 3)]], args.out.replace(".json", "_waste.json"))


if __name__ == "__main__":
    main()
