"""A Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache.

Two entry points share every layer: `forward` runs a flat batch of new tokens against the
paged cache (what the engine calls), `forward_dense` runs whole sequences with ordinary causal
SDPA (the reference the engine is tested against). They differ only in the `attend` function
handed to each layer.

Projections are fused (q|k|v and gate|up) to save matmul calls; replica.weights maps them to
and from the usual HF names. Numerics follow HF transformers' Llama (RMSNorm in float32, RoPE
with `rotate_half`, cos/sin computed in float32), so weights saved here load there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kernels import AttentionMetadata, attention, write_kv
from replica.model_config import ModelConfig, RopeScaling

KVCache = tuple[torch.Tensor, torch.Tensor]
# (q [..., Hq, hd], k [..., Hkv, hd], v [..., Hkv, hd]) -> [..., Hq, hd]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[name]


# ---------------------------------------------------------------- RoPE (pure functions)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotated pairs: [head_dim // 2] float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1 scaling, as in HF transformers `_compute_llama3_parameters`: long wavelengths
    # are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [S] int -> cos, sin: [S, head_dim] in `dtype` (computed in float32)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., S, H, hd]; cos, sin: [S, hd] -> [..., S, H, hd]"""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [S, 1, hd]
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        # x: [..., S, D]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # [..., S, Hq, hd]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [..., S, Hkv, hd]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [..., S, Hkv, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(q, k, v)  # [..., S, Hq, hd]
        return self.o_proj(o.flatten(-2))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------- attend functions


def _paged_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    # q: [T, Hq, hd]; k, v: [T, Hkv, hd]
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attention(q, k_cache, v_cache, meta, scale)


def _dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    # q: [B, S, Hq, hd]; k, v: [B, S, Hkv, hd]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )  # [B, Hq, S, hd]
    return o.transpose(1, 2)


# ---------------------------------------------------------------- model


class LlamaForCausalLM(nn.Module):
    """Build it with `replica.weights.build_model`, which materialises the weights (seeded
    random or loaded) in the config's dtype and keeps the RoPE frequencies in float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.scale = config.head_dim**-0.5
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling), persistent=False
        )

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, attends: Sequence[AttendFn]) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # [S, hd]
        for layer, attend in zip(self.layers, attends, strict=True):
            x = layer(x, cos, sin, attend)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 (a flat batch, see AttentionMetadata) -> hidden [T, D]
        after the final norm. Writes this step's K/V into `kv_caches` (one pair per layer)."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        attends = [
            partial(_paged_attend, k_cache=kc, v_cache=vc, meta=meta, scale=self.scale) for kc, vc in kv_caches
        ]
        x = self.embed_tokens(input_ids)  # [T, D]
        return self._run_layers(x, positions, attends)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> logits [N, V] float32"""
        return self.lm_head(hidden).float()

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, S] -> logits [B, S, V] float32: plain causal attention, no cache."""
        attend = partial(_dense_attend, scale=self.scale)
        x = self.embed_tokens(input_ids)  # [B, S, D]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self._run_layers(x, positions, [attend] * len(self.layers))
        return self.compute_logits(hidden)
