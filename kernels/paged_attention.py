"""Paged attention in plain torch: the reference that runs on CPU and CUDA.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, Hkv, D]`. Sequence i
owns the blocks listed in `block_tables[i]`; its KV position p lives in block
`block_tables[i, p // block_size]` at offset `p % block_size`, i.e. at flat slot
`block_id * block_size + offset`:

    block_tables[i] = [7, 2, 5, 0, 0]      (padded with 0)     block_size = 4
    positions         0..3  4..7  8..10
    slots            28..31 8..11 20..22

One step runs a flat batch of B sequences. Sequence i brings `query_lens[i]` new tokens
(q[query_start_loc[i]:query_start_loc[i+1]]) at KV positions
`seq_lens[i] - query_lens[i] .. seq_lens[i] - 1`; positions before that are a cached prefix
written in an earlier step. `write_kv` stores this step's K/V first, then `paged_attention`
lets each new token attend causally to every KV position up to and including its own.

CPU strategy: all single-token sequences (decodes) go through one vectorised gather + masked
SDPA; each multi-token sequence (a prefill chunk) is one SDPA call, `is_causal` when it has no
cached prefix, otherwise with an explicit bottom-right causal mask. Inputs to SDPA are 4-D,
which is what selects torch's fused CPU kernel (3-D inputs fall back to the slow math path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.triton_paged_attention import paged_decode_attention, triton_available


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's flat batch of B sequences; T = total new tokens = query_start_loc[-1]."""

    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (block_id * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: KV length of each sequence after this step (cached + new)
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative new-token counts
    query_lens: tuple[int, ...]  # same info as python ints (no device sync in python loops)
    seq_lens_list: tuple[int, ...]
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if len(self.query_lens) != len(self.seq_lens_list):
            raise ValueError(
                f"query_lens has {len(self.query_lens)} entries but seq_lens_list has {len(self.seq_lens_list)}"
            )
        for i, (q, s) in enumerate(zip(self.query_lens, self.seq_lens_list)):
            if q < 1 or q > s:
                raise ValueError(f"sequence {i}: need 1 <= query_len <= seq_len, got query_len={q}, seq_len={s}")

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence brings exactly one new token."""
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from python lists: each sequence's block ids, KV length after the step,
        and number of new tokens. Slots of the new tokens are derived from the block tables.
        A python loop over tokens: for tests and simple callers, not a runner's hot path."""
        if not (len(block_tables) == len(seq_lens) == len(query_lens)):
            raise ValueError("block_tables, seq_lens and query_lens must have one entry per sequence")
        slots: list[int] = []
        for i, (table, s, q) in enumerate(zip(block_tables, seq_lens, query_lens)):
            if len(table) * block_size < s:
                raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold {s} tokens")
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s - q, s))
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(padded), width),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            query_lens=tuple(int(q) for q in query_lens),
            seq_lens_list=tuple(int(s) for s in seq_lens),
            block_size=block_size,
        )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys and values at their flat slots, in place.

    k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping: [T].
    Every slot must be valid (no padding slots).
    """
    num_blocks, block_size, hkv, d = k_cache.shape
    # A view, not a copy: the caches are allocated contiguous.
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous KV of the first `length` positions through a list of blocks.

    cache: [N, bs, Hkv, D]; block_ids: [..., nblk] -> [..., length, Hkv, D]
    """
    n, bs, hkv, d = cache.shape
    # index_select on whole flattened blocks: several times faster on CPU than advanced indexing.
    rows = cache.view(n, bs * hkv * d).index_select(0, block_ids.reshape(-1))  # [... * nblk, bs*Hkv*D]
    flat = rows.view(*block_ids.shape[:-1], block_ids.shape[-1] * bs, hkv, d)  # [..., nblk * bs, Hkv, D]
    return flat[..., :length, :, :]


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence, all sequences at once.

    q: [B, Hq, D]; block_tables: [B, M]; seq_lens: [B] -> [B, Hq, D]
    """
    block_size = k_cache.shape[1]
    nblk = -(-max_seq_len // block_size)
    blocks = block_tables[:, :nblk]  # [B, nblk]
    k = _gather_kv(k_cache, blocks, max_seq_len).transpose(1, 2)  # [B, Hkv, L, D]
    v = _gather_kv(v_cache, blocks, max_seq_len).transpose(1, 2)  # [B, Hkv, L, D]
    pos = torch.arange(max_seq_len, device=q.device)
    mask = (pos[None, :] < seq_lens[:, None].to(pos.dtype))[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).to(k.dtype), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [B, Hq, 1, D]
    return out.squeeze(2)


def _prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's chunk of new tokens over its whole KV (cached prefix + this chunk).

    q: [Q, Hq, D]; block_table: [M] -> [Q, Hq, D]
    """
    query_len = q.shape[0]
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)]
    k = _gather_kv(k_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
    v = _gather_kv(v_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
    qh = q.transpose(0, 1).unsqueeze(0).to(k.dtype)  # [1, Hq, Q, D]
    cached = seq_len - query_len
    if cached == 0:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # New token j sits at position cached + j and sees positions 0..cached + j.
        mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=q.device).tril(cached)  # [Q, S]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)  # [Q, Hq, D]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of this step's new tokens over their sequences' paged KV.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (already holding this
    step's K/V, see `write_kv`) -> [T, Hq, D] in k_cache's dtype. Hq must be a multiple of Hkv;
    query head h reads KV head h // (Hq // Hkv), as in HF's `repeat_kv`.
    """
    num_tokens, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} KV heads")
    if k_cache.shape[-1] != d:
        raise ValueError(f"head dim of q ({d}) and of the KV cache ({k_cache.shape[-1]}) differ")
    if meta.is_decode_only:
        return _decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, max(meta.seq_lens_list), scale
        )

    out = torch.empty(num_tokens, hq, d, dtype=k_cache.dtype, device=q.device)
    decode_seqs: list[int] = []
    decode_tokens: list[int] = []
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens_list)):
        if query_len == 1:
            decode_seqs.append(i)
            decode_tokens.append(start)
        else:
            out[start : start + query_len] = _prefill_attention(
                q[start : start + query_len], k_cache, v_cache, meta.block_tables[i], seq_len, scale
            )
        start += query_len
    if decode_seqs:
        seqs = torch.tensor(decode_seqs, dtype=torch.int64, device=q.device)
        tokens = torch.tensor(decode_tokens, dtype=torch.int64, device=q.device)
        out[tokens] = _decode_attention(
            q[tokens],
            k_cache,
            v_cache,
            meta.block_tables[seqs],
            meta.seq_lens[seqs],
            max(meta.seq_lens_list[i] for i in decode_seqs),
            scale,
        )
    return out


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """`paged_attention`, on the Triton decode kernel when it applies.

    The kernel serves decode-only batches on CUDA when triton imports; everything else (CPU,
    prefill chunks, mixed batches) runs the torch reference.
    """
    if q.is_cuda and meta.is_decode_only and triton_available():
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    return paged_attention(q, k_cache, v_cache, meta, scale)
