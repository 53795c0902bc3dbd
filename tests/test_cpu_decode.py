"""The CPU decode kernel in C (kernels/_cpu_decode.c) against the torch paged-attention reference."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_decode, paged_attention
from tests.attention_utils import decode_case

pytestmark = [pytest.mark.skipif(not cpu_decode.NATIVE, reason="kernels._cpu_decode is not built"),
              pytest.mark.usefixtures("one_torch_thread")]


def _case(seq_lens, block_size, hkv, gqa, d, seed):
    return decode_case(seq_lens, block_size, hkv, gqa, d, seed, spare_blocks=5)


@pytest.mark.parametrize("d", [16, 32, 64, 128])  # 32/64/128 have their own compiled loops
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_matches_the_reference(d, gqa, block_size):
    seq_lens = [1, 15, 16, 17, 100, 257]
    q, k_cache, v_cache, meta = _case(seq_lens, block_size, hkv=2, gqa=gqa, d=d, seed=d + gqa + block_size)
    group = meta.plan.decode
    scale = d ** -0.5
    got = cpu_decode.decode(q, k_cache, v_cache, group.blocks, group.lens, scale)
    want = paged_attention(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_strided_query_rows_are_read_in_place():
    """q as the attention layer has it: a view of the fused qkv projection (rows strided)."""
    q, k_cache, v_cache, meta = _case([40, 9, 70], 16, hkv=2, gqa=2, d=32, seed=1)
    qkv = torch.cat([q, torch.randn(3, 4, 32)], dim=1)  # [B, Hq + 2 * Hkv, D]
    q_view = qkv[:, :4]
    assert not q_view.is_contiguous()
    group = meta.plan.decode
    got = cpu_decode.decode(q_view, k_cache, v_cache, group.blocks, group.lens, 0.2)
    torch.testing.assert_close(got, paged_attention(q, k_cache, v_cache, meta, 0.2), atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_refused_before_any_memory_is_read():
    q, k_cache, v_cache, meta = _case([20, 30], 16, hkv=2, gqa=2, d=32, seed=2)
    group = meta.plan.decode
    with pytest.raises(ValueError, match="length"):
        cpu_decode.decode(q, k_cache, v_cache, group.blocks, group.lens + 100, 0.1)
    with pytest.raises(ValueError, match="block id"):
        cpu_decode.decode(q, k_cache, v_cache, group.blocks + 1000, group.lens, 0.1)
    with pytest.raises(ValueError, match="float32"):
        cpu_decode.decode(q.double(), k_cache, v_cache, group.blocks, group.lens, 0.1)
    with pytest.raises(ValueError, match="sequences"):
        cpu_decode.decode(q, k_cache, v_cache, group.blocks, group.lens[:1], 0.1)
    assert not cpu_decode.usable(q, k_cache.transpose(1, 2), v_cache)


def test_the_torch_decode_path_without_the_kernel_matches_too(monkeypatch):
    """Where the extension is not built the planned path gathers blocks and masks ragged lengths."""
    from kernels.paged_attention import planned_paged_attention

    q, k_cache, v_cache, meta = _case([3, 40, 17, 64], 16, hkv=2, gqa=2, d=32, seed=3)
    want = paged_attention(q, k_cache, v_cache, meta, 0.2)
    monkeypatch.setattr(cpu_decode, "usable", lambda *a: False)
    assert meta.plan.decode.mask is not None  # ragged: the torch path needs its mask
    torch.testing.assert_close(planned_paged_attention(q, k_cache, v_cache, meta, 0.2), want, atol=2e-5, rtol=2e-5)
