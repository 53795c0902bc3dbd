"""KV-cache sizing and allocation: one (k_cache, v_cache) pair of [num_blocks, block_size, Hkv, D]
tensors per layer. Which block belongs to which sequence is the block pool's business."""

from __future__ import annotations

import torch

from replica.model import torch_dtype
from replica.model_config import ModelConfig


def kv_bytes_per_block(config: ModelConfig, block_size: int) -> int:
    """Bytes one block takes across all layers, keys and values."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * config.dtype_bytes


def num_blocks_for_budget(config: ModelConfig, block_size: int, budget_bytes: int) -> int:
    """How many whole blocks fit in `budget_bytes`."""
    if budget_bytes < 0:
        raise ValueError(f"budget must be non-negative, got {budget_bytes}")
    return int(budget_bytes) // kv_bytes_per_block(config, block_size)


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed caches, one (k, v) pair per layer, each [num_blocks, block_size, Hkv, D] in the
    config's dtype. Zeros matter: padded block-table entries read block 0 under a mask, and
    masked-out values must be finite."""
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    dtype = torch_dtype(config.dtype)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]
