"""The engine end to end on the tiny model: greedy equivalence, prefix caching, preemption,
sampling parameters. No HTTP here (see test_replica_server.py)."""

from __future__ import annotations

import random

import pytest
import torch

from replica.config import EngineConfig
from replica.engine import LLMEngine, build_engine
from replica.request import SamplingParams


def make_engine(**kw) -> LLMEngine:
    base = dict(model="tiny", num_blocks=256, max_num_seqs=16, max_num_batched_tokens=64, threads=1)
    base.update(kw)
    return build_engine(EngineConfig(**base))


def run_all(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]):
    """Add requests at the given step numbers, step until done; returns id -> output token ids."""
    tokens: dict[str, list[int]] = {}
    finals = {}
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            tokens[rid] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
        engine.kv.check_integrity()
        step += 1
        assert step < 10_000
    return tokens, finals


def dense_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model.forward_dense(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def prompts(seed: int, lengths: list[int], shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(256) for _ in range(shared)]
    return [head + [rng.randrange(256) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_greedy_equal_with_and_without_prefix_caching_and_dense():
    ps = prompts(1, [5, 37, 80, 16, 130], shared=40)
    arrivals = {0: [("a", ps[0], GREEDY), ("b", ps[1], GREEDY)], 2: [("c", ps[2], GREEDY)],
                5: [("d", ps[3], GREEDY), ("e", ps[4], GREEDY)]}
    cached_engine = make_engine()
    on, _ = run_all(cached_engine, arrivals)
    off, _ = run_all(make_engine(enable_prefix_caching=False), arrivals)
    assert on == off
    model = cached_engine.executor.model
    for rid, prompt, _ in [x for xs in arrivals.values() for x in xs]:
        assert on[rid] == dense_greedy(model, prompt, GREEDY.max_tokens), rid


def test_shared_1000_token_prefix_is_reused():
    engine = make_engine(max_num_batched_tokens=512)
    first, second = prompts(2, [1000 + 7, 1000 + 21], shared=0)
    second[:1000] = first[:1000]
    _, fin1 = run_all(engine, {0: [("first", first, GREEDY)]})
    assert fin1["first"].num_cached_tokens == 0
    computed_before = sum(s.prefill_tokens for s in engine.steps)
    _, fin2 = run_all(engine, {0: [("second", second, GREEDY)]})
    assert fin2["second"].num_cached_tokens >= 992
    prefilled = sum(s.prefill_tokens for s in engine.steps) - computed_before
    # Only the uncached tail is prefilled (prefill counter includes first-token chunks).
    assert prefilled == len(second) - fin2["second"].num_cached_tokens


def test_preemption_keeps_greedy_output():
    ps = prompts(3, [60, 70, 50, 65])
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(ps)]}
    roomy, _ = run_all(make_engine(num_blocks=256), arrivals)
    tight_engine = make_engine(num_blocks=20, block_size=16)  # 320 tokens for ~440 needed
    tight, _ = run_all(tight_engine, arrivals)
    assert tight_engine.scheduler.num_preemptions_total > 0
    assert tight == roomy


def test_max_tokens_stop_string_and_finish_reasons():
    engine = make_engine()
    prompt = prompts(4, [20])[0]
    toks, fin = run_all(engine, {0: [("len", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))]})
    assert len(toks["len"]) == 5 and fin["len"].finish_reason == "length"
    # Find a prompt whose greedy text has a printable piece, then stop on that piece.
    for seed in range(10, 40):
        prompt = prompts(seed, [20])[0]
        text = engine.tokenizer.decode(dense_greedy(engine.executor.model, prompt, 20))
        candidates = [k for k in range(1, len(text) - 1)
                      if text[k:k + 2].isascii() and text[k:k + 2].isprintable() and text.find(text[k:k + 2]) == k]
        if candidates:
            break
    assert candidates, "no prompt gave a usable stop string"
    stop = text[candidates[0]:candidates[0] + 2]
    outs = []
    engine.add_request("stop", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    produced = "".join(o.text for o in outs)
    assert produced == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    prompt = prompts(5, [30])[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone, _ = run_all(make_engine(), {0: [("x", prompt, params)]})
    other = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    crowded, _ = run_all(make_engine(), {0: [("y", prompts(6, [40])[0], other), ("x", prompt, params)]})
    assert alone["x"] == crowded["x"]


def test_min_tokens_forbids_eos():
    engine = make_engine()
    eos = engine.tokenizer.eos_token_id
    prompt = prompts(7, [10])[0]
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=1.0, seed=0, stop_token_ids=(65,))
    toks, fin = run_all(engine, {0: [("m", prompt, params)]})
    assert len(toks["m"]) == 6
    assert eos not in toks["m"][:5] and 65 not in toks["m"][:5]


def test_abort_frees_blocks():
    engine = make_engine()
    engine.add_request("a", prompts(8, [100])[0], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    assert engine.abort_request("a")
    assert not engine.has_unfinished()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.check_integrity()
