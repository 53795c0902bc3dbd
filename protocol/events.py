"""KV-cache event records and their wire codec (design §4): what a block pool appends, a publisher
ships and a subscriber reads back.

The records mirror vLLM 0.33's `BlockStored`, `BlockRemoved` and `AllBlocksCleared`
(vllm/distributed/kv_events.py). Hashes are opaque engine ids (uint64 for kvfleet replicas;
int64 or bytes from other engines); a subscriber re-hashes `token_ids` with `protocol.hashing`
and uses the engine ids only for parent links and removals.

Wire layout, as vLLM 0.33 writes it with msgspec (`omit_defaults=True`):

    ZMQ message  = [topic, seq (uint64 big-endian, 8 bytes), payload]
    payload      = msgpack array [ts: float64, events: array, data_parallel_rank: int]
                   (`EventBatch` stays `array_like=True`; a None rank is omitted -> 2 elements)
    event        = msgpack map, "type" first, then the fields in declaration order
                   (vllm-project/vllm#42892 dropped `array_like` from the event structs only)
      BlockStored      : type, block_hashes, parent_block_hash, token_ids, block_size, lora_id,
                         medium, lora_name, [extra_keys], [group_idx], [kv_cache_spec_kind],
                         [kv_cache_spec_sliding_window]      ([...] = has a None default: omitted
                                                              when None)
      BlockRemoved     : type, block_hashes, medium, [group_idx]
      AllBlocksCleared : type

Older publishers (vLLM <= 0.23, SGLang before sgl-project/sglang#37482) wrote each event as a
positional array `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
lora_id, medium, ...]` and the batch as `[ts, events]`. `decode_batch` reads both.

Replay (vLLM's ROUTER socket; a client must use DEALER, a REQ socket gets only the first reply):
    request  = [b"", start_seq (8 bytes BE)]
    reply    = [b"", topic, seq, payload] per buffered batch with seq >= start_seq
               (no topic frame before vllm-project/vllm#45177, i.e. vLLM <= 0.25)
    end      = [b"", b"", 0xFF * 8, b""]  (without the empty topic frame on <= 0.25)
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

EngineHash = int | bytes

_U64_MASK = (1 << 64) - 1

# The `medium` of BlockStored / BlockRemoved: which tier of the engine holds the blocks.
# vLLM's media (vllm/distributed/kv_events.py MEDIUM_GPU; vllm/v1/kv_offload/base.py `Medium`:
# CPU = "CPU" for host memory, STORAGE = "STORAGE" for the file-system tier below it, the
# disk-backed tiering/fs FileSystemTierManager's). Readers of vLLM's events know these: Dynamo's
# router (lib/kv-router/src/protocols.rs `StorageTier::from_kv_medium`: "STORAGE" is its Disk
# tier) and llm-d's (pkg/kvcache DefaultKVCacheBackendConfig: "storage" covers vLLM's tiering).
MEDIUM_GPU = "GPU"  # the device pool
MEDIUM_CPU = "CPU"  # host memory
MEDIUM_DISK = "STORAGE"  # a local disk (or file system) tier

# Other publishers' spellings -> the three above: Dynamo's `from_kv_medium` aliases (GPU/DEVICE;
# CPU/CPU_PINNED/CPU_TIER1; CPU_TIER2/DISK/NVME/STORAGE), its External tier (EXTERNAL/NETWORK/
# REMOTE/SHARED), which it credits at the disk's weight (`--router-disk-cache-hit-weight`: "disk
# or other lower-tier cache hits"), and "Disk" (kvfleet replicas before they sent "STORAGE"; a
# DiskLoadStoreSpec in some vLLM trees' mediums.py). Matched as given, then upper-cased.
_MEDIUM_ALIASES = {
    "GPU": MEDIUM_GPU, "DEVICE": MEDIUM_GPU,
    "CPU": MEDIUM_CPU, "CPU_PINNED": MEDIUM_CPU, "CPU_TIER1": MEDIUM_CPU,
    "STORAGE": MEDIUM_DISK, "DISK": MEDIUM_DISK, "CPU_TIER2": MEDIUM_DISK, "NVME": MEDIUM_DISK,
    "EXTERNAL": MEDIUM_DISK, "NETWORK": MEDIUM_DISK, "REMOTE": MEDIUM_DISK, "SHARED": MEDIUM_DISK,
}


def canonical_medium(medium: str | None) -> str:
    """The tier an event's `medium` names: MEDIUM_GPU (also for None: vLLM < 0.10 sent no
    medium and meant the GPU), MEDIUM_CPU or MEDIUM_DISK for the spellings above (any case);
    any other medium unchanged (a lower tier of its own, neither host memory nor disk). Pure."""
    if medium is None:
        return MEDIUM_GPU
    canonical = _MEDIUM_ALIASES.get(medium)
    if canonical is None:
        canonical = _MEDIUM_ALIASES.get(medium.upper(), medium)
    return canonical


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    group_idx: int | None = 0
    kv_cache_spec_kind: str | None = "full_attention"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[EngineHash, ...]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message: a timestamp (unix seconds), the events, the data-parallel rank."""

    ts: float
    events: tuple[KVEvent, ...] = field(default_factory=tuple)
    data_parallel_rank: int | None = None


class EventDecodeError(ValueError):
    """A payload or frame set that is not a KV event batch in any layout we know."""


# --- frames -------------------------------------------------------------------------------------

SEQ_BYTES = 8
# vLLM's `ZmqEventPublisher.END_SEQ = (-1).to_bytes(8, "big", signed=True)`.
REPLAY_END_SEQ = b"\xff" * SEQ_BYTES
REPLAY_END_SEQ_INT = int.from_bytes(REPLAY_END_SEQ, "big")


def encode_seq(seq: int) -> bytes:
    """A sequence number as the 8-byte big-endian unsigned frame vLLM sends."""
    if not 0 <= seq < REPLAY_END_SEQ_INT:
        raise ValueError(f"seq must be in [0, 2**64 - 1), got {seq}")
    return seq.to_bytes(SEQ_BYTES, "big")


def decode_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise EventDecodeError(f"sequence frame must be {SEQ_BYTES} bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def encode_message(topic: bytes, seq: int, batch: EventBatch) -> list[bytes]:
    """The three frames of one PUB message: [topic, seq, payload]."""
    return [bytes(topic), encode_seq(seq), encode_batch(batch)]


def split_message(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    """(topic, seq, payload) of a PUB message; EventDecodeError unless it has exactly 3 frames."""
    if len(frames) != 3:
        raise EventDecodeError(f"a KV event message has 3 frames (topic, seq, payload), got {len(frames)}")
    return bytes(frames[0]), decode_seq(frames[1]), bytes(frames[2])


def encode_replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to ask for every buffered batch with seq >= start_seq."""
    return [b"", encode_seq(start_seq)]


def encode_replay_reply(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """One replayed batch, as vLLM >= 0.26 sends it (a ROUTER prepends the client identity)."""
    return [b"", bytes(topic), encode_seq(seq), payload]


def replay_end_frames() -> list[bytes]:
    """The end-of-replay marker, with the (empty) topic frame of vLLM >= 0.26."""
    return [b"", b"", REPLAY_END_SEQ, b""]


class ReplayReply(NamedTuple):
    """One message read from a replay DEALER. `seq` is None for the end marker; `topic` is None
    when the publisher sent no topic frame (vLLM <= 0.25, SGLang)."""

    topic: bytes | None
    seq: int | None
    payload: bytes


def parse_replay_reply(frames: Sequence[bytes]) -> ReplayReply:
    """Read a reply with or without the leading empty delimiter and with or without a topic."""
    parts = list(frames)
    if parts and parts[0] == b"" and len(parts) in (3, 4):
        parts = parts[1:]
    if len(parts) == 3:
        topic, seq_frame, payload = parts
    elif len(parts) == 2:
        topic, (seq_frame, payload) = None, parts
    else:
        raise EventDecodeError(f"replay reply must be [b'', topic?, seq, payload], got {len(frames)} frames")
    if seq_frame == REPLAY_END_SEQ:
        return ReplayReply(None if topic is None else bytes(topic), None, b"")
    return ReplayReply(None if topic is None else bytes(topic), decode_seq(seq_frame), bytes(payload))


# --- encoding -----------------------------------------------------------------------------------


def event_to_wire(event: KVEvent) -> dict[str, Any]:
    """The msgpack map vLLM 0.33 writes for one event (key order = vLLM's field order)."""
    if type(event) is BlockStored:
        d: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            # No default in vLLM's struct: always written, even when None.
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
        # `extra_keys` would sit here; kvfleet has none (None is vLLM's default, so omitted).
        if event.group_idx is not None:
            d["group_idx"] = event.group_idx
        if event.kv_cache_spec_kind is not None:
            d["kv_cache_spec_kind"] = event.kv_cache_spec_kind
        return d
    if type(event) is BlockRemoved:
        d = {"type": "BlockRemoved", "block_hashes": list(event.block_hashes), "medium": event.medium}
        if event.group_idx is not None:
            d["group_idx"] = event.group_idx
        return d
    if type(event) is AllBlocksCleared:
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {event!r}")


def pack(obj: Any) -> bytes:
    """msgpack with str as str and bytes as bin (what msgspec writes)."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(f"cannot encode for the wire: {e}") from e


def encode_batch(batch: EventBatch) -> bytes:
    """The payload frame: msgpack `[ts, [event maps...], data_parallel_rank]` (rank omitted if None)."""
    body: list[Any] = [float(batch.ts), [event_to_wire(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    return pack(body)


# --- decoding -----------------------------------------------------------------------------------


def _hash(value: Any, what: str) -> EngineHash:
    # Ints are normalised to uint64 (two's complement), as llm-d's getHashAsUint64 does: SGLang
    # sends int64 that may be negative; a consumer must treat both spellings as one id.
    if type(value) is int:
        return value & _U64_MASK
    if isinstance(value, bytes):
        return value
    raise EventDecodeError(f"{what}: a block hash must be an int or bytes, got {type(value).__name__}")


def _hashes(value: Any) -> tuple[EngineHash, ...]:
    if not isinstance(value, (list, tuple)):
        raise EventDecodeError(f"block_hashes must be an array, got {type(value).__name__}")
    try:
        array("Q", value)  # C-speed check: every element an int in [0, 2**64)
        return tuple(value)
    except (TypeError, OverflowError):
        return tuple(_hash(h, "block_hashes") for h in value)


def _tokens(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        try:
            array("q", value)  # C-speed check: every element an int
            return tuple(value)
        except (TypeError, OverflowError):
            pass
    raise EventDecodeError("token_ids must be an array of ints")


def _opt(value: Any, kind: type, what: str) -> Any:
    if value is None or type(value) is kind:
        return value
    raise EventDecodeError(f"{what} must be {kind.__name__} or nil, got {type(value).__name__}")


def _block_stored(f: Callable[[str, Any], Any]) -> BlockStored:
    block_size = f("block_size", None)
    if type(block_size) is not int or block_size <= 0:
        raise EventDecodeError(f"BlockStored.block_size must be a positive int, got {block_size!r}")
    parent = f("parent_block_hash", None)
    if parent is not None:
        parent = _hash(parent, "parent_block_hash")
    lora_id, medium, lora_name = f("lora_id", None), f("medium", None), f("lora_name", None)
    group_idx, kind = f("group_idx", None), f("kv_cache_spec_kind", None)
    # The optional fields, checked inline (this runs once per event on the subscriber's path).
    if not ((lora_id is None or type(lora_id) is int) and (medium is None or type(medium) is str)
            and (lora_name is None or type(lora_name) is str) and (group_idx is None or type(group_idx) is int)
            and (kind is None or type(kind) is str)):
        _opt(lora_id, int, "lora_id"), _opt(medium, str, "medium"), _opt(lora_name, str, "lora_name")
        _opt(group_idx, int, "group_idx"), _opt(kind, str, "kv_cache_spec_kind")
    return BlockStored(_hashes(f("block_hashes", None)), parent, _tokens(f("token_ids", None)), block_size,
                       lora_id, medium, lora_name, group_idx, kind)


def _block_removed(f: Callable[[str, Any], Any]) -> BlockRemoved:
    return BlockRemoved(
        block_hashes=_hashes(f("block_hashes", None)),
        medium=_opt(f("medium", None), str, "medium"),
        group_idx=_opt(f("group_idx", None), int, "group_idx"),
    )


def _all_cleared(f: Callable[[str, Any], Any]) -> AllBlocksCleared:
    return AllBlocksCleared()


# The explicit tag -> decoder table (msgspec's tag is the class name).
_DECODERS: dict[str, Callable[[Callable[[str, Any], Any]], KVEvent]] = {
    "BlockStored": _block_stored,
    "BlockRemoved": _block_removed,
    "AllBlocksCleared": _all_cleared,
}

# Positions of the fields in the array events of vLLM <= 0.23 (index 0 is the tag). Positions
# past `medium` differ between engines (SGLang put a `metadata` map at 7), so `_opt` type checks
# reject a foreign value there and it reads as "absent" (see `_positional`).
_POSITIONS: dict[str, dict[str, int]] = {
    "BlockStored": {
        "block_hashes": 1, "parent_block_hash": 2, "token_ids": 3, "block_size": 4, "lora_id": 5,
        "medium": 6, "lora_name": 7, "group_idx": 9, "kv_cache_spec_kind": 10,
    },
    "BlockRemoved": {"block_hashes": 1, "medium": 2, "group_idx": 3},
    "AllBlocksCleared": {},
}
_OPTIONAL_TYPES = {"lora_id": int, "medium": str, "lora_name": str, "group_idx": int, "kv_cache_spec_kind": str}


def _positional(tag: str, arr: Sequence[Any]) -> Callable[[str, Any], Any]:
    pos = _POSITIONS[tag]

    def get(name: str, default: Any) -> Any:
        i = pos.get(name)
        if i is None or i >= len(arr):
            return default
        value = arr[i]
        kind = _OPTIONAL_TYPES.get(name)
        if kind is not None and value is not None and type(value) is not kind:
            return default  # another engine's field at this position
        return value

    return get


def event_from_wire(obj: Any, on_unknown: Callable[[str], None] | None = None) -> KVEvent | None:
    """One event from its map (vLLM >= 0.24) or positional array (<= 0.23) form.

    Returns None for an unknown event type (after calling `on_unknown(tag)`); raises
    EventDecodeError for anything malformed. Unknown map keys are ignored.
    """
    if isinstance(obj, dict):
        tag = obj.get("type")
        getter: Callable[[str, Any], Any] = obj.get
    elif isinstance(obj, (list, tuple)) and obj:
        tag = obj[0]
        getter = None  # type: ignore[assignment]
    else:
        raise EventDecodeError(f"an event must be a map or a non-empty array, got {type(obj).__name__}")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if not isinstance(tag, str):
        raise EventDecodeError(f"event type tag must be a string, got {tag!r}")
    decoder = _DECODERS.get(tag)
    if decoder is None:
        if on_unknown is not None:
            on_unknown(tag)
        return None
    if getter is None:
        getter = _positional(tag, obj)
    return decoder(getter)


def unpack(payload: bytes) -> Any:
    """msgpack -> Python with arrays as tuples; EventDecodeError on anything unreadable."""
    try:
        return msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
    except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, StackError, ...
        raise EventDecodeError(f"payload is not valid msgpack: {e}") from e


def decode_batch(payload: bytes, *, on_unknown: Callable[[str], None] | None = None) -> EventBatch:
    """Decode a payload frame written by vLLM (any version since 0.9), SGLang or kvfleet.

    Accepts a 2- or 3-element envelope (extra trailing elements are ignored, as msgspec does),
    map or array events, int (also negative int64) or bytes hashes. Events of an unknown type are
    skipped and reported through `on_unknown(tag)`. Anything else malformed raises
    EventDecodeError, and no partial batch is returned.
    """
    obj = unpack(payload)
    if not isinstance(obj, tuple) or len(obj) < 2:
        raise EventDecodeError("payload must be an array [ts, events, data_parallel_rank?]")
    ts, raw_events = obj[0], obj[1]
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise EventDecodeError(f"batch timestamp must be a finite number, got {ts!r}")
    if not isinstance(raw_events, tuple):
        raise EventDecodeError(f"batch events must be an array, got {type(raw_events).__name__}")
    rank = obj[2] if len(obj) > 2 else None
    if rank is not None and type(rank) is not int:
        raise EventDecodeError(f"data_parallel_rank must be an int or nil, got {rank!r}")
    events = []
    for raw in raw_events:
        event = event_from_wire(raw, on_unknown)
        if event is not None:
            events.append(event)
    return EventBatch(ts=float(ts), events=tuple(events), data_parallel_rank=rank)
