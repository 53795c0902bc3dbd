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

Reference strategy (`paged_attention`): all single-token sequences (decodes) go through one
vectorised gather + masked SDPA; each multi-token sequence (a prefill chunk) is one SDPA call,
`is_causal` when it has no cached prefix, otherwise with an explicit bottom-right causal mask.
Inputs to SDPA are 4-D, which is what selects torch's fused CPU kernel (3-D inputs fall back to
the slow math path).

Engine strategy (`attention`, what the model calls): the same computation, minus the work that
does not change from layer to layer. Every layer of a step shares the block tables, so the
gather indices, the padding mask and the prefill/decode split are computed once per step
(`AttentionMetadata.plan`, cached on the metadata) instead of once per layer; a prefill chunk
with no cached prefix attends over this step's K/V as computed instead of gathering them back
out of the cache, and a batch made only of such chunks of one length is a single SDPA call.
`AttentionMetadata.last_tokens` is the metadata of "only the last new token of these
sequences", for a last layer that skips the rows nothing samples from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from kernels import cpu_decode
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

    @cached_property
    def plan(self) -> StepPlan:
        """The layer-independent part of attention for this step, built on first use: every
        layer of a step calls attention with the same metadata, so it is built once per step.
        (A cached_property writes to the instance dict, which a frozen dataclass allows.)"""
        return StepPlan.build(self)

    def last_tokens(self, seqs: Sequence[int]) -> AttentionMetadata:
        """Metadata for a query of only the last new token of each of `seqs` (indices into
        this batch), over the same KV: a decode-only batch. For a last layer whose other rows
        nobody reads. Its slot_mapping holds those tokens' slots."""
        idx = torch.tensor(list(seqs), dtype=torch.int64, device=self.block_tables.device)
        last_rows = self.query_start_loc[1:].to(torch.int64).index_select(0, idx) - 1
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.index_select(0, last_rows),
            block_tables=self.block_tables.index_select(0, idx),
            seq_lens=self.seq_lens.index_select(0, idx),
            query_start_loc=torch.arange(len(seqs) + 1, dtype=torch.int32, device=self.block_tables.device),
            query_lens=(1,) * len(seqs),
            seq_lens_list=tuple(self.seq_lens_list[i] for i in seqs),
            block_size=self.block_size,
        )

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


@dataclass(frozen=True)
class DecodeGroup:
    """A step's single-token sequences as one batch: what their attention needs besides q."""

    tokens: torch.Tensor | None  # [Bd] int64 rows of their tokens in q; None: every row, in order
    blocks: torch.Tensor  # [Bd * nblk] int64: each sequence's first nblk block ids, row-major
    num_blocks: int  # nblk = ceil(length / block_size)
    length: int  # L: the longest KV length among them
    lens: torch.Tensor  # [Bd] int64: each sequence's KV length
    ragged: bool  # some sequence is shorter than L

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """[Bd, 1, 1, L] bool, True where position < seq_len; None when all are L. Built on first
        use, once per step: only the torch path reads it (the C kernel goes by `lens`)."""
        if not self.ragged:
            return None
        pos = torch.arange(self.length, device=self.lens.device)
        return (pos[None, :] < self.lens[:, None])[:, None, None, :]


@dataclass(frozen=True)
class PrefillChunk:
    """One multi-token sequence of a step: q rows start .. start + query_len - 1."""

    seq: int
    start: int
    query_len: int
    seq_len: int

    @property
    def has_prefix(self) -> bool:
        return self.seq_len > self.query_len


@dataclass(frozen=True)
class StepPlan:
    """The layer-independent part of one step's attention (see `AttentionMetadata.plan`)."""

    decode: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]
    uniform_prefill: bool  # every sequence is a chunk of the same length with no cached prefix

    @classmethod
    def build(cls, meta: AttentionMetadata) -> StepPlan:
        starts = meta.query_start_loc.tolist()
        decode_seqs = [i for i, q in enumerate(meta.query_lens) if q == 1]
        prefills = tuple(
            PrefillChunk(i, starts[i], q, s)
            for i, (q, s) in enumerate(zip(meta.query_lens, meta.seq_lens_list))
            if q > 1
        )
        uniform = (
            not decode_seqs
            and len({c.query_len for c in prefills}) == 1
            and not any(c.has_prefix for c in prefills)
        )
        decode = None
        if decode_seqs:
            dev = meta.block_tables.device
            if len(decode_seqs) == meta.num_seqs:
                tokens, tables, lens_t, lens = None, meta.block_tables, meta.seq_lens, meta.seq_lens_list
            else:
                idx = torch.tensor(decode_seqs, dtype=torch.int64, device=dev)
                tokens = torch.tensor([starts[i] for i in decode_seqs], dtype=torch.int64, device=dev)
                tables, lens_t = meta.block_tables.index_select(0, idx), meta.seq_lens.index_select(0, idx)
                lens = [meta.seq_lens_list[i] for i in decode_seqs]
            length = max(lens)
            nblk = -(-length // meta.block_size)
            blocks = tables[:, :nblk].to(torch.int64).reshape(-1)
            decode = DecodeGroup(tokens, blocks, nblk, length, lens_t.to(torch.int64), min(lens) < length)
        return cls(decode, prefills, uniform)


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


def _planned_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup, scale: float
) -> torch.Tensor:
    """`_decode_attention` with the gather indices and mask of `group`. q: [Bd, Hq, D] -> [Bd, Hq, D]

    With the C kernel built and float32 caches, `kernels.cpu_decode` computes the same without
    gathering the blocks into a copy first (2-2.5x faster at batch 32 and long contexts)."""
    if cpu_decode.usable(q, k_cache, v_cache):
        return cpu_decode.decode(q, k_cache, v_cache, group.blocks, group.lens, scale, check_values=False)
    n, bs, hkv, d = k_cache.shape
    b, width = q.shape[0], group.num_blocks * bs
    k = k_cache.view(n, bs * hkv * d).index_select(0, group.blocks).view(b, width, hkv, d)
    v = v_cache.view(n, bs * hkv * d).index_select(0, group.blocks).view(b, width, hkv, d)
    k = k[:, : group.length].transpose(1, 2)  # [Bd, Hkv, L, D]
    v = v[:, : group.length].transpose(1, 2)  # [Bd, Hkv, L, D]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).to(k.dtype), k, v, attn_mask=group.mask, scale=scale, enable_gqa=True
    )  # [Bd, Hq, 1, D]
    return out.squeeze(2)


def _causal_over_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of B equal-length chunks with no cached prefix over their own K/V.

    q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] -> [B, S, Hq, D]
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )  # [B, Hq, S, D]
    return out.transpose(1, 2)


def planned_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention`, computed from the per-step `meta.plan` (what the engine runs on CPU).

    k, v: [T, Hkv, D], optional: this step's new K/V, row for row with q (as written by
    `write_kv`); a chunk with no cached prefix then attends over them directly instead of
    reading them back from the cache. Same shapes and result as `paged_attention`.
    """
    num_tokens, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} KV heads")
    if k_cache.shape[-1] != d:
        raise ValueError(f"head dim of q ({d}) and of the KV cache ({k_cache.shape[-1]}) differ")
    plan = meta.plan
    dtype = k_cache.dtype
    if plan.decode is not None and plan.decode.tokens is None:
        return _planned_decode(q, k_cache, v_cache, plan.decode, scale)
    have_new = k is not None and v is not None
    if plan.uniform_prefill and have_new:
        b, s = meta.num_seqs, meta.query_lens[0]
        out = _causal_over_new(q.view(b, s, hq, d).to(dtype), k.view(b, s, hkv, d).to(dtype),
                               v.view(b, s, hkv, d).to(dtype), scale)
        return out.reshape(num_tokens, hq, d)

    out = torch.empty(num_tokens, hq, d, dtype=dtype, device=q.device)
    for c in plan.prefills:
        rows = slice(c.start, c.start + c.query_len)
        if have_new and not c.has_prefix:
            out[rows] = _causal_over_new(q[None, rows].to(dtype), k[None, rows].to(dtype),
                                         v[None, rows].to(dtype), scale)[0]
        else:
            out[rows] = _prefill_attention(q[rows], k_cache, v_cache, meta.block_tables[c.seq], c.seq_len, scale)
    if plan.decode is not None:
        tokens = plan.decode.tokens
        out[tokens] = _planned_decode(q[tokens], k_cache, v_cache, plan.decode, scale)
    return out


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention on the best path for the device.

    CUDA: the Triton decode kernel for decode-only batches when triton imports, the torch
    reference for everything else. CPU: `planned_paged_attention` (the reference's computation
    with its per-step work done once per step). k, v: this step's new K/V, see
    `planned_paged_attention`.
    """
    if q.is_cuda:
        if meta.is_decode_only and triton_available():
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        return paged_attention(q, k_cache, v_cache, meta, scale)
    return planned_paged_attention(q, k_cache, v_cache, meta, scale, k, v)
