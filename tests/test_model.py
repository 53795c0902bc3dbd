"""The tiny Llama: paged forward (chunked prefill + decode) against the dense reference;
model config and KV-cache sizing."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from kernels import AttentionMetadata
from replica.kv_cache import allocate_kv_caches, kv_bytes_per_block, num_blocks_for_budget
from replica.model import LlamaForCausalLM
from replica.model_config import PRESETS, ModelConfig
from replica.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK_SIZE = 4


class _PagedRunner:
    """The least a model runner does: blocks from a shuffled free list, metadata, forward."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, seed: int = 0) -> None:
        self.model = model
        self.caches = allocate_kv_caches(model.config, num_blocks, BLOCK_SIZE, "cpu")
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}  # tokens whose KV is in the cache

    def step(self, work: list[tuple[str, list[int]]], sample_seqs: list[int] | None = None):
        """work: (sequence, its full token list so far, of which the uncomputed tail is run).
        Returns each sequence's logits for the tokens run, [n_i, V]; with sample_seqs, the
        model's hidden states for the last token of those sequences, [len(sample_seqs), D]."""
        ids, positions, tables, seq_lens, query_lens = [], [], [], [], []
        for name, tokens in work:
            table = self.tables.setdefault(name, [])
            start = self.computed.get(name, 0)
            while len(table) * BLOCK_SIZE < len(tokens):
                table.append(self.free.pop())
            ids += tokens[start:]
            positions += range(start, len(tokens))
            tables.append(table)
            seq_lens.append(len(tokens))
            query_lens.append(len(tokens) - start)
            self.computed[name] = len(tokens)
        meta = AttentionMetadata.build(tables, seq_lens, query_lens, BLOCK_SIZE)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta, sample_seqs=sample_seqs)
        if sample_seqs is not None:
            return hidden
        logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))


def _dense_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.forward_dense(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # nothing below should depend on it
    return build_model(ModelConfig.from_preset("tiny"), seed=0)


@torch.inference_mode()
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_prefill_then_decode_matches_dense(tiny_model, tied):
    model = tiny_model if not tied else build_model(replace(PRESETS["tiny"], tie_word_embeddings=True), seed=1)
    rng = random.Random(7)
    prompts = {"a": [rng.randrange(256) for _ in range(37)], "b": [rng.randrange(256) for _ in range(21)]}
    seqs = {k: [] for k in prompts}
    runner = _PagedRunner(model, num_blocks=64)
    generated = {k: [] for k in prompts}
    # a is prefilled in chunks 16, 16, 5 while b prefills at once and starts decoding.
    schedule = [{"a": 16, "b": 21}, {"a": 32}, {"a": 37}]
    for n_decode in range(12):
        schedule.append({})
    for plan in schedule:
        work = []
        for name in prompts:
            if name in plan:
                seqs[name] = prompts[name][: plan[name]]
            elif len(seqs[name]) >= len(prompts[name]):
                seqs[name] = seqs[name] + [generated[name][-1]]
            else:
                continue
            work.append((name, list(seqs[name])))
        outs = runner.step(work)
        for (name, tokens), logits in zip(work, outs):
            dense = model.forward_dense(torch.tensor([tokens]))[0, -logits.shape[0] :]
            torch.testing.assert_close(logits, dense, atol=1e-4, rtol=1e-4)
            if len(tokens) >= len(prompts[name]):
                generated[name].append(int(logits[-1].argmax()))
    for name, prompt in prompts.items():
        assert generated[name] == _dense_greedy(model, prompt, len(generated[name]))


@torch.inference_mode()
def test_sample_seqs_skips_rows_but_not_their_kv(tiny_model):
    """forward(sample_seqs=...) returns the final hidden state of only those sequences' last
    tokens, equal to the full forward's rows, and still writes every token's K/V: the next step
    of a sequence that did not sample matches dense."""
    rng = random.Random(5)
    a = [rng.randrange(256) for _ in range(19)]
    b = [rng.randrange(256) for _ in range(23)]
    c = [rng.randrange(256) for _ in range(9)]
    full, pruned = _PagedRunner(tiny_model, num_blocks=64, seed=1), _PagedRunner(tiny_model, num_blocks=64, seed=1)
    # a: a first chunk (does not sample); b: whole prompt (samples); c: whole prompt (samples)
    work = [("a", a[:11]), ("b", b), ("c", c)]
    ref = [x[-1] for x in full.step(work)]
    hidden = pruned.step(work, sample_seqs=[1, 2])
    assert hidden.shape == (2, tiny_model.config.hidden_size)
    torch.testing.assert_close(tiny_model.compute_logits(hidden), torch.stack(ref[1:]), atol=1e-4, rtol=1e-4)
    # a's first chunk K/V were written in every layer, the last included
    (logits,) = pruned.step([("a", a)])
    dense = tiny_model.forward_dense(torch.tensor([a]))[0, 11:]
    torch.testing.assert_close(logits, dense, atol=1e-4, rtol=1e-4)
    # no sequence samples: K/V only, an empty result
    assert pruned.step([("c", c + [1, 2, 3])], sample_seqs=[]).shape == (0, tiny_model.config.hidden_size)


@torch.inference_mode()
def test_shared_prefix_blocks_are_reused_by_a_second_sequence(tiny_model):
    """Two sequences whose block tables share the first blocks (a prefix-cache hit): the second
    computes only its tail and still matches dense."""
    rng = random.Random(3)
    prefix = [rng.randrange(256) for _ in range(4 * BLOCK_SIZE)]
    first = prefix + [rng.randrange(256) for _ in range(5)]
    second = prefix + [rng.randrange(256) for _ in range(7)]
    runner = _PagedRunner(tiny_model, num_blocks=32)
    runner.step([("first", first)])
    runner.tables["second"] = runner.tables["first"][:4]
    runner.computed["second"] = len(prefix)
    (logits,) = runner.step([("second", second)])
    dense = tiny_model.forward_dense(torch.tensor([second]))[0, len(prefix) :]
    torch.testing.assert_close(logits, dense, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_outputs_depend_on_context(tiny_model):
    """The random model is a useful engine test only if distant tokens change the output."""
    rng = random.Random(11)
    changed = 0
    for _ in range(8):
        ids = [rng.randrange(256) for _ in range(64)]
        other = list(ids)
        other[rng.randrange(1, 48)] ^= 1
        a = tiny_model.forward_dense(torch.tensor([ids, other]))[:, -1]
        changed += int(a[0].argmax() != a[1].argmax())
    assert changed >= 2


@torch.inference_mode()
def test_logits_shape_dtype_and_greedy_margins(tiny_model):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = tiny_model.forward_dense(ids)
    assert logits.shape == (2, 40, 512) and logits.dtype == torch.float32
    top2 = logits.topk(2, dim=-1).values
    # Not dominated by ties: the typical top-1/top-2 gap is far above float noise.
    assert (top2[..., 0] - top2[..., 1]).median() > 0.1


def test_presets_and_derived_head_dim():
    assert PRESETS["tiny"].head_dim == 32 and PRESETS["tiny"].vocab_size == 512
    assert 80e6 < PRESETS["small"].num_parameters() < 130e6
    assert PRESETS["llama3-8b"].num_parameters() == 8_030_261_248
    assert ModelConfig.from_preset("tiny", dtype="bfloat16").dtype == "bfloat16"
    assert ModelConfig(64, 128, 1, 4, 2, 256).head_dim == 32
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(TypeError):
        PRESETS["x"] = PRESETS["tiny"]  # type: ignore[index]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"dtype": "float64"}, "dtype"),
        ({"head_dim": 7}, "even"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        replace(PRESETS["tiny"], **kwargs)


def test_from_hf_config_round_trip(tmp_path):
    cfg = replace(PRESETS["tiny"], tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_hf_config(tmp_path) == cfg
    llama31 = {
        **PRESETS["llama3-8b"].to_hf_dict(),
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    (tmp_path / "l31.json").write_text(json.dumps(llama31))
    assert ModelConfig.from_hf_config(tmp_path / "l31.json").rope_scaling.factor == 8.0
    (tmp_path / "bias.json").write_text(json.dumps({**cfg.to_hf_dict(), "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf_config(tmp_path / "bias.json")


def test_kv_cache_sizing_and_allocation():
    cfg = PRESETS["tiny"]
    per_block = kv_bytes_per_block(cfg, 16)
    assert per_block == 2 * 4 * 16 * 4 * 32 * 4
    assert num_blocks_for_budget(cfg, 16, 10 * per_block + per_block - 1) == 10
    caches = allocate_kv_caches(cfg, num_blocks=3, block_size=16, device="cpu")
    assert len(caches) == cfg.num_layers
    for k, v in caches:
        assert k.shape == v.shape == (3, 16, 4, 32)
        assert k.dtype == torch.float32 and not k.any() and k.data_ptr() != v.data_ptr()
    assert sum(k.nbytes + v.nbytes for k, v in caches) == 3 * per_block
    with pytest.raises(ValueError):
        allocate_kv_caches(cfg, num_blocks=0, block_size=16, device="cpu")
