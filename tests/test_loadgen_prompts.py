"""Prompt materialization keeps exactly the trace's prefix sharing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from loadgen.prompts import PromptConfig, block_tokens, prompt_text, prompt_token_ids
from loadgen.traces import TraceRequest, scale_input
from protocol.tokenizer import ByteTokenizer


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _whole_block_lcp(a: np.ndarray, b: np.ndarray, bt: int) -> int:
    """Tokens in the longest common prefix of a and b, counted in whole blocks."""
    n = 0
    while n + bt <= min(len(a), len(b)) and np.array_equal(a[n:n + bt], b[n:n + bt]):
        n += bt
    return n


ids = st.lists(st.integers(0, 300), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), bt=st.integers(1, 40), seed=st.integers(0, 2**32), text=st.booleans())
def test_prompts_share_exactly_the_blocks_their_ids_share(data, bt, seed, text):
    # distinct blocks are guaranteed for ids below V**bt (V = 256 token ids, 95 for text)
    top = min(2**40, (95 if text else 256) ** bt - 1)
    block_ids = st.lists(st.integers(0, top), min_size=1, max_size=12)
    a, b = data.draw(block_ids), data.draw(block_ids)
    if data.draw(st.booleans()):  # make shared prefixes common
        b = a[: data.draw(st.integers(0, len(a)))] + b
    cfg = PromptConfig(seed=seed, text=text)
    ra = TraceRequest(0.0, len(a) * bt, 1, tuple(a), bt)
    rb = TraceRequest(0.0, len(b) * bt, 1, tuple(b), bt)
    ta, tb = prompt_token_ids(ra, 0, cfg), prompt_token_ids(rb, 1, cfg)
    assert len(ta) == len(a) * bt and len(tb) == len(b) * bt
    assert _whole_block_lcp(ta, tb, bt) == _lcp(a, b) * bt


@settings(max_examples=50, deadline=None)
@given(a=ids, b=ids, factor=st.sampled_from([1 / 32, 1 / 8, 0.3]), seed=st.integers(0, 1000))
def test_scaled_prompts_keep_the_sharing(a, b, factor, seed):
    ra = scale_input(TraceRequest(0.0, len(a) * 512, 1, tuple(a), 512), factor)
    rb = scale_input(TraceRequest(0.0, len(b) * 512, 1, tuple(b), 512), factor)
    cfg = PromptConfig(seed=seed)
    ta, tb = prompt_token_ids(ra, 0, cfg), prompt_token_ids(rb, 1, cfg)
    assert _whole_block_lcp(ta, tb, ra.hash_block_tokens) == _lcp(a, b) * ra.hash_block_tokens


def test_blocks_are_deterministic_in_range_and_seeded():
    a = block_tokens(3, 42, 64)
    assert np.array_equal(a, block_tokens(3, 42, 64))
    assert not np.array_equal(a, block_tokens(4, 42, 64))
    assert a.min() >= 0 and a.max() < 256
    b = block_tokens(3, 42, 64, low=1000, high=1010)
    assert b.min() >= 1000 and b.max() < 1010


def test_last_block_is_cut_to_input_length_and_bos_counts():
    r = TraceRequest(0.0, 70, 1, (5, 6, 7), 32)
    ids = prompt_token_ids(r, 0, PromptConfig())
    assert len(ids) == 70
    full = np.concatenate([block_tokens(0, 5, 32), block_tokens(0, 6, 32), block_tokens(0, 7, 32)])
    assert np.array_equal(ids, full[:70])
    with_bos = prompt_token_ids(r, 0, PromptConfig(prepend_bos=True))
    assert len(with_bos) == 70 and with_bos[0] == ByteTokenizer.BOS
    assert np.array_equal(with_bos[1:], full[:69])


def test_requests_without_hash_ids_get_unique_prompts():
    cfg = PromptConfig()
    r = TraceRequest(0.0, 100, 1)
    p0, p1 = prompt_token_ids(r, 0, cfg), prompt_token_ids(r, 1, cfg)
    assert len(p0) == 100 and _lcp(p0, p1) < 4
    assert np.array_equal(p0, prompt_token_ids(r, 0, cfg))


def test_text_prompts_round_trip_through_the_byte_tokenizer():
    cfg = PromptConfig(seed=1)
    a = TraceRequest(0.0, 40, 1, (1, 2, 3), 16)
    b = TraceRequest(0.0, 48, 1, (1, 2, 9), 16)
    ta, tb = prompt_text(a, 0, cfg), prompt_text(b, 1, cfg)
    assert ta.isprintable() and len(ta) == 40
    assert ByteTokenizer().encode(ta, add_bos=False) == prompt_token_ids(a, 0, PromptConfig(seed=1, text=True)).tolist()
    assert ta[:32] == tb[:32] and ta[32:40] != tb[32:40]
    sharegpt = TraceRequest(0.0, 5, 1, text="héllo")
    assert prompt_text(sharegpt, 0, cfg) == "héllo"
    assert prompt_token_ids(sharegpt, 0, cfg).tolist() == list("héllo".encode())
