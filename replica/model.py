"""A Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache.

Two entry points share every layer: `forward` runs a flat batch of new tokens against the
paged cache (what the engine calls), `forward_dense` runs whole sequences with ordinary causal
SDPA (the reference the engine is tested against). They differ only in the `attend` function
handed to each layer.

Projections are fused (q|k|v and gate|up) to save matmul calls; replica.weights maps them to
and from the usual HF names. Numerics follow HF transformers' Llama (RMSNorm in float32, RoPE
with `rotate_half`, cos/sin computed in float32), so weights saved here load there.

`forward` can be told which sequences sample (`sample_seqs`): the last layer then still writes
every token's K/V but runs attention, o_proj and the MLP only for the last token of those
sequences, the only rows anything reads (a 128-token prefill chunk skips 127 of 128 rows there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels import AttentionMetadata, attention, write_kv
from replica.model_config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    from replica.lora_weights import LoraBatch

KVCache = tuple[torch.Tensor, torch.Tensor]
# (q [..., Hq, hd], k [..., Hkv, hd], v [..., Hkv, hd]) -> [..., Hq, hd]. In a flat batch q may
# hold only some rows (the last layer's sampled rows) while k, v hold every row.
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
    """positions: [S] int -> cos, sin: [S, 1, head_dim] in `dtype` (computed in float32), with
    the first half of sin negated: HF's `rotate_half(x) * sin` is `roll(x, hd/2) * sin` then."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, hd]
    sin = emb.sin()
    sin[:, : freqs.shape[1]].neg_()
    return emb.cos().to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., S, H, hd]; cos, sin: [S, 1, hd] from `rope_cos_sin` -> [..., S, H, hd]

    HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1)."""
    out = x * cos
    return out.addcmul_(x.roll(x.shape[-1] // 2, dims=-1), sin)


# ---------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's weight * (xf * rsqrt(mean(xf^2) + eps)).to(dtype), with in-place steps on fresh tensors
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))
        return y.to(x.dtype).mul_(self.weight)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn, rows: torch.Tensor | None = None,
        lora: LoraLayer | None = None,
    ) -> torch.Tensor:
        # x: [..., S, D]; rows: keep only these query rows (of a flat batch), see AttendFn
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)  # [..., S, q + 2kv]
        if lora is not None:
            q, kv = self.q_size, self.kv_size
            for proj, start, end in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
                lora.add(proj, x, qkv, start, end)
        qkv = qkv.unflatten(-1, (hq + 2 * hkv, self.head_dim))  # [..., S, Hq+2Hkv, hd]
        qk = apply_rope(qkv[..., : hq + hkv, :], cos, sin)  # q and k heads rotated at once
        q, k = qk.split([hq, hkv], dim=-2)  # [..., S, Hq, hd], [..., S, Hkv, hd]
        v = qkv[..., hq + hkv :, :]  # [..., S, Hkv, hd]
        if rows is not None:
            q = q[rows]  # [N, Hq, hd]
        o = attend(q, k, v).flatten(-2)  # [..., S or N, Hq*hd]
        out = self.o_proj(o)
        if lora is not None:
            lora.at(rows).add("o_proj", o, out, 0, out.shape[-1])
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraLayer | None = None) -> torch.Tensor:
        i = self.intermediate_size
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.add("gate_proj", x, gate_up, 0, i)
            lora.add("up_proj", x, gate_up, i, 2 * i)
        gate, up = gate_up.split(i, dim=-1)
        h = F.silu(gate).mul_(up)
        out = self.down_proj(h)
        if lora is not None:
            lora.add("down_proj", h, out, 0, out.shape[-1])
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn, rows: torch.Tensor | None = None,
        lora: LoraLayer | None = None,
    ) -> torch.Tensor:
        """x: [..., S, D] -> [..., S, D], or [N, D] for the query rows `rows` of a flat batch
        (every row's K/V still reaches `attend`). `lora`: the batch's adapters at this layer."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, attend, rows, lora)
        h += x if rows is None else x[rows]  # fresh tensors: adding in place is safe
        out = self.mlp(self.post_attention_layernorm(h), None if lora is None else lora.at(rows))
        out += h
        return out


class LoraLayer:
    """One layer's view of a step's `LoraBatch` (flat batches only: the torch engine's path)."""

    __slots__ = ("batch", "layer")

    def __init__(self, batch: LoraBatch, layer: int) -> None:
        self.batch = batch
        self.layer = layer

    def at(self, rows: torch.Tensor | None) -> LoraLayer:
        """This layer for the query rows `rows` only (None: every row)."""
        return self if rows is None else LoraLayer(self.batch.select(rows), self.layer)

    def add(self, proj: str, x: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
        self.batch.add(self.layer, proj, x, out, start, end)


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
    query_meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    # q: [T, Hq, hd], or [N, Hq, hd] for the queries described by query_meta; k, v: [T, Hkv, hd]
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    if query_meta is None:
        return attention(q, k_cache, v_cache, meta, scale, k, v)
    if q.shape[0] == 0:
        return q.new_empty(q.shape, dtype=k_cache.dtype)
    return attention(q, k_cache, v_cache, query_meta, scale)


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

    def _run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attends: Sequence[AttendFn],
        last_rows: torch.Tensor | None = None,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # [S, 1, hd], shared by all layers
        last = len(self.layers) - 1
        for i, (layer, attend) in enumerate(zip(self.layers, attends, strict=True)):
            x = layer(x, cos, sin, attend, last_rows if i == last else None, None if lora is None else LoraLayer(lora, i))
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
        sample_seqs: Sequence[int] | None = None,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 (a flat batch, see AttentionMetadata) -> hidden [T, D]
        after the final norm. Writes this step's K/V into `kv_caches` (one pair per layer).

        sample_seqs: indices (ascending) of the sequences whose last new token is sampled; the
        result is then only those tokens' hidden states, [len(sample_seqs), D], and the last
        layer computes nothing else past its K/V. `lora`: the LoRA adapters of the batch's rows
        (None: the base model for every row)."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        query_meta = last_rows = None
        if sample_seqs is not None and not (
            len(sample_seqs) == meta.num_tokens == meta.num_seqs  # every row is some sequence's last
        ):
            query_meta = meta.last_tokens(sample_seqs)
            last_rows = meta.query_start_loc[1:].to(torch.int64)[list(sample_seqs)] - 1
        attends = [partial(_paged_attend, k_cache=kc, v_cache=vc, meta=meta, scale=self.scale) for kc, vc in kv_caches]
        if query_meta is not None:
            attends[-1] = partial(attends[-1], query_meta=query_meta)
        x = self.embed_tokens(input_ids)  # [T, D]
        return self._run_layers(x, positions, attends, last_rows, lora)

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
