"""Compact cache digests: a bounded-size filter of the block hashes a replica holds.

Beside its exact KV-event stream a kvfleet replica publishes, every `digest_interval_s` and on
request, a *digest*: a binary fuse filter (Graf & Lemire, "Binary Fuse Filters: Fast and Smaller
Than Xor Filters", 2022) over the block hashes in its prefix cache. A balancer that joins late,
or one in front of a fleet too large to follow every event stream, routes from the latest digest
of each replica: the cached prefix of a chain is its longest prefix whose hashes are all in the
filter (`BlockFilter.prefix_len`).

Properties (tests/test_digest.py checks them):
- no false negatives: every hash the filter was built from is in it;
- false positives at the filter's rate: ~1/256 (0.39 %) for `binary_fuse8`, ~1/65536 (0.0015 %)
  for `binary_fuse16` (the library's and the paper's figures); a chain's prefix is over-counted
  by k blocks with probability about rate**k, since each false block must follow a true one;
- size: ~1.13 bytes per block for `binary_fuse8`, ~2.26 for `binary_fuse16` at a million blocks
  (more for small sets: `filter_bytes` follows the library's sizing; bench/bench_digest.py
  measures it); a digest never exceeds its `max_bytes`: a replica holding more blocks than fit
  digests the ones it will keep longest (replica/block_pool.py `digest_hashes`).

The keys are kvfleet's own chained block hashes (protocol/hashing.py), already uniform 64-bit
values, so they go into the filter as they are; the filter mixes them with its own seed.

Library: `pyfusefilter` (the Python binding of Lemire's C `xor_singleheader`), called through
its C functions on a numpy array. Its Python classes hash each key as `str(key)` in a Python loop
(about 1 µs a key, and broken with xxhash 4, which refuses str); the C functions take the uint64
keys directly, build 1M keys in 0.1-0.2 s with the GIL released (cffi releases it), and
serialize to the library's own portable format, which is what travels on the wire. Why not a
Bloom filter: at the binary fuse filter's 9.05 bits per block the best Bloom filter errs on
~1.3 % of lookups (0.6185**9.05) against 0.39 %, and it needs ~11.5 bits for 0.39 %; a digest
is rebuilt whole each time, so a static filter loses nothing. (`rbloom`, the maintained Bloom
library, also calls a Python hash function per key.)

Wire (protocol/load.py's extras framing, so vLLM-format readers drop it):

    periodic:  PUB  [digest topic, seq (digest counter), payload, EXTRAS_MARKER]
    request:   DEALER -> ROUTER [b"", DIGEST_REQUEST]
    reply:     ROUTER -> DEALER [b"", digest topic, seq, payload]

    payload = msgpack map {v, kind: "digest", ts, epoch, kv_seq, block_size, num_blocks,
                           filter: "binary_fuse8" | "binary_fuse16" | "empty", data: bytes}

A vLLM ROUTER reads the 14-byte DIGEST_REQUEST as "replay from a seq past every buffered one"
and answers with its end marker alone: "this publisher has no digests".
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyfusefilter._xorfilter import ffi, lib

from protocol.events import EventDecodeError
from protocol.load import decode_state, encode_state

DEFAULT_DIGEST_TOPIC = b"kvfleet.digest"
DIGEST_REQUEST = b"kvfleet.digest"  # 14 bytes: never an 8-byte replay start seq
DIGEST_VERSION = 1

# name -> (C type prefix, fingerprint bits). Bits per block is about 1.13 x the fingerprint.
FILTER_KINDS: dict[str, tuple[str, int]] = {
    "binary_fuse8": ("binary_fuse8", 8),
    "binary_fuse16": ("binary_fuse16", 16),
}
EMPTY = "empty"  # no blocks: no filter, every lookup misses
HEADER_BYTES = 192  # what a digest adds to its filter's bytes on the wire, at most (msgpack map)
_FILTER_HEADER = 28  # the library's serialized header: Seed (u64) and five u32 fields


def fingerprints_for(n: int) -> int:
    """At most how many fingerprints a binary fuse filter (arity 3) allocates for `n` keys, after
    the sizing in xor_singleheader's binaryfusefilter.h (`binary_fuse8_allocate`): a capacity of
    n x max(1.125, 0.875 + 0.25 ln 1e6 / ln n), rounded up to whole segments of at most
    2**floor(ln n / ln 3.33 + 2.25) (and 2**18), at least three segments. The library may choose
    shorter segments for some n (then it allocates up to a segment less), never longer ones:
    tests/test_digest.py checks the bound against the library."""
    if n <= 1:
        return 12 if n == 1 else 0
    seg = min(1 << int(math.floor(math.log(n) / math.log(3.33) + 2.25)), 262144)
    capacity = round(n * max(1.125, 0.875 + 0.25 * math.log(1e6) / math.log(n)))
    return max(-(-capacity // seg) * seg, 3 * seg)


def filter_bytes(kind: str, n: int) -> int:
    """At most the serialized size of a `kind` filter over `n` distinct keys (0 for none); the
    16-bit kind's serialization counts 4 bytes more than its fields."""
    if n == 0:
        return 0
    bits = FILTER_KINDS[kind][1]
    return _FILTER_HEADER + fingerprints_for(n) * bits // 8 + (4 if bits == 16 else 0)


def bytes_per_block(kind: str, n: int = 1_000_000) -> float:
    """Wire bytes per block of a `kind` digest over `n` blocks (~1.13 / 2.26 at a million)."""
    return (filter_bytes(kind, n) + HEADER_BYTES) / n


def max_blocks_for(kind: str, max_bytes: int) -> int:
    """The most blocks a digest of `kind` may hold and stay within `max_bytes` on the wire."""
    lo, hi = 0, max(0, max_bytes * 8 // FILTER_KINDS[kind][1])  # at least 1 fingerprint per key
    while lo < hi:  # the size grows with n (up to segment steps): the largest n that fits
        mid = (lo + hi + 1) // 2
        if filter_bytes(kind, mid) + HEADER_BYTES <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


class BlockFilter:
    """An immutable set of uint64 block hashes with false positives and no false negatives.

    Build with `BlockFilter.build(kind, hashes)`, read back with `from_bytes`. Not thread-safe
    to free while another thread looks up (nothing here shares one across threads).
    """

    __slots__ = ("kind", "num_keys", "_ptr", "_contain", "_free", "__weakref__")

    def __init__(self, kind: str, num_keys: int, ptr: Any) -> None:
        self.kind = kind
        self.num_keys = num_keys
        self._ptr = ptr
        if ptr is None:
            self._contain = None
            self._free = None
        else:
            prefix = FILTER_KINDS[kind][0]
            self._contain = getattr(lib, f"{prefix}_contain")
            self._free = getattr(lib, f"{prefix}_free")

    @classmethod
    def build(cls, kind: str, hashes: np.ndarray | Collection[int], distinct: bool = False) -> BlockFilter:
        """A filter of `kind` over `hashes` (uint64; duplicates allowed unless `distinct` says
        there are none, e.g. a hash map's keys). ValueError for an unknown kind; MemoryError if
        the library cannot allocate."""
        if kind not in FILTER_KINDS:
            raise ValueError(f"unknown digest filter {kind!r}; use one of {sorted(FILTER_KINDS)}")
        if isinstance(hashes, np.ndarray):
            keys = hashes.astype(np.uint64, copy=False)
        else:
            keys = np.fromiter(hashes, dtype=np.uint64, count=len(hashes))
        if not distinct:
            keys = np.unique(keys)  # the C populate wants distinct keys
        if len(keys) == 0:
            return cls(kind, 0, None)
        prefix = FILTER_KINDS[kind][0]
        ptr = ffi.new(f"{prefix}_t *")
        if not getattr(lib, f"{prefix}_allocate")(len(keys), ptr):
            raise MemoryError(f"cannot allocate a {kind} filter for {len(keys)} blocks")
        keys = np.ascontiguousarray(keys)
        if not getattr(lib, f"{prefix}_populate")(ffi.cast("uint64_t *", ffi.from_buffer(keys)), len(keys), ptr):
            getattr(lib, f"{prefix}_free")(ptr)
            raise ValueError(f"the {kind} filter could not be built from {len(keys)} blocks")
        return cls(kind, len(keys), ptr)

    @classmethod
    def from_bytes(cls, kind: str, num_keys: int, data: bytes) -> BlockFilter:
        """The filter `to_bytes` wrote (the library's serialization, copied on load)."""
        if kind == EMPTY:
            if data:
                raise EventDecodeError("an empty digest carries no filter data")
            return cls(EMPTY, 0, None)
        if kind not in FILTER_KINDS:
            raise EventDecodeError(f"unknown digest filter {kind!r}; known: {sorted(FILTER_KINDS)}")
        prefix = FILTER_KINDS[kind][0]
        # The library reads its header and then the fingerprints without a bounds check: accept
        # only a buffer that holds as many fingerprints as that header says.
        ptr = ffi.new(f"{prefix}_t *")
        if len(data) < _FILTER_HEADER:
            raise EventDecodeError(f"{kind} filter data too short ({len(data)} bytes)")
        # binary_fuse*_serialize: Seed (u64), then Size, SegmentLength, SegmentCount,
        # SegmentCountLength, ArrayLength (u32 each), then ArrayLength fingerprints (the 16-bit
        # kind's serialization_bytes counts 4 bytes more than it writes).
        array_length = int(np.frombuffer(data, dtype="<u4", count=7)[6])
        need = _FILTER_HEADER + array_length * (FILTER_KINDS[kind][1] // 8)
        if not need <= len(data) <= need + 8:
            raise EventDecodeError(f"{kind} filter data is {len(data)} bytes, its header says {need}")
        getattr(lib, f"{prefix}_deserialize")(ptr, ffi.from_buffer(data))
        if ptr.Fingerprints == ffi.NULL and array_length:
            raise MemoryError(f"cannot allocate a {kind} filter of {len(data)} bytes")
        return cls(kind, num_keys, ptr)

    def to_bytes(self) -> bytes:
        if self._ptr is None:
            return b""
        prefix = FILTER_KINDS[self.kind][0]
        buf = ffi.new("char[]", getattr(lib, f"{prefix}_serialization_bytes")(self._ptr))
        getattr(lib, f"{prefix}_serialize")(self._ptr, buf)
        return bytes(ffi.buffer(buf))

    @property
    def size_bytes(self) -> int:
        """What `to_bytes` returns the length of, without serializing."""
        if self._ptr is None:
            return 0
        return getattr(lib, f"{FILTER_KINDS[self.kind][0]}_serialization_bytes")(self._ptr)

    @property
    def kind_on_wire(self) -> str:
        return EMPTY if self._ptr is None else self.kind

    def __contains__(self, block_hash: int) -> bool:
        return self._ptr is not None and bool(self._contain(block_hash, self._ptr))

    def prefix_len(self, chain: Sequence[int]) -> int:
        """Leading hashes of `chain` that are all in the filter (a replica's cached prefix)."""
        if self._ptr is None:
            return 0
        contain, ptr = self._contain, self._ptr
        n = 0
        for h in chain:
            if not contain(h, ptr):
                break
            n += 1
        return n

    def __del__(self) -> None:
        if self._ptr is not None and self._free is not None:
            self._free(self._ptr)
            self._ptr = None


@dataclass(frozen=True, slots=True)
class CacheDigest:
    """A replica's prefix cache as a filter, as of KV batch `kv_seq` (None: none published).

    `num_blocks` is what the replica held; the filter holds `filter.num_keys` of them (fewer
    only when the digest's size bound left some out)."""

    ts: float  # unix seconds when the replica took it
    epoch: int  # the publisher process (protocol/load.py's LoadReport.epoch)
    kv_seq: int | None
    block_size: int
    num_blocks: int
    filter: BlockFilter

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_blocks < 0:
            raise ValueError("a digest needs block_size > 0 and num_blocks >= 0")

    def prefix_len(self, chain: Sequence[int]) -> int:
        return self.filter.prefix_len(chain)


def encode_digest(d: CacheDigest) -> bytes:
    return encode_state("digest", d.ts, d.epoch, d.kv_seq, version=DIGEST_VERSION, block_size=d.block_size,
                        num_blocks=d.num_blocks, num_keys=d.filter.num_keys, filter=d.filter.kind_on_wire,
                        data=d.filter.to_bytes())


def _int(obj: dict[Any, Any], key: str) -> Any:
    value = obj.get(key)
    if type(value) is not int or value < 0:
        raise EventDecodeError(f"digest field {key!r} must be a non-negative int, got {value!r:.40}")
    return value


def decode_digest(payload: bytes) -> CacheDigest:
    """Tolerant of unknown keys and of newer versions that keep these fields; EventDecodeError
    for a missing or mistyped field or filter data that does not match its header."""
    obj, ts, epoch, kv_seq = decode_state(payload, "digest")
    data = obj.get("data")
    if not isinstance(data, bytes):
        raise EventDecodeError("digest data must be bytes")
    kind = obj.get("filter")
    if not isinstance(kind, str):
        raise EventDecodeError("digest filter must be a string")
    block_size = _int(obj, "block_size")
    if block_size == 0:
        raise EventDecodeError("digest block_size must be positive")
    filt = BlockFilter.from_bytes(kind, _int(obj, "num_keys"), data)
    return CacheDigest(ts=ts, epoch=epoch, kv_seq=kv_seq, block_size=block_size, num_blocks=_int(obj, "num_blocks"),
                       filter=filt)
