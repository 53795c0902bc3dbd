"""A Triton paged-attention decode kernel: one new token per sequence, GQA, online softmax.

Importable without triton or CUDA: `triton_available()` says whether it can run.

Grid: one program per (sequence, KV head). A program loads the GROUP query heads that share
its KV head, then walks the sequence's KV positions in tiles of TILE tokens. Each tile's
positions are mapped through the block table one by one (`block_tables[seq, pos // bs]`), so
any block size works, including 1 and sizes that are not powers of two. Scores and the running
max / sum / accumulator of the online softmax are kept in float32
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the same recurrence
as FlashAttention).

The products q·k and p·v are broadcast-multiply-and-sum rather than `tl.dot`, which would
need every dimension >= 16 (GROUP is often 1..8). Decode is bound by reading the KV cache, not
by arithmetic, so this costs little. Long contexts with few sequences would gain from a
split-KV (flash-decoding) variant; this kernel does not split.
"""

from __future__ import annotations

import torch

try:  # triton is only present with CUDA builds of torch
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _HAS_TRITON = False


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present."""
    return _HAS_TRITON and torch.cuda.is_available()


def _next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


if _HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        out_ptr,
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        seq_lens_ptr,
        scale,
        stride_q_t,
        stride_q_h,
        stride_k_b,
        stride_k_s,
        stride_k_h,
        stride_v_b,
        stride_v_s,
        stride_v_h,
        stride_bt,
        stride_o_t,
        stride_o_h,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PADDED_D: tl.constexpr,
        GROUP: tl.constexpr,
        PADDED_G: tl.constexpr,
        TILE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)

        offs_g = tl.arange(0, PADDED_G)
        offs_d = tl.arange(0, PADDED_D)
        offs_t = tl.arange(0, TILE)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kv_head * GROUP + offs_g  # query heads served by this KV head
        qo_mask = g_mask[:, None] & d_mask[None, :]

        q_ptrs = q_ptr + seq.to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :]
        q = tl.load(q_ptrs, mask=qo_mask, other=0.0).to(tl.float32) * scale  # [G, D]

        m_i = tl.full([PADDED_G], float("-inf"), dtype=tl.float32)  # running max
        l_i = tl.zeros([PADDED_G], dtype=tl.float32)  # running sum of exp
        acc = tl.zeros([PADDED_G, PADDED_D], dtype=tl.float32)  # running sum of exp * v

        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_k_h
        v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_v_h
        for start in range(0, seq_len, TILE):
            pos = start + offs_t  # [TILE]
            t_mask = pos < seq_len
            block_id = tl.load(bt_row + pos // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
            offset = (pos % BLOCK_SIZE).to(tl.int64)
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_head + block_id[:, None] * stride_k_b + offset[:, None] * stride_k_s + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)  # [TILE, D]
            v = tl.load(
                v_head + block_id[:, None] * stride_v_b + offset[:, None] * stride_v_s + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)  # [TILE, D]

            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, TILE]
            s = tl.where(t_mask[None, :], s, float("-inf"))
            # The tile's first position is always valid, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [G]
            alpha = tl.exp(m_i - m_new)  # [G]; exp(-inf) = 0 on the first tile
            p = tl.exp(s - m_new[:, None])  # [G, TILE]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, D]
            m_i = m_new

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # seq_len 0: output zeros, not NaN
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=qo_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention with the Triton kernel (CUDA only).

    q: [B, Hq, D] (one new token per sequence, its K/V already written);
    k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, M] int32;
    seq_lens: [B] int32 (KV length including the new token) -> [B, Hq, D] in q's dtype.
    """
    if not triton_available():
        raise RuntimeError("the Triton decode kernel needs triton and a CUDA device")
    num_seqs, hq, d = q.shape
    _, block_size, hkv, dk = k_cache.shape
    if hq % hkv != 0:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} KV heads")
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if block_tables.shape[0] != num_seqs or seq_lens.shape[0] != num_seqs:
        raise ValueError("block_tables and seq_lens need one row per sequence")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the last dimension of q and of the caches must be contiguous")
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = hq // hkv
    padded_d = _next_pow2(d)
    # Keep the [G, TILE, D] broadcast product near 4K float32 values per program.
    tile = max(16, min(64, 4096 // (_next_pow2(group) * padded_d)))
    _paged_decode_kernel[(num_seqs, hkv)](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        float(scale),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        PADDED_D=padded_d,
        GROUP=group,
        PADDED_G=_next_pow2(group),
        TILE=_next_pow2(tile),
        num_warps=4,
    )
    return out
