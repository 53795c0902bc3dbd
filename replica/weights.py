"""Weights: deterministic random init, and safetensors in the usual HF Llama naming.

Every path goes through one name table (`hf_tensor_shapes`) mapping HF names to slices of this
model's fused parameters:

    model.layers.{i}.self_attn.{q,k,v}_proj.weight  -> layers[i].self_attn.qkv_proj.weight rows
    model.layers.{i}.mlp.{gate,up}_proj.weight      -> layers[i].mlp.gate_up_proj.weight rows
    everything else                                 -> the parameter of the same role

Random init draws each HF tensor in table order from one CPU `torch.Generator`, in float32,
then copies it in, so a seed gives the same weights on every device and dtype, and a file
saved from a random model loads unchanged into HF transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from replica.model import LlamaForCausalLM, rope_inv_freq, torch_dtype
from replica.model_config import ModelConfig

# Init scales, chosen so that greedy decoding of a random model is a sensitive test of the KV
# cache. Projections reading a unit-RMS input get std GAIN/sqrt(fan_in), so every sublayer adds
# O(1) to the residual stream. q/k get QK_GAIN: sharper attention, so each output token depends
# on a few specific earlier tokens rather than on a blurred average; v/o get VO_GAIN. With
# these, changing one prompt token anywhere in a 96-token tiny-preset prompt flips the next
# greedy token in most cases (with 1/sqrt(fan_in) everywhere and GPT-2's 1/sqrt(2L) residual
# scaling it rarely did: the output followed the current token, and a bug that read the wrong
# KV block could go unnoticed). lm_head is scaled so logits have a standard deviation of about
# LOGIT_STD: the median top-1/top-2 margin is then ~0.9, far above float32 noise.
EMBED_STD = 1.0
QK_GAIN = 2.0
VO_GAIN = 1.5
LOGIT_STD = 4.0


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes, in the fixed order random init draws them."""
    d, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "self_attn.q_proj.weight"] = (q, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        shapes[p + "mlp.gate_proj.weight"] = (i, d)
        shapes[p + "mlp.up_proj.weight"] = (i, d)
        shapes[p + "mlp.down_proj.weight"] = (d, i)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _targets(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF name -> the (view of the) model parameter it fills."""
    cfg = model.config
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for n, layer in enumerate(model.layers):
        p = f"model.layers.{n}."
        qkv = layer.self_attn.qkv_proj.weight
        gate_up = layer.mlp.gate_up_proj.weight
        out[p + "self_attn.q_proj.weight"] = qkv[:q]
        out[p + "self_attn.k_proj.weight"] = qkv[q : q + kv]
        out[p + "self_attn.v_proj.weight"] = qkv[q + kv :]
        out[p + "self_attn.o_proj.weight"] = layer.self_attn.o_proj.weight
        out[p + "mlp.gate_proj.weight"] = gate_up[:i]
        out[p + "mlp.up_proj.weight"] = gate_up[i:]
        out[p + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def _init_std(name: str, shape: tuple[int, ...], config: ModelConfig) -> float | None:
    """Standard deviation of a random tensor, or None for a norm weight (all ones)."""
    if len(shape) == 1:
        return None
    if name == "model.embed_tokens.weight":
        # Tied, the embedding is also the output projection: keep the logits' spread.
        return LOGIT_STD / math.sqrt(config.hidden_size) if config.tie_word_embeddings else EMBED_STD
    if name == "lm_head.weight":
        return LOGIT_STD / math.sqrt(config.hidden_size)
    std = 1.0 / math.sqrt(shape[1])
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return QK_GAIN * std
    if name.endswith(("v_proj.weight", "o_proj.weight")):
        return VO_GAIN * std
    return std


def random_hf_tensors(config: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The random weights of `seed` as (HF name, float32 CPU tensor), one at a time."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, shape in hf_tensor_shapes(config).items():
        std = _init_std(name, shape, config)
        if std is None:
            yield name, torch.ones(shape)
        else:
            yield name, torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Fill `model` with the deterministic random weights of `seed` (same on every device)."""
    targets = _targets(model)
    for name, tensor in random_hf_tensors(model.config, seed):
        targets[name].copy_(tensor)


def _check_names(model: LlamaForCausalLM, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ValueError naming every missing, unexpected and misshaped tensor."""
    targets = _targets(model)
    ignorable = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    # Rotary caches some exporters write are derived, never loaded.
    unexpected = sorted(
        k for k in shapes if k not in targets and k not in ignorable and not k.endswith("rotary_emb.inv_freq")
    )
    missing = sorted(k for k in targets if k not in shapes)
    misshaped = sorted(
        f"{k}: expected {tuple(t.shape)}, got {shapes[k]}"
        for k, t in targets.items()
        if k in shapes and shapes[k] != tuple(t.shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"misshaped tensors: {'; '.join(misshaped)}")
    if problems:
        raise ValueError(f"{source} does not match the model config: " + " | ".join(problems))


@torch.no_grad()
def load_hf_state_dict(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy HF-named tensors into `model`. Every expected tensor must be present with its exact
    shape; anything else is an error (a tied model ignores a stored `lm_head.weight`)."""
    _check_names(model, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    for name, target in _targets(model).items():
        target.copy_(tensors[name])


@torch.no_grad()
def load_safetensors(model: LlamaForCausalLM, path: str | Path) -> None:
    """Load HF-named weights from one .safetensors file, or from every *.safetensors file in a
    directory (sharded checkpoints). All names and shapes are checked before anything is
    copied; tensors are then read one at a time, so host memory holds one tensor, not the
    whole checkpoint."""
    from safetensors import safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {p}")
    with ExitStack() as stack:
        owner = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for name in handle.keys():
                owner[name] = handle
                shapes[name] = tuple(handle.get_slice(name).get_shape())
        _check_names(model, shapes, str(p))
        for name, target in _targets(model).items():
            target.copy_(owner[name].get_tensor(name))


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (contiguous CPU copies)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in _targets(model).items()}


def save_safetensors(model: LlamaForCausalLM, path: str | Path) -> None:
    """Save under HF names (a tied model stores no lm_head.weight, as HF does)."""
    from safetensors.torch import save_file

    save_file(hf_state_dict(model), str(path), metadata={"format": "pt"})


def build_model(
    config: ModelConfig,
    seed: int = 0,
    weights_path: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """A model in eval mode on `device` in the config's dtype: loaded from `weights_path` when
    given, else the random weights of `seed`."""
    # Built on the meta device and materialised once, in the target dtype, on the target
    # device: an 8B model never passes through a float32 CPU copy.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch_dtype(config.dtype)).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives each module a fresh parameter
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers come out of to_empty uninitialised; RoPE frequencies stay float32.
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    if weights_path is not None:
        load_safetensors(model, weights_path)
    else:
        init_weights(model, seed)
    return model.eval().requires_grad_(False)
