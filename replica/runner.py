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
from replica.kv_offload_store import TierStore
from replica.lora import AdapterSlots
from replica.lora_weights import LoraBatch
from replica.model import LlamaForCausalLM
from replica.sampling import sample
from replica.scheduler import SchedulerOutput


class ModelRunner:
    has_logits = True  # it can report logprobs (the simulated executor cannot)
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        kv: KVCacheManager,
        seed: int = 0,
        device: str | torch.device = "cpu",
        loras: AdapterSlots | None = None,
        tier_store: TierStore | None = None,
    ) -> None:
        self.model = model
        # The KV offload tiers' bytes (replica/kv_offload_store.py): the copies the KV cache
        # manager queued are made before each forward pass. None: no tiers.
        self.tier_store = tier_store
        self.moves_kv = tier_store is not None
        self.loras = loras  # the served LoRA adapters (their `load` makes `LoraWeights`)
        self.kv_caches = kv_caches
        self.kv = kv
        self.block_size = kv.block_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def _build(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat batch tensors for one step; the last item is the batch indices of the sequences
        that sample. Per request only python ints and lists are touched; positions and slots
        are computed for the whole batch at once in numpy."""
        bs = self.block_size
        n = len(out.scheduled)
        ids: list[int] = []
        tables: list[list[int]] = []
        starts = np.empty(n, dtype=np.int64)
        query_lens = np.empty(n, dtype=np.int64)
        sample_seqs: list[int] = []
        for i, (req, num_new, do_sample) in enumerate(out.scheduled):
            start = req.num_computed_tokens
            if num_new == 1:
                ids.append(req.token_ids[start])
            else:
                ids.extend(req.token_ids[start : start + num_new])
            tables.append(self.kv.block_ids(req.request_id))
            starts[i] = start
            query_lens[i] = num_new
            if do_sample:
                sample_seqs.append(i)
        max_blocks = max(len(t) for t in tables)
        table_arr = np.zeros((n, max_blocks), dtype=np.int64)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        seq_lens = starts + query_lens
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(query_lens, out=qsl[1:])
        if len(ids) == n:  # one token per sequence
            seq_of_token, positions = np.arange(n), starts
        else:
            seq_of_token = np.repeat(np.arange(n), query_lens)
            positions = np.arange(len(ids), dtype=np.int64) + np.repeat(starts - qsl[:-1], query_lens)
        slots = table_arr[seq_of_token, positions // bs] * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(table_arr.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            query_lens=tuple(query_lens.tolist()),
            seq_lens_list=tuple(seq_lens.tolist()),
            block_size=bs,
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        return input_ids, torch.from_numpy(positions).to(dev), meta, sample_seqs

    def _lora_batch(self, out: SchedulerOutput, meta: AttentionMetadata) -> LoraBatch | None:
        """The step's adapters (loaded now if not resident) and each token row's; None when no
        scheduled request names one. The scheduler keeps a batch within max_loras adapters."""
        names = [s.request.lora_name for s in out.scheduled]
        if self.loras is None or not any(names):
            return None
        order = list(dict.fromkeys(n for n in names if n is not None))
        self.loras.activate(order)
        index = {n: i for i, n in enumerate(order)}
        per_seq = torch.tensor([index[n] if n is not None else -1 for n in names], dtype=torch.int64)
        token_adapter = per_seq.repeat_interleave(torch.tensor(meta.query_lens, dtype=torch.int64))
        return LoraBatch([self.loras.get(n) for n in order], token_adapter.to(self.device))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of each request that samples."""
        if self.tier_store is not None:
            self.tier_store.apply(self.kv.take_transfers())
        if out.empty:
            return {}
        input_ids, positions, meta, sample_seqs = self._build(out)
        lora = self._lora_batch(out, meta)
        # hidden: [N, D] for the last token of each sampling sequence only
        hidden = self.model(input_ids, positions, self.kv_caches, meta, sample_seqs=sample_seqs, lora=lora)
        if not sample_seqs:
            return {}
        sampling = [out.scheduled[i].request for i in sample_seqs]
        logits = self.model.compute_logits(hidden).cpu()  # [N, V]
        want = [i for i, r in enumerate(sampling) if r.params.logprobs is not None]
        # The model's own distribution (vLLM's default "raw_logprobs"), before min_tokens' bans,
        # temperature, top-k and top-p change the logits that `sample` draws from.
        logprobs = torch.log_softmax(logits[want].float(), dim=-1) if want else None
        tokens = sample(logits, sampling, self.generator)
        for j, i in enumerate(want):
            req, row = sampling[i], logprobs[j]
            k = req.params.logprobs
            top = row.topk(k) if k else None
            req.new_logprobs = (float(row[tokens[i]]), tuple(zip(top.indices.tolist(), top.values.tolist()))
                                if top is not None else ())
        return {req.request_id: tok for req, tok in zip(sampling, tokens)}
