"""The C block-hash chain (protocol/_hashchain.c, upstream xxHash's XXH3 from
protocol/vendor/xxhash.h) against the `xxhash` package and the pure-Python loop, the oracle. The native-only tests skip when the extension is not built; the
rest check `hash_blocks` whichever path it runs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import hashing
from protocol.hashing import _hash_blocks_py, hash_blocks, prompt_hashes, root_hash

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64]


def _native():
    return pytest.importorskip("protocol._hashchain", reason="C extension not built")


def _tokens(rng: random.Random, n: int) -> list[int]:
    """Random uint32 token ids with the edge values 0 and 2**32-1 mixed in."""
    return [rng.choice((0, U32_MAX, rng.randrange(2**32))) for _ in range(n)]


def _parents(rng: random.Random) -> list[int]:
    return [0, U64_MAX, 1 << 63, rng.randrange(2**64)]


# --- the C XXH3_64 itself -------------------------------------------------------------------


def test_xxh3_matches_xxhash_for_every_length():
    """Every length class of XXH3: 0, 1-3, 4-8, 9-16, 17-128, 129-240, and > 240 bytes up to
    two 1024-byte blocks plus a partial one (so the large path's scramble and last-stripe overlap
    run)."""
    native = _native()
    rng = random.Random(0)
    for n in range(0, 2101):
        for data in (rng.randbytes(n), b"\x00" * n, b"\xff" * n):
            assert native.xxh3_64(data) == xxhash.xxh3_64_intdigest(data), n


def test_xxh3_reads_any_buffer():
    native = _native()
    data = np.arange(50, dtype="<u4")
    assert native.xxh3_64(data) == xxhash.xxh3_64_intdigest(data.tobytes())
    assert native.xxh3_64(bytearray(b"abc")) == xxhash.xxh3_64_intdigest(b"abc")
    assert native.xxh3_64(memoryview(b"abcdefgh")[2:]) == xxhash.xxh3_64_intdigest(b"cdefgh")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_xxh3_property(data):
    native = _native()
    assert native.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


# --- the chain ------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_chain_native_equals_python(block_size):
    native = _native()
    rng = random.Random(block_size)
    for parent in _parents(rng):
        for n_blocks in (0, 1, 2, 7, 40):
            tokens = _tokens(rng, n_blocks * block_size + rng.randrange(block_size))
            data = hashing.token_bytes(tokens) if tokens else b""
            expected = _hash_blocks_py(tokens, block_size, parent)
            assert native.hash_chain(data, block_size, parent, n_blocks) == expected
            assert hash_blocks(tokens, block_size, parent) == expected


def test_chain_is_xxh3_of_parent_and_block():
    """The definition in design §3, spelled out with `xxhash` for one chain."""
    tokens = [0, U32_MAX, 7, 123456, 42, 1, 2, 3]
    parent = U64_MAX
    h, expected = parent, []
    for i in range(0, len(tokens), 4):
        block = b"".join(t.to_bytes(4, "little") for t in tokens[i : i + 4])
        h = xxhash.xxh3_64_intdigest(h.to_bytes(8, "little") + block)
        expected.append(h)
    assert hash_blocks(tokens, 4, parent) == expected
    assert _hash_blocks_py(tokens, 4, parent) == expected


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, U32_MAX), max_size=300),
    block_size=st.sampled_from(BLOCK_SIZES),
    parent=st.integers(0, U64_MAX),
    max_blocks=st.none() | st.integers(0, 20),
)
def test_chain_property(tokens, block_size, parent, max_blocks):
    expected = _hash_blocks_py(tokens, block_size, parent, max_blocks)
    assert hash_blocks(tokens, block_size, parent, max_blocks) == expected
    assert hash_blocks(np.array(tokens, dtype=np.int64), block_size, parent, max_blocks) == expected


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, U32_MAX), max_size=400),
    block_size=st.integers(1, 80),
    model=st.text(max_size=20),
    salt=st.none() | st.text(max_size=20),
    split=st.integers(0, 10),
)
def test_prompt_chain_property(tokens, block_size, model, salt, split):
    """Any block size, any model and cache salt (the extra keys, folded into the root), and a
    chain extended from the middle: the C path gives the oracle's hashes."""
    root = root_hash(model, salt)
    expected = _hash_blocks_py(tokens, block_size, root)
    assert prompt_hashes(tokens, block_size, model, salt) == expected
    k = min(split, len(expected))
    parent = expected[k - 1] if k else root
    assert hash_blocks(tokens[k * block_size :], block_size, parent) == expected[k:]
    if salt is not None and expected:
        assert prompt_hashes(tokens, block_size, model, None) != expected


def test_hash_blocks_semantics_kept():
    """What callers rely on, whichever path runs: max_blocks, parent modulo 2**64, numpy input,
    a trailing partial block ignored, and the errors."""
    rng = random.Random(1)
    tokens = _tokens(rng, 16 * 10 + 5)
    full = _hash_blocks_py(tokens, 16, 99)
    assert len(full) == 10
    assert hash_blocks(tokens, 16, 99) == full
    assert hash_blocks(tokens, 16, 99, max_blocks=3) == full[:3]
    assert hash_blocks(tokens, 16, 99, max_blocks=0) == []
    assert hash_blocks(tokens, 16, 99, max_blocks=-1) == []
    assert hash_blocks(tokens[:15], 16, 99) == []
    assert hash_blocks(tokens, 16, 99 + 2**64) == full
    assert hash_blocks(tokens, 16, -1) == hash_blocks(tokens, 16, U64_MAX)
    assert hash_blocks(np.array(tokens, dtype=np.uint32), 16, 99) == full
    assert hash_blocks(tuple(tokens), 16, 99) == full
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks(tokens, 0, 99)
    with pytest.raises(ValueError, match="uint32"):
        hash_blocks([1] * 15 + [2**32], 16, 0)
    with pytest.raises(ValueError, match="uint32"):
        hash_blocks([-1] * 16, 16, 0)
    with pytest.raises(ValueError, match="uint32"):
        hash_blocks(np.full(16, 2**32, dtype=np.int64), 16, 0)


def test_native_flag_says_which_path_runs():
    try:
        import protocol._hashchain  # noqa: F401
    except ImportError:
        assert hashing.NATIVE is False
    else:
        assert hashing.NATIVE is True


def test_hash_chain_rejects_bad_arguments():
    native = _native()
    data = bytes(64)
    with pytest.raises(ValueError, match="block_size must be positive"):
        native.hash_chain(data, 0, 0, 1)
    with pytest.raises(ValueError, match="n_blocks must be >= 0"):
        native.hash_chain(data, 4, 0, -1)
    with pytest.raises(ValueError, match="fewer than the 5 blocks"):
        native.hash_chain(data, 4, 0, 5)  # 64 bytes hold 4 blocks of 4 tokens
    with pytest.raises(TypeError, match="parent must be an int"):
        native.hash_chain(data, 4, 1.0, 1)
    with pytest.raises(TypeError):
        native.hash_chain("not bytes", 4, 0, 1)
    with pytest.raises(OverflowError):
        native.hash_chain(data, 2**62, 0, 1)
    assert native.hash_chain(data, 4, 0, 0) == []
    assert native.hash_chain(data, 4, 2**64 + 5, 2) == native.hash_chain(data, 4, 5, 2)


def test_pack_u32_matches_array_conversion():
    native = _native()
    rng = random.Random(2)
    tokens = _tokens(rng, 1000)
    expected = np.array(tokens, dtype="<u4").tobytes()
    assert native.pack_u32(tokens) == expected
    assert native.pack_u32(tuple(tokens)) == expected
    assert native.pack_u32([]) == b""
    assert native.pack_u32([True, False]) == (1).to_bytes(4, "little") + bytes(4)
    for bad in (-1, 2**32, 2**64, -(2**70)):
        with pytest.raises(ValueError, match=r"uint32: index 1 holds"):
            native.pack_u32([5, bad])
    with pytest.raises(TypeError, match="index 1 is a float"):
        native.pack_u32([5, 1.0])
    with pytest.raises(TypeError, match="list or tuple"):
        native.pack_u32(range(3))


def test_token_bytes_accepts_what_it_did():
    """Items that are not Python ints (numpy integers) and other sequences still convert; a float
    is still refused."""
    expected = np.array([1, 2, U32_MAX], dtype="<u4").tobytes()
    assert hashing.token_bytes([np.int64(1), np.uint32(2), U32_MAX]) == expected
    assert hashing.token_bytes(range(1, 3)) == expected[:8]
    with pytest.raises(TypeError):
        hashing.token_bytes([1, 2.5])
    with pytest.raises(ValueError, match="uint32"):
        hashing.token_bytes([1, -1])


def test_chain_hashes_over_packed_tokens_equals_hash_blocks_with_and_without_the_extension(monkeypatch):
    """`chain_hashes` (the index hashes an event's packed tokens with it) is `hash_blocks` of the
    same tokens, in C and through the pure-Python fallback alike; too few bytes is an error."""
    import protocol.hashing as hashing

    tokens = list(range(7, 7 + 16 * 5 + 3))
    data = hashing.token_bytes(tokens)
    expected = _hash_blocks_py(tokens, 16, 1234)
    assert hashing.chain_hashes(data, 16, 1234, 5) == expected
    assert hashing.chain_hashes(data, 16, 1234, 2) == expected[:2]
    monkeypatch.setattr(hashing, "_hash_chain", None)
    assert hashing.chain_hashes(data, 16, 1234, 5) == expected
    with pytest.raises(ValueError, match="fewer than"):
        hashing.chain_hashes(data[:16 * 4], 16, 1234, 2)
