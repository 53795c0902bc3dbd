"""Paged attention against dense causal attention on contiguous K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import AttentionMetadata, attention, paged_attention, triton_available, write_kv
from kernels.paged_attention import planned_paged_attention
from kernels.triton_paged_attention import paged_decode_attention
from tests.attention_utils import decode_case, shuffled_tables

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD_DIM = 16
HKV = 2


def _dense_reference(q_new: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, scale: float) -> torch.Tensor:
    """Full causal attention over the whole sequence, then the rows of the new tokens.

    q_new: [Q, Hq, D]; k_all, v_all: [S, Hkv, D] -> [Q, Hq, D]. The query rows of the cached
    positions are zero-filled: their output is discarded, and causality keeps them from
    influencing the new rows.
    """
    s, q_len = k_all.shape[0], q_new.shape[0]
    hq = q_new.shape[1]
    q_full = torch.zeros(s, hq, q_new.shape[2], dtype=q_new.dtype)
    q_full[s - q_len :] = q_new
    group = hq // k_all.shape[1]
    out = F.scaled_dot_product_attention(
        q_full.transpose(0, 1)[None],
        k_all.repeat_interleave(group, dim=1).transpose(0, 1)[None],
        v_all.repeat_interleave(group, dim=1).transpose(0, 1)[None],
        is_causal=True,
        scale=scale,
    )[0].transpose(0, 1)  # [S, Hq, D]
    return out[s - q_len :]


class _Scenario:
    """A batch of sequences, each (cached_len, new_len), over shuffled blocks of one cache."""

    def __init__(self, seqs, block_size, gqa, seed, num_spare_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.seqs = seqs
        self.block_size = block_size
        self.hq = HKV * gqa
        need = [-(-(c + n) // block_size) for c, n in seqs]
        num_blocks = sum(need) + num_spare_blocks
        self.tables = shuffled_tables(need, num_blocks, g)
        # Caches start with garbage (finite) so a read of a wrong slot shows up.
        self.k_cache = torch.randn(num_blocks, block_size, HKV, HEAD_DIM, generator=g)
        self.v_cache = torch.randn(num_blocks, block_size, HKV, HEAD_DIM, generator=g)
        self.k = [torch.randn(c + n, HKV, HEAD_DIM, generator=g) for c, n in seqs]
        self.v = [torch.randn(c + n, HKV, HEAD_DIM, generator=g) for c, n in seqs]
        self.q = [torch.randn(n, self.hq, HEAD_DIM, generator=g) for _, n in seqs]
        self.scale = HEAD_DIM**-0.5

    def write_prefixes(self) -> None:
        """An earlier step: write every cached prefix (as a prefill of the prefix)."""
        idx = [i for i, (c, _) in enumerate(self.seqs) if c > 0]
        if not idx:
            return
        meta = AttentionMetadata.build(
            [self.tables[i] for i in idx],
            [self.seqs[i][0] for i in idx],
            [self.seqs[i][0] for i in idx],
            self.block_size,
        )
        k = torch.cat([self.k[i][: self.seqs[i][0]] for i in idx])
        v = torch.cat([self.v[i][: self.seqs[i][0]] for i in idx])
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)

    def step(self, attend=paged_attention, pass_new_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """This step: write the new K/V, run paged attention; return (paged, reference).
        pass_new_kv: also hand `attend` this step's K/V (what the model does)."""
        meta = self.meta()
        k_new = torch.cat([k[c:] for k, (c, _) in zip(self.k, self.seqs)])
        v_new = torch.cat([v[c:] for v, (c, _) in zip(self.v, self.seqs)])
        write_kv(k_new, v_new, self.k_cache, self.v_cache, meta.slot_mapping)
        extra = (k_new, v_new) if pass_new_kv else ()
        out = attend(torch.cat(self.q), self.k_cache, self.v_cache, meta, self.scale, *extra)
        return out, self.reference()

    def meta(self) -> AttentionMetadata:
        return AttentionMetadata.build(
            self.tables, [c + n for c, n in self.seqs], [n for _, n in self.seqs], self.block_size
        )

    def reference(self) -> torch.Tensor:
        return torch.cat([_dense_reference(q, k, v, self.scale) for q, k, v in zip(self.q, self.k, self.v)])


SCENARIOS = {
    "prefill_no_prefix": [(0, 13), (0, 5)],
    "prefill_with_prefix": [(9, 7), (16, 16), (3, 2)],
    "decode": [(12, 1), (0, 1), (31, 1), (4, 1)],
    "mixed": [(0, 9), (20, 1), (7, 6), (0, 1), (33, 1), (16, 2), (5, 1)],
    "uniform_prefill": [(0, 6), (0, 6), (0, 6)],  # one batched SDPA call on the planned path
    "decode_equal_lengths": [(9, 1), (9, 1), (9, 1)],  # no padding mask on the planned path
}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_paged_matches_dense(scenario, block_size, gqa):
    sc = _Scenario(SCENARIOS[scenario], block_size, gqa, seed=block_size * 10 + gqa + 100 * sorted(SCENARIOS).index(scenario))
    sc.write_prefixes()
    out, ref = sc.step()
    assert out.shape == ref.shape == (sum(n for _, n in sc.seqs), sc.hq, HEAD_DIM)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pass_new_kv", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_planned_matches_reference_and_dense(scenario, block_size, gqa, pass_new_kv):
    """The engine's CPU path equals the reference (and so dense attention), with or without this
    step's K/V handed over, and with the plan reused as every layer of a step reuses it."""
    seed = block_size * 7 + gqa + 50 * sorted(SCENARIOS).index(scenario)
    sc = _Scenario(SCENARIOS[scenario], block_size, gqa, seed=seed)
    sc.write_prefixes()
    out, ref = sc.step(planned_paged_attention, pass_new_kv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    meta = sc.meta()
    q = torch.cat(sc.q)
    expected = paged_attention(q, sc.k_cache, sc.v_cache, meta, sc.scale)
    for _ in range(2):  # the second call runs on the cached plan
        torch.testing.assert_close(planned_paged_attention(q, sc.k_cache, sc.v_cache, meta, sc.scale), expected)
    assert meta.plan is meta.plan


@pytest.mark.parametrize("scenario", ["mixed", "prefill_with_prefix", "uniform_prefill"])
def test_last_tokens_metadata_gives_the_last_rows(scenario):
    """Attention for only the last new token of some sequences equals those rows of the full step."""
    sc = _Scenario(SCENARIOS[scenario], 4, 2, seed=17)
    sc.write_prefixes()
    full, _ = sc.step()
    meta = sc.meta()
    seqs = [i for i in range(len(sc.seqs)) if i % 2 == 0]
    last = meta.last_tokens(seqs)
    assert last.is_decode_only and last.seq_lens_list == tuple(meta.seq_lens_list[i] for i in seqs)
    rows = [meta.query_start_loc[i + 1].item() - 1 for i in seqs]
    assert last.slot_mapping.tolist() == meta.slot_mapping[rows].tolist()
    q = torch.cat(sc.q)[rows]
    torch.testing.assert_close(paged_attention(q, sc.k_cache, sc.v_cache, last, sc.scale), full[rows])
    torch.testing.assert_close(planned_paged_attention(q, sc.k_cache, sc.v_cache, last, sc.scale), full[rows])


def test_attention_dispatch_on_cpu_is_the_planned_path():
    sc = _Scenario(SCENARIOS["decode"], 4, 2, seed=3)
    sc.write_prefixes()
    meta = AttentionMetadata.build(sc.tables, [c + n for c, n in sc.seqs], [1] * len(sc.seqs), 4)
    write_kv(
        torch.cat([k[c:] for k, (c, _) in zip(sc.k, sc.seqs)]),
        torch.cat([v[c:] for v, (c, _) in zip(sc.v, sc.seqs)]),
        sc.k_cache,
        sc.v_cache,
        meta.slot_mapping,
    )
    q = torch.cat(sc.q)
    torch.testing.assert_close(
        attention(q, sc.k_cache, sc.v_cache, meta, sc.scale), paged_attention(q, sc.k_cache, sc.v_cache, meta, sc.scale)
    )
    assert "plan" in vars(meta)  # attention() went through the planned path


def test_write_kv_places_tokens_at_their_slots():
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k = torch.arange(1, 10, dtype=torch.float32).view(3, 1, 3)
    slots = torch.tensor([5, 0, 6])  # block 2 offset 1, block 0 offset 0, block 3 offset 0
    write_kv(k, -k, k_cache, v_cache, slots)
    assert torch.equal(k_cache[2, 1, 0], k[0, 0])
    assert torch.equal(k_cache[0, 0, 0], k[1, 0])
    assert torch.equal(k_cache[3, 0, 0], k[2, 0])
    assert torch.equal(v_cache[3, 0, 0], -k[2, 0])
    assert int((k_cache != 0).any(-1).sum()) == 3


def test_metadata_build_slots_and_padding():
    meta = AttentionMetadata.build([[7, 2, 5], [1]], seq_lens=[11, 3], query_lens=[4, 1], block_size=4)
    # seq 0: new positions 7..10 -> block 2 offset 3, block 5 offsets 0..2
    assert meta.slot_mapping.tolist() == [11, 20, 21, 22, 6]
    assert meta.block_tables.tolist() == [[7, 2, 5], [1, 0, 0]]
    assert meta.query_start_loc.tolist() == [0, 4, 5]
    assert meta.seq_lens.tolist() == [11, 3]
    assert not meta.is_decode_only


def test_metadata_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="query_len"):
        AttentionMetadata.build([[0]], seq_lens=[2], query_lens=[3], block_size=4)
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([[0]], seq_lens=[5], query_lens=[1], block_size=4)


def test_gqa_head_mapping_follows_repeat_kv():
    """Query head h reads KV head h // group: make KV heads distinguishable through V."""
    block_size, group = 4, 2
    k_cache = torch.zeros(2, block_size, HKV, HEAD_DIM)
    v_cache = torch.zeros(2, block_size, HKV, HEAD_DIM)
    v = torch.zeros(3, HKV, HEAD_DIM)
    v[:, 0], v[:, 1] = 1.0, -1.0
    meta = AttentionMetadata.build([[1]], seq_lens=[3], query_lens=[3], block_size=block_size)
    write_kv(torch.zeros(3, HKV, HEAD_DIM), v, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(torch.randn(3, HKV * group, HEAD_DIM), k_cache, v_cache, meta, 1.0)
    assert torch.allclose(out[:, :group], torch.ones(3, group, HEAD_DIM))
    assert torch.allclose(out[:, group:], -torch.ones(3, group, HEAD_DIM))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and triton")
@pytest.mark.parametrize("block_size", [1, 4, 16, 24])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_matches_reference(block_size, gqa, dtype):
    seq_lens = [1, 17, 64, 300, 5, 129]
    head_dim, hkv = 64, 2
    q, k_cache, v_cache, meta = decode_case(seq_lens, block_size, hkv, gqa, head_dim, seed=block_size * 10 + gqa,
                                            spare_blocks=2, device="cuda")
    q, k_cache, v_cache = (t.to("cuda", dtype) for t in (q, k_cache, v_cache))
    scale = head_dim**-0.5
    ref = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(attention(q, k_cache, v_cache, meta, scale).float(), ref, atol=tol, rtol=tol)
