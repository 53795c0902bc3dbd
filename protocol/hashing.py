"""Chained 64-bit block hashes over token ids (design §3).

    h_0 = H(root,    tokens[0:bs])
    h_i = H(h_{i-1}, tokens[i*bs:(i+1)*bs])
    H(parent, block) = xxh3_64(parent as 8 bytes little-endian ‖ block as uint32 little-endian)

Only full blocks are hashed. The root comes from the model name and an optional cache salt /
adapter name, so two models never share an entry. Everything here is a pure function of its
arguments: no PYTHONHASHSEED, no random seed, identical on every process and machine.

The token bytes of all blocks are produced in one numpy conversion; the chain itself is
sequential (each hash is the next block's parent), so the loop does one xxh3 call per block on a
72-byte buffer (block_size 16).
"""

from __future__ import annotations

from collections.abc import Sequence

import sys
from array import array

import numpy as np
import xxhash

_U64_MASK = (1 << 64) - 1
# array("I") is uint32 little-endian on this platform: its bytes are what the hash reads.
_NATIVE_U32 = sys.byteorder == "little" and array("I").itemsize == 4


def root_hash(model: str, salt: str | None = None) -> int:
    """The parent of a chain's first block: a hash of the model name and optional salt."""
    key = model if salt is None else f"{model}\x00{salt}"
    return xxhash.xxh3_64_intdigest(key.encode("utf-8"))


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes (the representation the hash reads).

    Python sequences go through `array("I")` (C, no per-element numpy boxing: ~3x faster than
    numpy for a list of ints); arrays through numpy.
    """
    if isinstance(token_ids, np.ndarray):
        if token_ids.size and (int(token_ids.min()) < 0 or int(token_ids.max()) > 0xFFFFFFFF):
            raise ValueError("token ids must fit in uint32")
        return token_ids.astype("<u4", copy=False).tobytes()
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
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        return []
    data = token_bytes(token_ids[: n * block_size])
    step = 4 * block_size
    digest = xxhash.xxh3_64_intdigest
    out = [0] * n
    h = parent & _U64_MASK
    for i in range(n):
        h = digest(h.to_bytes(8, "little") + data[i * step : (i + 1) * step])
        out[i] = h
    return out


def prompt_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int, model: str, salt: str | None = None) -> list[int]:
    """The hash chain of a whole prompt for `model` (what the balancer looks up)."""
    return hash_blocks(token_ids, block_size, root_hash(model, salt))
