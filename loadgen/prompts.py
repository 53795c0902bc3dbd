"""Turn a TraceRequest into the prompt a server gets, keeping the trace's prefix structure.

Each hash id becomes one deterministic block of `hash_block_tokens` token ids, a pure function
of (seed, id): the same id always gives the same block, so two prompts share exactly the whole
blocks whose ids they share, and a server's prefix cache sees the trace's sharing. The prompt is
the blocks in order, cut to `input_length`.

A block's first tokens spell the id in base V (the vocabulary size), each digit shifted by a
seeded per-position offset, so blocks of different ids always differ when the block has at
least ceil(64 / log2 V) tokens (8 for bytes) or the ids are below V**block_tokens; the other
tokens are pseudo-random (splitmix64 of the id and position). Requests without hash ids get
tokens unique to the request (keyed by its index).

Text prompts (for servers that take no token ids) use printable ASCII as the vocabulary
(32..126) and decode it as ASCII, so the byte tokenizer reads back exactly these token ids.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import xxhash

from loadgen.traces import TraceRequest, scale_input
from protocol.tokenizer import ByteTokenizer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TEXT_RANGE = (32, 127)  # printable ASCII
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class PromptConfig:
    """vocab_low..vocab_high (exclusive) is the token range of generated blocks (default: the
    byte tokenizer's 256 byte ids). prepend_bos puts the byte tokenizer's BOS first; it counts
    toward input_length. scale_input shrinks prompts keeping their block structure (applied
    here per request; `TraceOptions.scale_input` does the same at load time, use one)."""

    seed: int = 0
    vocab_low: int = 0
    vocab_high: int = 256
    prepend_bos: bool = False
    bos_token_id: int = ByteTokenizer.BOS
    scale_input: float = 1.0
    text: bool = False  # build text prompts (printable ASCII) instead of token ids

    def __post_init__(self) -> None:
        if not 0 <= self.vocab_low < self.vocab_high:
            raise ValueError(f"need 0 <= vocab_low < vocab_high, got {self.vocab_low}..{self.vocab_high}")
        if self.vocab_high - self.vocab_low < 2:
            raise ValueError("the vocabulary range needs at least 2 token ids")
        if not (self.scale_input > 0 and math.isfinite(self.scale_input)):
            raise ValueError(f"scale_input must be a positive number, got {self.scale_input}")

    @property
    def token_range(self) -> tuple[int, int]:
        return _TEXT_RANGE if self.text else (self.vocab_low, self.vocab_high)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function, vectorised over uint64 (array arithmetic wraps silently)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _key(seed: int, domain: int, ident: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<QBQ", seed & _MASK, domain, ident & _MASK))


def _stream(key: int | np.ndarray, n: int, low: int, high: int) -> np.ndarray:
    """n pseudo-random ids in [low, high) per key: shape (n,) for one key, (k, n) for k keys."""
    keys = np.asarray(key, dtype=np.uint64)
    x = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN + keys[..., None]
    return (low + _splitmix(x) % np.uint64(high - low)).astype(np.int64)


def blocks_tokens(seed: int, block_ids: Sequence[int], n: int, low: int = 0, high: int = 256) -> np.ndarray:
    """The `n` token ids of each hash block in `block_ids`, shape (len(block_ids), n); a pure
    function of its arguments, computed for all blocks at once."""
    v = high - low
    ids = [b & _MASK for b in block_ids]
    out = _stream(np.fromiter((_key(seed, 0, b) for b in ids), dtype=np.uint64, count=len(ids)), n, low, high)
    ndigits = min(n, math.ceil(64 / math.log2(v)))
    offsets = _stream(_key(seed, 1, 0), ndigits, 0, v)
    powers = np.uint64(v) ** np.arange(ndigits, dtype=np.uint64)  # v**(ndigits-1) < 2**64
    digits = (np.asarray(ids, dtype=np.uint64)[:, None] // powers) % np.uint64(v)
    out[:, :ndigits] = low + (digits.astype(np.int64) + offsets) % v
    return out


def block_tokens(seed: int, block_id: int, n: int, low: int = 0, high: int = 256) -> np.ndarray:
    """The `n` token ids of hash block `block_id`."""
    return blocks_tokens(seed, [block_id], n, low, high)[0]


def unique_tokens(seed: int, index: int, n: int, low: int = 0, high: int = 256) -> np.ndarray:
    """Tokens that belong to request `index` alone (for requests without hash ids)."""
    return _stream(_key(seed, 2, index), n, low, high)


def prompt_token_ids(req: TraceRequest, index: int, cfg: PromptConfig) -> np.ndarray:
    """The prompt of `req` (the `index`-th request of its trace) as token ids."""
    if cfg.scale_input != 1.0:
        req = scale_input(req, cfg.scale_input)
    low, high = cfg.token_range
    n = req.input_length - (1 if cfg.prepend_bos else 0)
    if n < 0:
        n = 0
    if req.text is not None and not cfg.text:
        ids = np.asarray(ByteTokenizer().encode(req.text, add_bos=False), dtype=np.int64)
    elif req.hash_ids:
        bt = req.hash_block_tokens
        need = min(len(req.hash_ids), math.ceil(n / bt)) if n else 0
        ids = blocks_tokens(cfg.seed, req.hash_ids[:need], bt, low, high).reshape(-1)[:n]
        if len(ids) < n:  # a trace row with fewer blocks than its length needs: pad uniquely
            ids = np.concatenate([ids, unique_tokens(cfg.seed, index, n - len(ids), low, high)])
    else:
        ids = unique_tokens(cfg.seed, index, n, low, high)
    if cfg.prepend_bos:
        ids = np.concatenate([np.asarray([cfg.bos_token_id], dtype=np.int64), ids])
    return ids


def prompt_text(req: TraceRequest, index: int, cfg: PromptConfig) -> str:
    """The prompt as text: ShareGPT text as is, else the token prompt in printable ASCII (one
    character per token, so the byte tokenizer gives back input_length tokens)."""
    if req.text is not None:
        return req.text
    ids = prompt_token_ids(req, index, replace(cfg, text=True, prepend_bos=False))
    return ids.astype(np.uint8).tobytes().decode("ascii")
