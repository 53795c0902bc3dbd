"""Paged-attention test cases shared by the kernel tests: sequences over shuffled cache blocks."""

from __future__ import annotations

import torch

from kernels import AttentionMetadata


def shuffled_tables(blocks_needed: list[int], num_blocks: int, g: torch.Generator) -> list[list[int]]:
    """One block table per sequence, each taking its share of a shuffled 0..num_blocks-1."""
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in blocks_needed:
        tables.append(perm[start : start + n])
        start += n
    return tables


def decode_case(seq_lens: list[int], block_size: int, hkv: int, gqa: int, head_dim: int, seed: int,
                spare_blocks: int, device: str = "cpu"):
    """One decode step of len(seq_lens) sequences over random caches: (q, k_cache, v_cache, meta),
    tensors on the CPU (`device`: where the metadata goes)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    tables = shuffled_tables(need, num_blocks, g)
    k_cache = torch.randn(num_blocks, block_size, hkv, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hkv, head_dim, generator=g)
    q = torch.randn(len(seq_lens), hkv * gqa, head_dim, generator=g)
    meta = AttentionMetadata.build(tables, seq_lens, [1] * len(seq_lens), block_size, device=device)
    return q, k_cache, v_cache, meta
