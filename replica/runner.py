"""The model runner: the only part of the engine that builds tensors.

For one `SchedulerOutput` it lays the scheduled chunks end to end into a flat batch
(input ids, positions, KV slot of every new token, block tables, sequence lengths), runs the
model over the paged KV cache, and samples one token for every request whose chunk reached
its last known token.

    request A: computed 32, new 16 (prefill chunk)  ─┐
    request B: computed 70, new 1  (decode)          ├─▶ input_ids [T=18], positions [T]
    request C: computed 8,  new 1  (decode)         ─┘   slot_mapping [T], block_tables [3, max]
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.paged_attention import AttentionMetadata
from replica.kv_cache_manager import KVCacheManager
from replica.model import LlamaForCausalLM
from replica.sampling import sample
from replica.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        kv: KVCacheManager,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.kv = kv
        self.block_size = kv.block_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def _build(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids_parts: list[list[int]] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        tables: list[list[int]] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        offset = 0
        for req, num_new, do_sample in out.scheduled:
            start = req.num_computed_tokens
            end = start + num_new
            ids_parts.append(req.token_ids[start:end])
            positions = np.arange(start, end, dtype=np.int64)
            block_ids = self.kv.block_ids(req.request_id)
            table = np.asarray(block_ids, dtype=np.int64)
            slot_parts.append(table[positions // bs] * bs + positions % bs)
            pos_parts.append(positions)
            tables.append(block_ids)
            query_lens.append(num_new)
            seq_lens.append(end)
            offset += num_new
            if do_sample:
                logit_rows.append(offset - 1)
        max_blocks = max(len(t) for t in tables)
        table_arr = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device
        input_ids = torch.tensor([t for part in ids_parts for t in part], dtype=torch.int64, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_parts)).to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts)).to(dev),
            block_tables=torch.from_numpy(table_arr).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            query_lens=tuple(query_lens),
            seq_lens_list=tuple(seq_lens),
            block_size=bs,
        )
        return input_ids, positions, meta, logit_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of each request that samples."""
        if out.empty:
            return {}
        input_ids, positions, meta, logit_rows = self._build(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, D]
        sampling = [s.request for s in out.scheduled if s.sample]
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[logit_rows])  # [N, V]
        tokens = sample(logits.cpu(), sampling, self.generator)
        return {req.request_id: tok for req, tok in zip(sampling, tokens)}
