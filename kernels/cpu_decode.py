"""The CPU engine's paged decode attention in C (kernels/_cpu_decode.c), with its checks.

`decode(q, k_cache, v_cache, blocks, lens, scale)` computes what `_planned_decode` computes —
each single-token sequence's query against its KV blocks — without gathering the blocks into
a copy first. Used by `planned_paged_attention` when the extension is built (`NATIVE`) and the
tensors are what it reads (float32 on CPU, contiguous caches); the torch path otherwise.
"""

from __future__ import annotations

import torch

try:
    from kernels._cpu_decode import decode as _decode
except ImportError:  # not built: the torch path is used
    _decode = None

NATIVE = _decode is not None


def usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether `decode` can run on these tensors (else use the torch path)."""
    return (NATIVE and not q.is_cuda and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and v_cache.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.stride(-1) == 1 and q.stride(-2) == q.shape[-1])


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, lens: torch.Tensor,
           scale: float, check_values: bool = True) -> torch.Tensor:
    """q: [B, Hq, D] (rows may be strided, heads contiguous); caches [N, block_size, Hkv, D];
    blocks: [B * nblk] int64, each sequence's first nblk block ids; lens: [B] int64 KV lengths
    (each <= nblk * block_size) -> [B, Hq, D].

    check_values=False skips the range checks of lengths and block ids (four reductions): for a
    caller whose plan built them from the engine's own block tables (`planned_paged_attention`)."""
    if not usable(q, k_cache, v_cache):
        raise ValueError("cpu_decode needs float32 CPU tensors, contiguous caches and q heads contiguous")
    b, hq, d = q.shape
    n, bs, hkv, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}")
    blocks = blocks.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    if lens.numel() != b or (b and blocks.numel() % b):
        raise ValueError(f"{b} sequences but {lens.numel()} lengths and {blocks.numel()} block ids")
    nblk = blocks.numel() // b if b else 0
    if check_values and b and (int(lens.max()) > nblk * bs or int(lens.min()) < 0):
        raise ValueError(f"a length is outside [0, {nblk * bs}] (nblk {nblk} x block size {bs})")
    if check_values and blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= n):
        raise ValueError(f"a block id is outside the cache's {n} blocks")
    out = torch.empty(b, hq, d, dtype=torch.float32)
    _decode(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), blocks.data_ptr(), nblk,
            lens.data_ptr(), out.data_ptr(), b, hq, hkv, d, bs, float(scale))
    return out
