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
- size: ~1.13 bytes per block for `binary_fuse8`, ~2.26 for `binary_fuse16`, plus a 44-byte
  header (bench/bench_digest.py measures it); a digest never exceeds its `max_bytes`: a replica
  holding more blocks digests the ones it will keep longest (replica/block_pool.py).

The keys are kvfleet's own chained block hashes (protocol/hashing.py), already uniform 64-bit
values, so they go into the filter as they are; the filter mixes them with its own seed.

Library: `pyfusefilter` (the Python binding of Lemire's C `xor_singleheader`), called through
its C functions on a numpy array. Its Python classes hash each key as `str(key)` in a Python loop
(about 1 µs a key, and broken with xxhash 4, which refuses str); the C functions take the uint64
keys directly, build 1M keys in tens of milliseconds with the GIL released (cffi releases it),
and serialize to the library's own portable format, which is what travels on the wire.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyfusefilter._xorfilter import ffi, lib

from protocol.events import EventDecodeError, pack, unpack

DEFAULT_DIGEST_TOPIC = b"kvfleet.digest"
DIGEST_REQUEST = b"kvfleet.digest"  # 14 bytes: never an 8-byte replay start seq
DIGEST_VERSION = 1

# name -> (C type prefix, fingerprint bits). Bits per block is about 1.13 x the fingerprint.
FILTER_KINDS: dict[str, tuple[str, int]] = {
    "binary_fuse8": ("binary_fuse8", 8),
    "binary_fuse16": ("binary_fuse16", 16),
}
EMPTY = "empty"  # no blocks: no filter, every lookup misses
HEADER_BYTES = 64  # what a digest adds to its filter on the wire, rounded up (msgpack keys and fields)


def bytes_per_block(kind: str) -> float:
    """Upper estimate of a large filter's bytes per key (binary fuse: 1.125 x fingerprint, plus
    segment rounding), for sizing a digest under `max_bytes` before building it."""
    return FILTER_KINDS[kind][1] / 8 * 1.2


def max_blocks_for(kind: str, max_bytes: int) -> int:
    """How many blocks a digest of `kind` may hold and stay within `max_bytes`."""
    return max(0, int((max_bytes - HEADER_BYTES - 256) / bytes_per_block(kind)))


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
    def build(cls, kind: str, hashes: np.ndarray | Sequence[int]) -> BlockFilter:
        """A filter of `kind` over `hashes` (uint64; duplicates allowed). ValueError for an
        unknown kind; MemoryError if the library cannot allocate."""
        if kind not in FILTER_KINDS:
            raise ValueError(f"unknown digest filter {kind!r}; use one of {sorted(FILTER_KINDS)}")
        keys = np.unique(np.asarray(hashes, dtype=np.uint64))  # the C populate wants distinct keys
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
        if len(data) < 28:
            raise EventDecodeError(f"{kind} filter data too short ({len(data)} bytes)")
        # binary_fuse*_serialize: Seed (u64), then Size, SegmentLength, SegmentCount,
        # SegmentCountLength, ArrayLength (u32 each), then ArrayLength fingerprints (the 16-bit
        # kind's serialization_bytes counts 4 bytes more than it writes).
        array_length = int(np.frombuffer(data, dtype="<u4", count=7)[6])
        need = 28 + array_length * (FILTER_KINDS[kind][1] // 8)
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
    return pack({
        "v": DIGEST_VERSION,
        "kind": "digest",
        "ts": float(d.ts),
        "epoch": d.epoch,
        "kv_seq": d.kv_seq,
        "block_size": d.block_size,
        "num_blocks": d.num_blocks,
        "num_keys": d.filter.num_keys,
        "filter": d.filter.kind_on_wire,
        "data": d.filter.to_bytes(),
    })


def _int(obj: dict[Any, Any], key: str, *, nil: bool = False) -> Any:
    value = obj.get(key)
    if value is None and nil:
        return None
    if type(value) is not int or value < 0:
        raise EventDecodeError(f"digest field {key!r} must be a non-negative int, got {value!r:.40}")
    return value


def decode_digest(payload: bytes) -> CacheDigest:
    """Tolerant of unknown keys and of newer versions that keep these fields; EventDecodeError
    for a missing or mistyped field or filter data that does not match its header."""
    obj = unpack(payload)
    if not isinstance(obj, dict) or obj.get("kind") != "digest":
        raise EventDecodeError("not a kvfleet digest message")
    data = obj.get("data")
    if not isinstance(data, bytes):
        raise EventDecodeError("digest data must be bytes")
    ts = obj.get("ts")
    if type(ts) not in (int, float):
        raise EventDecodeError(f"digest ts must be a number, got {ts!r:.40}")
    kind = obj.get("filter")
    if not isinstance(kind, str):
        raise EventDecodeError("digest filter must be a string")
    block_size = _int(obj, "block_size")
    if block_size == 0:
        raise EventDecodeError("digest block_size must be positive")
    filt = BlockFilter.from_bytes(kind, _int(obj, "num_keys"), data)
    return CacheDigest(ts=float(ts), epoch=_int(obj, "epoch"), kv_seq=_int(obj, "kv_seq", nil=True),
                       block_size=block_size, num_blocks=_int(obj, "num_blocks"), filter=filt)
