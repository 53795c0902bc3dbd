"""kvfleet's own messages beside the vLLM-format KV events: load reports and cache snapshots.

Neither exists in vLLM, so neither may disturb a vLLM-format reader on the same PUB socket.

Framing (the "extras" layout): four frames, on a topic of their own and with a seq counter of
their own (one per topic, from 0 per publisher):

    [topic, seq (8 bytes BE), payload (msgpack map), EXTRAS_MARKER]

Why four frames: with vLLM's default empty KV topic a SUB socket subscribed to the KV topic
receives every topic (ZMQ subscriptions are prefix matches), so topics alone cannot hide these
messages. Every vLLM-format reader we checked drops a message that is not exactly three frames
*before* it looks at the seq or the payload, so a foreign message can neither break its decoder
nor its gap detection: vLLM's examples/online_serving/kv_events_subscriber.py
(`_, seq_bytes, payload = sub.recv_multipart()` raises inside its try and the loop goes on),
llm-d-kv-cache (`pkg/kvevents/zmq_subscriber.go`: "Unexpected frame count", continue) and
Dynamo's zmq listener ("Unexpected ZMQ frame count", continue). Such readers log one line per
foreign message; give the KV stream a non-empty topic (vLLM users commonly set `kv@<pod>@<model>`)
and readers that subscribe to it never see the extras at all.

Load reports go out on the PUB socket (topic `kvfleet.load` by default). Snapshots are replies
on the replay ROUTER socket, only to the DEALER that asked:

    request  = [b"", SNAPSHOT_REQUEST]
    reply    = [b"", snapshot topic, seq (snapshot counter), payload]

A vLLM ROUTER reads any 3-frame request as "replay from int.from_bytes(frame)": for the 16-byte
SNAPSHOT_REQUEST that is a number past every buffered seq, so vLLM answers with just its end
marker, which tells a kvfleet subscriber "this publisher has no snapshots" at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.events import (
    BlockStored,
    EventDecodeError,
    decode_seq,
    encode_seq,
    event_from_wire,
    event_to_wire,
    pack,
    unpack,
)
from protocol.roles import BOTH, ROLES

EXTRAS_MARKER = b"kvfleet/1"
SNAPSHOT_REQUEST = b"kvfleet.snapshot"  # 16 bytes: never mistaken for an 8-byte replay start seq
DEFAULT_LOAD_TOPIC = b"kvfleet.load"
DEFAULT_SNAPSHOT_TOPIC = b"kvfleet.snapshot"
WIRE_VERSION = 1


@dataclass(frozen=True, slots=True)
class StepSample:
    """One executed engine step: what it processed and how long it took (seconds).

    Enough to fit a step-time model such as Preble's `a + b*new + c*context + d*new*context`
    or Vidur's per-operator terms (design §8).
    """

    start: float  # engine clock at step start; identifies the step across consecutive reports
    duration: float
    prefill_tokens: int
    decode_tokens: int
    num_seqs: int
    context_tokens: int = 0  # KV tokens the batch attended to
    decode_context_tokens: int = 0  # of which, the context of single-token decode sequences
    # Prompt tokens whose KV this step loaded from an offload tier (host memory, disk) into the
    # pool before it ran, instead of computing them (replica/kv_offload.py); 0 without tiers.
    loaded_tokens: int = 0
    # Of those, the tokens loaded from the disk tier (the rest came from host memory).
    loaded_disk_tokens: int = 0
    # The prefill chunks' attention work, Σ new_i × (context_i + new_i / 2) over the step's
    # prefill chunks (replica.step_model.StepFeatures.prefill_ctx_product); 0: not reported (an
    # older replica).
    prefill_attention: float = 0.0


@dataclass(frozen=True, slots=True)
class TierUsage:
    """One KV offload tier of a replica in its load report: medium as in the KV events."""

    medium: str  # "CPU" (host memory) or "STORAGE" (protocol.events' media)
    blocks: int  # held now
    capacity: int  # blocks it can hold


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A replica's load, published periodically.

    `epoch` identifies the publisher process (the publisher stamps it): a new value means the
    replica restarted, even if its KV seq happened to climb past the old one unseen.
    """

    replica_id: str
    ts: float  # unix seconds
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int  # prompt tokens still to prefill, over waiting + running requests
    running_decode_tokens: int  # KV tokens held by decoding requests
    free_blocks: int
    total_blocks: int
    block_size: int
    kv_usage: float  # fraction of blocks in use, 0..1 (vllm:kv_cache_usage_perc)
    num_preemptions_total: int = 0
    steps: tuple[StepSample, ...] = field(default_factory=tuple)
    epoch: int = 0
    # LoRA adapters resident on the replica now (what a request for one of them finds loaded),
    # and the seconds its adapter loads took, on average (0: none measured yet). Both absent
    # from an older replica's reports: it then holds no adapters as far as routing knows.
    loras: tuple[str, ...] = ()
    lora_load_s: float = 0.0
    # The replica's KV offload tiers, host first (absent from an older replica's reports: none).
    tiers: tuple[TierUsage, ...] = ()
    # What the replica is for in a disaggregated fleet (`kvfleet replica --role`): "prefill",
    # "decode" or "both" (vLLM's kv_producer / kv_consumer / kv_both). Absent from an older
    # replica's reports: "both".
    role: str = BOTH

    def __post_init__(self) -> None:
        for name in ("num_running", "num_waiting", "queued_prefill_tokens", "running_decode_tokens",
                     "free_blocks", "total_blocks", "num_preemptions_total"):
            if getattr(self, name) < 0:
                raise ValueError(f"LoadReport.{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size <= 0:
            raise ValueError(f"LoadReport.block_size must be positive, got {self.block_size}")
        if not (0.0 <= self.kv_usage <= 1.0):
            raise ValueError(f"LoadReport.kv_usage must be in [0, 1], got {self.kv_usage}")
        if not self.lora_load_s >= 0.0:
            raise ValueError(f"LoadReport.lora_load_s must be >= 0, got {self.lora_load_s}")
        if self.role not in ROLES:
            raise ValueError(f"LoadReport.role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole prefix cache of a replica as `BlockStored` events (parents before children),
    consistent with KV batch `kv_seq`: applying the snapshot and then every batch with
    seq > kv_seq rebuilds the cache. `kv_seq` is None when no batch had been published yet."""

    ts: float
    kv_seq: int | None
    events: tuple[BlockStored, ...]
    epoch: int = 0


# --- framing ------------------------------------------------------------------------------------


def encode_extras_message(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    return [bytes(topic), encode_seq(seq), payload, EXTRAS_MARKER]


def is_extras_message(frames: Sequence[bytes]) -> bool:
    return len(frames) == 4 and frames[3] == EXTRAS_MARKER


def split_extras_message(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    if not is_extras_message(frames):
        raise EventDecodeError("not a kvfleet extras message [topic, seq, payload, marker]")
    return bytes(frames[0]), decode_seq(frames[1]), bytes(frames[2])


# --- load reports -------------------------------------------------------------------------------

_STEP_FIELDS = ("start", "duration", "prefill_tokens", "decode_tokens", "num_seqs", "context_tokens",
                "decode_context_tokens", "loaded_tokens", "loaded_disk_tokens", "prefill_attention")


def encode_load(report: LoadReport) -> bytes:
    """msgpack map; steps as arrays in `_STEP_FIELDS` order (compact: reports carry many)."""
    return pack({
        "v": WIRE_VERSION,
        "kind": "load",
        "replica_id": report.replica_id,
        "ts": float(report.ts),
        "epoch": report.epoch,
        "num_running": report.num_running,
        "num_waiting": report.num_waiting,
        "queued_prefill_tokens": report.queued_prefill_tokens,
        "running_decode_tokens": report.running_decode_tokens,
        "free_blocks": report.free_blocks,
        "total_blocks": report.total_blocks,
        "block_size": report.block_size,
        "kv_usage": float(report.kv_usage),
        "num_preemptions_total": report.num_preemptions_total,
        "steps": [[float(s.start), float(s.duration), s.prefill_tokens, s.decode_tokens, s.num_seqs, s.context_tokens,
                   s.decode_context_tokens, s.loaded_tokens, s.loaded_disk_tokens, float(s.prefill_attention)]
                  for s in report.steps],
        "loras": list(report.loras),
        "lora_load_s": float(report.lora_load_s),
        "tiers": [[t.medium, t.blocks, t.capacity] for t in report.tiers],
        "role": report.role,
    })


def _map(payload: bytes, kind: str) -> dict[Any, Any]:
    obj = unpack(payload)
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise EventDecodeError(f"not a kvfleet {kind} message")
    return obj


def _num(obj: dict[Any, Any], key: str, kind: type = int, default: Any = None) -> Any:
    value = obj.get(key, default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        raise EventDecodeError(f"field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def decode_load(payload: bytes) -> LoadReport:
    """Tolerant of unknown keys; EventDecodeError for a missing or mistyped field."""
    obj = _map(payload, "load")
    steps = []
    raw_steps = obj.get("steps", ())
    if not isinstance(raw_steps, tuple):
        raise EventDecodeError("load report steps must be an array")
    for raw in raw_steps:
        if not isinstance(raw, tuple) or len(raw) < 5:
            raise EventDecodeError(f"a step sample is an array {_STEP_FIELDS}, got {raw!r}")
        steps.append(StepSample(float(raw[0]), float(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]),
                                int(raw[5]) if len(raw) > 5 else 0, int(raw[6]) if len(raw) > 6 else 0,
                                int(raw[7]) if len(raw) > 7 else 0, int(raw[8]) if len(raw) > 8 else 0,
                                float(raw[9]) if len(raw) > 9 else 0.0))
    replica_id = obj.get("replica_id")
    if not isinstance(replica_id, str):
        raise EventDecodeError("load report replica_id must be a string")
    loras = obj.get("loras", ())
    if not isinstance(loras, tuple) or not all(isinstance(n, str) for n in loras):
        raise EventDecodeError("load report loras must be an array of adapter names")
    tiers = obj.get("tiers", ())
    if not isinstance(tiers, tuple) or not all(
            isinstance(t, tuple) and len(t) == 3 and isinstance(t[0], str) and type(t[1]) is int and type(t[2]) is int
            for t in tiers):
        raise EventDecodeError("load report tiers must be an array of [medium, blocks, capacity]")
    role = obj.get("role", BOTH)
    if role not in ROLES:
        raise EventDecodeError(f"load report role must be one of {ROLES}, got {role!r}")
    try:
        return LoadReport(
            replica_id=replica_id,
            ts=_num(obj, "ts", float),
            num_running=_num(obj, "num_running"),
            num_waiting=_num(obj, "num_waiting"),
            queued_prefill_tokens=_num(obj, "queued_prefill_tokens"),
            running_decode_tokens=_num(obj, "running_decode_tokens"),
            free_blocks=_num(obj, "free_blocks"),
            total_blocks=_num(obj, "total_blocks"),
            block_size=_num(obj, "block_size"),
            kv_usage=_num(obj, "kv_usage", float),
            num_preemptions_total=_num(obj, "num_preemptions_total", int, 0),
            steps=tuple(steps),
            epoch=_num(obj, "epoch", int, 0),
            loras=loras,
            lora_load_s=_num(obj, "lora_load_s", float, 0.0),
            tiers=tuple(TierUsage(*t) for t in tiers),
            role=role,
        )
    except ValueError as e:  # LoadReport's own validation
        if isinstance(e, EventDecodeError):
            raise
        raise EventDecodeError(f"invalid load report: {e}") from e


# --- snapshots ----------------------------------------------------------------------------------


# --- a replica's cache as of a KV batch: snapshots here, digests in protocol/digest.py ---------------


def encode_state(kind: str, ts: float, epoch: int, kv_seq: int | None, *, version: int = WIRE_VERSION,
                 **body: Any) -> bytes:
    """A message about a replica's cache as of KV batch `kv_seq` (None: none published yet) from
    publisher `epoch`: the msgpack map {v, kind, ts, epoch, kv_seq, **body}."""
    return pack({"v": version, "kind": kind, "ts": float(ts), "epoch": epoch, "kv_seq": kv_seq, **body})


def decode_state(payload: bytes, kind: str, *,
                 epoch_default: int | None = None) -> tuple[dict[Any, Any], float, int, int | None]:
    """An `encode_state` message of `kind`: its map and its (ts, epoch, kv_seq). EventDecodeError
    for another kind or a mistyped header; `epoch_default` stands in for a missing epoch (None:
    the epoch is required)."""
    obj = _map(payload, kind)
    kv_seq = obj.get("kv_seq")
    if kv_seq is not None and (type(kv_seq) is not int or kv_seq < 0):
        raise EventDecodeError(f"{kind} kv_seq must be a non-negative int or nil, got {kv_seq!r:.40}")
    epoch = _num(obj, "epoch", int, epoch_default)
    if epoch < 0:
        raise EventDecodeError(f"{kind} epoch must be a non-negative int, got {epoch}")
    return obj, _num(obj, "ts", float), epoch, kv_seq


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return encode_state("snapshot", snapshot.ts, snapshot.epoch, snapshot.kv_seq,
                        events=[event_to_wire(e) for e in snapshot.events])


def decode_snapshot(payload: bytes) -> Snapshot:
    obj, ts, epoch, kv_seq = decode_state(payload, "snapshot", epoch_default=0)  # epoch: absent before v1 had it
    raw_events = obj.get("events")
    if not isinstance(raw_events, tuple):
        raise EventDecodeError("snapshot events must be an array")
    events = []
    for raw in raw_events:
        event = event_from_wire(raw)
        if not isinstance(event, BlockStored):
            raise EventDecodeError(f"a snapshot holds only BlockStored events, got {raw!r:.80}")
        events.append(event)
    return Snapshot(ts=ts, kv_seq=kv_seq, events=tuple(events), epoch=epoch)
