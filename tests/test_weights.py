"""Deterministic init, and safetensors in HF Llama naming."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from replica.model_config import PRESETS
from replica.weights import build_model, hf_state_dict, hf_tensor_shapes, save_safetensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two layers of the tiny shape: every naming rule, little work.
CONFIG = replace(PRESETS["tiny"], num_layers=2)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_is_reproducible_and_seed_dependent():
    torch.manual_seed(123)  # the global RNG must not matter
    a = build_model(CONFIG, seed=5)
    torch.manual_seed(456)
    b = build_model(CONFIG, seed=5)
    c = build_model(CONFIG, seed=6)
    assert _same_state(a, b)
    assert not torch.equal(a.layers[0].self_attn.qkv_proj.weight, c.layers[0].self_attn.qkv_proj.weight)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_init_in_bfloat16_is_the_float32_init_rounded():
    f32 = build_model(CONFIG, seed=5)
    bf16 = build_model(replace(CONFIG, dtype="bfloat16"), seed=5)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.lm_head.weight, f32.lm_head.weight.to(torch.bfloat16))
    assert bf16.inv_freq.dtype == torch.float32


def test_safetensors_round_trip_uses_hf_names(tmp_path):
    model = build_model(CONFIG, seed=1)
    path = tmp_path / "model.safetensors"
    save_safetensors(model, path)
    stored = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in stored.items()} == hf_tensor_shapes(CONFIG)
    assert "model.layers.1.self_attn.k_proj.weight" in stored and "lm_head.weight" in stored
    loaded = build_model(CONFIG, seed=999, weights_path=path)
    assert _same_state(model, loaded)
    ids = torch.arange(20)[None]
    torch.testing.assert_close(model.forward_dense(ids), loaded.forward_dense(ids), atol=0, rtol=0)


def test_tied_model_saves_no_lm_head_and_loads_back(tmp_path):
    cfg = replace(CONFIG, tie_word_embeddings=True)
    model = build_model(cfg, seed=2)
    assert model.lm_head.weight is model.embed_tokens.weight
    path = tmp_path / "tied.safetensors"
    save_safetensors(model, path)
    assert "lm_head.weight" not in load_file(str(path))
    loaded = build_model(cfg, weights_path=path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert _same_state(model, loaded)


def test_hand_made_file_loads_into_the_fused_projections(tmp_path):
    """A file written by someone else (here: by hand) fills q/k/v and gate/up in order."""
    cfg = replace(CONFIG, num_layers=1)
    tensors = {name: torch.full(shape, float(i)) for i, (name, shape) in enumerate(hf_tensor_shapes(cfg).items())}
    path = tmp_path / "hand.safetensors"
    save_file(tensors, str(path))
    model = build_model(cfg, weights_path=path)
    qkv = model.layers[0].self_attn.qkv_proj.weight
    q, kv = cfg.q_size, cfg.kv_size
    assert qkv[:q].eq(tensors["model.layers.0.self_attn.q_proj.weight"][0, 0]).all()
    assert qkv[q : q + kv].eq(tensors["model.layers.0.self_attn.k_proj.weight"][0, 0]).all()
    assert qkv[q + kv :].eq(tensors["model.layers.0.self_attn.v_proj.weight"][0, 0]).all()
    gate_up = model.layers[0].mlp.gate_up_proj.weight
    assert gate_up[: cfg.intermediate_size].eq(tensors["model.layers.0.mlp.gate_proj.weight"][0, 0]).all()
    assert gate_up[cfg.intermediate_size :].eq(tensors["model.layers.0.mlp.up_proj.weight"][0, 0]).all()
    assert {k: v for k, v in hf_state_dict(model).items()}.keys() == tensors.keys()


def test_missing_tensor_is_named(tmp_path):
    tensors = hf_state_dict(build_model(CONFIG, seed=0))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        build_model(CONFIG, weights_path=path)


def test_misshaped_and_unexpected_tensors_are_named(tmp_path):
    tensors = hf_state_dict(build_model(CONFIG, seed=0))
    tensors["model.norm.weight"] = torch.ones(CONFIG.hidden_size + 1)
    tensors["model.layers.9.self_attn.q_proj.weight"] = torch.ones(2, 2)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as err:
        build_model(CONFIG, weights_path=path)
    message = str(err.value)
    assert "misshaped tensors: model.norm.weight: expected (256,), got (257,)" in message
    assert "unexpected tensors: model.layers.9.self_attn.q_proj.weight" in message
