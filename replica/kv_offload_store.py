"""The bytes of the KV offload tiers for the torch engine, and the copies between them.

One tensor per tier holds every layer's keys and values of each slot:

    host:  torch.empty([L, 2, slots, block_size, Hkv, D])            (pinned when the device is CUDA)
    disk:  the same shape over a file (`torch.from_file(..., shared=True)`: a shared mmap, so
           the OS writes it back to the file and pages it in on a load; the file is created
           empty at start: the tier keeps nothing across restarts)

`apply(transfers)` makes the queued copies (replica.kv_offload.Transfer) in order. Consecutive
copies of one kind (e.g. GPU to CPU) go as one gather/scatter per layer, split where a later copy
of the run reads or writes a block an earlier one writes, so the order is kept exactly.
Bytes and seconds per vLLM `transfer_type` go to the tiers' `TransferTotals`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from replica.kv_offload import MEDIUM_CPU, MEDIUM_DISK, MEDIUM_GPU, OffloadTiers, Transfer, check_disk_path
from replica.model import torch_dtype
from replica.model_config import ModelConfig


class TierStore:
    """The slots of each tier of `tiers` in memory (host) or a file (disk), and the copier."""

    def __init__(self, config: ModelConfig, block_size: int, tiers: OffloadTiers,
                 device_caches: list[tuple[torch.Tensor, torch.Tensor]], disk_path: str | None = None) -> None:
        self.tiers = tiers
        self.device_caches = device_caches
        self.block_size = block_size
        dtype = torch_dtype(config.dtype)
        per_slot = (block_size, config.num_kv_heads, config.head_dim)
        self.block_bytes = 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * config.dtype_bytes
        pin = device_caches[0][0].is_cuda and torch.cuda.is_available()
        self._media: dict[str, torch.Tensor] = {}
        for tier in tiers.tiers:
            shape = (config.num_layers, 2, tier.num_blocks, *per_slot)
            if tier.medium == MEDIUM_CPU:
                self._media[MEDIUM_CPU] = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            elif tier.medium == MEDIUM_DISK:
                self._media[MEDIUM_DISK] = _file_tensor(check_disk_path(disk_path), shape, dtype)
        self.disk_path = disk_path

    def _view(self, medium: str, layer: int, kv: int) -> torch.Tensor:
        """[blocks or slots, block_size, Hkv, D] of one layer's keys (kv=0) or values (kv=1)."""
        if medium == MEDIUM_GPU:
            return self.device_caches[layer][kv]
        return self._media[medium][layer, kv]

    def apply(self, transfers: Sequence[Transfer]) -> None:
        """Make the copies in order (a no-op for [])."""
        i = 0
        while i < len(transfers):
            j, kind = i, (transfers[i].src_medium, transfers[i].dst_medium)
            written: set[int] = set()
            # A run reads all its sources before it writes (source and destination are different
            # media), so only a destination written twice must split it.
            while j < len(transfers):
                t = transfers[j]
                if (t.src_medium, t.dst_medium) != kind or t.dst in written:
                    break
                written.add(t.dst)
                j += 1
            self._copy_run(transfers[i:j])
            i = j

    def _copy_run(self, run: Sequence[Transfer]) -> None:
        src_medium, dst_medium = run[0].src_medium, run[0].dst_medium
        start = time.perf_counter()
        src_dev = self._view(src_medium, 0, 0).device
        dst_dev = self._view(dst_medium, 0, 0).device
        src_idx = torch.tensor([t.src for t in run], dtype=torch.int64, device=src_dev)
        dst_idx = torch.tensor([t.dst for t in run], dtype=torch.int64, device=dst_dev)
        for layer in range(len(self.device_caches)):
            for kv in (0, 1):
                src = self._view(src_medium, layer, kv)
                dst = self._view(dst_medium, layer, kv)
                dst.index_copy_(0, dst_idx, src.index_select(0, src_idx).to(dst.device, non_blocking=False))
        if dst_medium == MEDIUM_GPU and dst_dev.type == "cuda":
            torch.cuda.synchronize(dst_dev)
        self.tiers.totals.add(run[0].transfer_type, len(run), len(run) * self.block_bytes,
                              time.perf_counter() - start)


def _file_tensor(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor of `shape` backed by the file at `path` (created or truncated to size)."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    with open(path, "wb") as f:  # a fresh, sparse file of the tier's size: the tier starts empty
        f.truncate(nbytes)
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
