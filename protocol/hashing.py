"""Chained 64-bit block hashes over token ids (design §3).

    h_0 = H(root,    tokens[0:bs])
    h_i = H(h_{i-1}, tokens[i*bs:(i+1)*bs])
    H(parent, block) = xxh3_64(parent as 8 bytes little-endian ‖ block as uint32 little-endian)

Only full blocks are hashed. The root comes from the model name, an optional cache salt and an
optional LoRA adapter name, so two models (or one model under two adapters) never share an entry. Everything here is a pure function of its
arguments: no PYTHONHASHSEED, no random seed, identical on every process and machine.

The token bytes of all blocks are produced in one conversion; the chain itself is sequential
(each hash is the next block's parent). `protocol._hashchain` (C, built by `pip install -e .`
from protocol/_hashchain.c) runs the whole chain in one call; where it is not built,
`_hash_blocks_py` does one `xxhash` call per block on a 72-byte buffer (block_size 16), about
ten times slower. `NATIVE` says which one `hash_blocks` uses. Both give the same hashes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sys
from array import array

import numpy as np
import xxhash

try:
    from protocol._hashchain import hash_chain as _hash_chain
    from protocol._hashchain import pack_u32 as _pack_u32
except ImportError:  # extension not built (no C compiler at install time): pure Python
    _hash_chain = None
    _pack_u32 = None

# True when `hash_blocks` runs the chain in C (reported by the benchmarks).
NATIVE: bool = _hash_chain is not None

_U64_MASK = (1 << 64) - 1
# array("I") is uint32 little-endian on this platform: its bytes are what the hash reads.
_NATIVE_U32 = sys.byteorder == "little" and array("I").itemsize == 4


def root_hash(model: str, salt: str | None = None, lora_name: str | None = None) -> int:
    """The parent of a chain's first block: a hash of the model name, optional salt and
    optional LoRA adapter name.

    vLLM mixes the adapter into every block's hash as the first of its extra keys
    (`vllm/v1/core/kv_cache_utils.py`: `_gen_lora_extra_hash_keys` returns `[lora_name]`, older
    versions the `lora_int_id`; the cache salt goes only into the first block's keys). In a
    chain every block hashes its parent, so putting the adapter into the root separates the
    whole chain the same way. The adapter is tagged with \x01 and the salt with \x00, so a salt
    can never stand for an adapter name (nor the reverse); without an adapter the key is what
    it always was.
    """
    key = model if lora_name is None else f"{model}\x01{lora_name}"
    if salt is not None:
        key = f"{key}\x00{salt}"
    return xxhash.xxh3_64_intdigest(key.encode("utf-8"))


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes (the representation the hash reads).

    Lists and tuples of ints go through the C extension's `pack_u32` when it is built (about 4x
    faster than `array("I")`); other Python sequences, or items that are not ints (numpy
    integers), through `array("I")` (C, no per-element numpy boxing: ~3x faster than numpy for a
    list of ints); arrays through numpy.
    """
    if isinstance(token_ids, np.ndarray):
        if token_ids.size and (int(token_ids.min()) < 0 or int(token_ids.max()) > 0xFFFFFFFF):
            raise ValueError("token ids must fit in uint32")
        return token_ids.astype("<u4", copy=False).tobytes()
    if _pack_u32 is not None and type(token_ids) in (list, tuple):
        try:
            return _pack_u32(token_ids)
        except TypeError:  # an item is not an int: the general path converts it or says why
            pass
    if _NATIVE_U32:
        try:
            return array("I", token_ids).tobytes()
        except OverflowError:
            raise ValueError("token ids must fit in uint32") from None
    return token_bytes(np.asarray(token_ids))


def hash_block(parent: int, block_tokens: Sequence[int] | np.ndarray) -> int:
    """Hash one block given its parent's hash (or the root for the first block)."""
    return xxhash.xxh3_64_intdigest((parent & _U64_MASK).to_bytes(8, "little") + token_bytes(block_tokens))


def hash_blocks(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    parent: int,
    max_blocks: int | None = None,
) -> list[int]:
    """Hashes of the full blocks of `token_ids`, chained from `parent`.

    `parent` is `root_hash(...)` for a prompt's first block, or the hash of the block just before
    `token_ids[0]` to extend an existing chain. A trailing partial block is ignored.
    """
    if _hash_chain is None:
        return _hash_blocks_py(token_ids, block_size, parent, max_blocks)
    n = _n_blocks(len(token_ids), block_size, max_blocks)
    if n <= 0:  # also max_blocks <= 0
        return []
    end = n * block_size
    data = token_bytes(token_ids if end == len(token_ids) else token_ids[:end])
    return _hash_chain(data, block_size, parent & _U64_MASK, n)


def chain_hashes(data: bytes, block_size: int, parent: int, n_blocks: int) -> list[int]:
    """`hash_blocks` of tokens already packed by `token_bytes` (`data`, at least
    4 * block_size * n_blocks bytes): the first n_blocks hashes, chained from `parent`."""
    if _hash_chain is not None:
        return _hash_chain(data, block_size, parent & _U64_MASK, n_blocks)
    if len(data) < n_blocks * 4 * block_size:
        raise ValueError(f"data holds {len(data)} bytes, fewer than the {n_blocks} blocks x {4 * block_size} "
                         f"bytes asked for")
    return _chain_py(data, block_size, parent, n_blocks)


def _hash_blocks_py(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    parent: int,
    max_blocks: int | None = None,
) -> list[int]:
    """`hash_blocks` with one `xxhash` call per block: the fallback, and the reference in tests."""
    n = _n_blocks(len(token_ids), block_size, max_blocks)
    if n <= 0:  # also max_blocks <= 0
        return []
    return _chain_py(token_bytes(token_ids[: n * block_size]), block_size, parent, n)


def _chain_py(data: bytes, block_size: int, parent: int, n: int) -> list[int]:
    """The chain over packed tokens with one `xxhash` call per block (what `_hash_chain` does in C)."""
    step = 4 * block_size
    digest = xxhash.xxh3_64_intdigest
    out = [0] * max(n, 0)
    h = parent & _U64_MASK
    for i in range(n):
        h = digest(h.to_bytes(8, "little") + data[i * step : (i + 1) * step])
        out[i] = h
    return out


def _n_blocks(n_tokens: int, block_size: int, max_blocks: int | None) -> int:
    """How many full blocks to hash: all of them, or at most `max_blocks`."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = n_tokens // block_size
    return n if max_blocks is None else min(n, max_blocks)


def prompt_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int, model: str, salt: str | None = None,
                  lora_name: str | None = None) -> list[int]:
    """The hash chain of a whole prompt for `model` (under adapter `lora_name`, if any): what
    the balancer looks up."""
    return hash_blocks(token_ids, block_size, root_hash(model, salt, lora_name))
