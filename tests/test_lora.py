"""LoRA adapters in the engine: the forward equals a merged-weights reference, adapters never
share KV blocks (hash roots and the engine's cache), events carry the adapter, residency is
bounded (LRU), and the scheduler keeps a batch within max_loras. No HTTP here
(tests/test_lora_routing.py runs real replica subprocesses behind the balancer)."""

from __future__ import annotations

import pytest
import torch

from protocol.events import BlockStored
from protocol.hashing import prompt_hashes, root_hash
from replica.config import EngineConfig
from replica.engine import LLMEngine, build_engine, build_sim_engine
from replica.lora import AdapterSlots, LoraModule, parse_lora_modules
from replica.lora_weights import load_lora, projection_shape, save_lora
from replica.model_config import ModelConfig
from replica.request import SamplingParams
from replica.weights import build_model
from tests.test_engine import dense_greedy, prompts, run_all

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("loras")
    paths = {"sql": str(d / "sql.safetensors"), "chat": str(d / "chat.safetensors")}
    save_lora(paths["sql"], TINY, rank=8, alpha=16, projections=("q_proj", "v_proj", "o_proj", "down_proj"), seed=1,
              std=0.08)
    save_lora(paths["chat"], TINY, rank=4, alpha=4, projections=("k_proj", "gate_proj", "up_proj"), seed=2, std=0.08)
    return paths


def engine_with(adapters: dict[str, str], max_loras: int = 2, **kw) -> LLMEngine:
    mods = parse_lora_modules([f"{n}={p}" for n, p in adapters.items()], "tiny")
    base = dict(model="tiny", num_blocks=256, max_num_seqs=16, max_num_batched_tokens=64, threads=1,
                lora_modules=mods, max_loras=max_loras)
    base.update(kw)
    return build_engine(EngineConfig(**base))


def merged_model(path: str):
    """The reference: the base model with W + (alpha/r)·B·A written into its weights."""
    model = build_model(TINY, seed=0)
    w = load_lora("ref", path, TINY, torch.float32)
    q, kv, i = TINY.q_size, TINY.kv_size, TINY.intermediate_size
    where = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", q),
             "v_proj": ("self_attn.qkv_proj", q + kv), "o_proj": ("self_attn.o_proj", 0),
             "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", i), "down_proj": ("mlp.down_proj", 0)}
    with torch.no_grad():
        for layer, mods in zip(model.layers, w.layers):
            for proj, (a, b) in mods.items():
                name, start = where[proj]
                weight = layer.get_submodule(name).weight
                out_f, _ = projection_shape(TINY, proj)
                weight[start:start + out_f] += w.scale * (b @ a)
    return model


def test_root_hash_separates_adapters_salts_and_the_base_model() -> None:
    roots = {root_hash("tiny"), root_hash("tiny", lora_name="sql"), root_hash("tiny", lora_name="chat"),
             root_hash("tiny", salt="sql"), root_hash("tiny", salt="s", lora_name="sql")}
    assert len(roots) == 5  # an adapter name is never read as a salt, nor the reverse
    assert root_hash("tiny", "s") == root_hash("tiny", salt="s")  # without an adapter: as before
    tokens = list(range(64))
    a, b = prompt_hashes(tokens, 16, "tiny", lora_name="sql"), prompt_hashes(tokens, 16, "tiny", lora_name="chat")
    assert not set(a) & set(b) and not set(a) & set(prompt_hashes(tokens, 16, "tiny"))


def test_greedy_output_with_an_adapter_equals_the_merged_reference_and_differs_from_the_base(adapters) -> None:
    engine = engine_with(adapters)
    ps = prompts(3, [21, 40, 7])
    arrivals = {0: [(f"{name}-{j}", p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                     lora_name=None if name == "base" else name))
                    for j, p in enumerate(ps) for name in ("base", "sql", "chat")]}
    got, _ = run_all(engine, arrivals)  # one batch mixes the base model and both adapters
    base = build_model(TINY, seed=0)
    refs = {"sql": merged_model(adapters["sql"]), "chat": merged_model(adapters["chat"])}
    for j, p in enumerate(ps):
        assert got[f"base-{j}"] == dense_greedy(base, p, 10)
        for name, model in refs.items():
            assert got[f"{name}-{j}"] == dense_greedy(model, p, 10), name
            assert got[f"{name}-{j}"] != got[f"base-{j}"], f"adapter {name} changed nothing"


def test_two_adapters_identical_prompts_never_share_blocks(adapters) -> None:
    engine = engine_with(adapters)
    prompt = prompts(5, [80])[0]
    finals = {}
    for rid, lora in (("sql-1", "sql"), ("chat-1", "chat"), ("base-1", None), ("sql-2", "sql")):
        _, f = run_all(engine, {0: [(rid, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                                                                   lora_name=lora))]})
        finals.update(f)
    # Only the repeat under the same adapter hits: the other adapter and the base model miss.
    assert [finals[r].num_cached_tokens for r in ("sql-1", "chat-1", "base-1", "sql-2")] == [0, 0, 0, 64]
    stored = [e for e in engine.kv.take_events() if isinstance(e, BlockStored)]
    by_lora: dict[str | None, set[int]] = {}
    for e in stored:
        assert e.lora_id == (None if e.lora_name is None else {"sql": 1, "chat": 2}[e.lora_name])
        by_lora.setdefault(e.lora_name, set()).update(e.block_hashes)
    assert set(by_lora) == {"sql", "chat", None}
    assert not by_lora["sql"] & by_lora["chat"] and not by_lora[None] & (by_lora["sql"] | by_lora["chat"])
    # The engine's hashes are the protocol's: the balancer finds them under the adapter's root.
    assert set(prompt_hashes(prompt, 16, "tiny", lora_name="chat")[:5]) == by_lora["chat"]
    snap = {e.lora_name for e in engine.kv.snapshot_events()}
    assert snap == {"sql", "chat", None}


def test_max_loras_bounds_a_batch_and_residency_is_lru(adapters) -> None:
    engine = engine_with(adapters, max_loras=1)
    assert engine.loras.resident == ("sql",)  # the first max_loras modules load at start
    ps = prompts(7, [30, 30, 30, 30])
    seen: list[set[str]] = []
    arrivals = {0: [(f"r{j}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                lora_name=("chat", "sql")[j % 2])) for j, p in enumerate(ps)]}
    for rid, p, params in arrivals[0]:
        engine.add_request(rid, p, params)
    while engine.has_unfinished():
        engine.step()
        seen.append({r.lora_name for r in engine.scheduler.running})
    assert all(len(s) <= 1 for s in seen) and {"sql"} in seen and {"chat"} in seen
    # sql at start; r0 (chat) evicts it and r2 (chat) joins while r1, r3 (sql) wait; then sql again
    assert engine.loras.loads_total == 3 and engine.loras.evictions_total == 2
    assert seen[0] == {"chat"} and len(engine.scheduler.running) == 0
    assert engine.loras.mean_load_s > 0


def test_adapter_slots_evict_least_recently_used_not_needed() -> None:
    loaded = []
    mods = [LoraModule(n, f"/{n}", i + 1) for i, n in enumerate("abc")]
    slots = AdapterSlots(mods, 2, lambda m: loaded.append(m.name) or m.name, modelled_load_s=0.5)
    assert slots.activate(["a", "b"]) == 1.0 and slots.resident == ("a", "b")
    assert slots.activate(["a"]) == 0.0 and slots.resident == ("b", "a")
    assert slots.activate(["c"]) == 0.5 and slots.resident == ("a", "c")  # b was least recently used
    with pytest.raises(ValueError, match="max_loras"):
        slots.activate(["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        slots.activate(["zz"])
    assert loaded == ["a", "b", "c"]


def test_sim_engine_models_the_load_time_and_tags_events() -> None:
    mods = parse_lora_modules(["x=/nowhere/x.safetensors", "y=/nowhere/y.safetensors"], "tiny")
    times = []
    engine = build_sim_engine(EngineConfig(model="tiny", num_blocks=64, lora_modules=mods, max_loras=1,
                                           lora_load_s=0.25), "llama3-8b-h100", time_scale=1e9)
    engine.executor.advance = lambda d, out: times.append(d)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=1, ignore_eos=True, lora_name="y"))
    engine.step()
    assert times[0] >= 0.25 and engine.loras.resident == ("y",)
    assert {e.lora_name for e in engine.kv.take_events() if isinstance(e, BlockStored)} == {"y"}


def test_bad_adapters_are_refused_with_what_to_do(adapters, tmp_path) -> None:
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["sql"], "tiny")
    with pytest.raises(ValueError, match="used twice"):
        parse_lora_modules(["a=/x", "a=/y"], "tiny")
    with pytest.raises(ValueError, match="no file"):
        load_lora("gone", tmp_path / "gone.safetensors", TINY, torch.float32)
    other = ModelConfig.from_preset("tiny", hidden_size=128, head_dim=16)
    with pytest.raises(ValueError, match="made for this model"):
        load_lora("sql", adapters["sql"], other, torch.float32)
    engine = engine_with(adapters)
    with pytest.raises(ValueError, match="serves no LoRA adapter"):
        engine.add_request("r", [1, 2, 3], SamplingParams(lora_name="nope"))
