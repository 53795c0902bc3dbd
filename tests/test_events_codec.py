"""The KV event wire codec (design §4): hand-written fixtures in every layout a reader must
accept, the exact bytes kvfleet writes, round trips, frames, and kvfleet's extras."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.events import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventDecodeError,
    ReplayReply,
    decode_batch,
    encode_batch,
    encode_message,
    encode_replay_reply,
    encode_replay_request,
    parse_replay_reply,
    replay_end_frames,
    canonical_medium,
    split_message,
)
from protocol.load import (
    EXTRAS_MARKER,
    LoadReport,
    Snapshot,
    StepSample,
    TierUsage,
    decode_load,
    decode_snapshot,
    decode_state,
    encode_extras_message,
    encode_load,
    encode_snapshot,
    encode_state,
    is_extras_message,
)
from replica.kv_offload import OffloadTiers, tier_specs

U64 = (1 << 64) - 1
TOKENS = tuple(range(100, 116))


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- fixtures in each layout ------------------------------------------------------------------


def test_vllm_033_map_events_decode() -> None:
    # A batch as vLLM 0.26+ prints it (volcano-sh/kthena#1535), plus a removal and a clear.
    payload = pack([
        1789095808.8378847,
        [
            {"type": "BlockStored", "block_hashes": [15760518052499183552], "parent_block_hash": None,
             "token_ids": list(TOKENS), "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None,
             "extra_keys": [None], "group_idx": 0, "kv_cache_spec_kind": "full_attention"},
            {"type": "BlockRemoved", "block_hashes": [15760518052499183552], "medium": "GPU", "group_idx": 0},
            {"type": "AllBlocksCleared"},
        ],
        0,
    ])
    assert decode_batch(payload) == EventBatch(
        ts=1789095808.8378847,
        events=(
            BlockStored((15760518052499183552,), None, TOKENS, 16, None, "GPU", None, 0, "full_attention"),
            BlockRemoved((15760518052499183552,), "GPU", 0),
            AllBlocksCleared(),
        ),
        data_parallel_rank=0,
    )


def test_map_event_without_optional_keys_and_keys_in_any_order() -> None:
    payload = pack([2.0, [{"block_size": 16, "token_ids": list(TOKENS), "parent_block_hash": 7,
                           "block_hashes": [8], "type": "BlockStored"}]])
    (ev,) = decode_batch(payload).events
    assert ev == BlockStored((8,), 7, TOKENS, 16, None, None, None, None, None)


def test_vllm_023_positional_array_events_and_two_element_envelope() -> None:
    payload = pack([
        3.5,
        [
            ["BlockStored", [11, 12], None, list(TOKENS) * 2, 16, None, "GPU"],
            ["BlockRemoved", [11], "GPU"],
            ["AllBlocksCleared"],
        ],
    ])
    batch = decode_batch(payload)
    assert batch.data_parallel_rank is None and batch.ts == 3.5
    assert batch.events == (
        BlockStored((11, 12), None, TOKENS * 2, 16, None, "GPU", None, None, None),
        BlockRemoved((11,), "GPU", None),
        AllBlocksCleared(),
    )


def test_vllm_09_positional_events_without_medium() -> None:
    # vLLM 0.9 / early SGLang: BlockStored had 5 fields, BlockRemoved only the hashes.
    payload = pack([1.0, [["BlockStored", [1], None, list(TOKENS), 16, None], ["BlockRemoved", [1]]]])
    assert decode_batch(payload).events == (
        BlockStored((1,), None, TOKENS, 16, None, None, None, None, None),
        BlockRemoved((1,), None, None),
    )


def test_sglang_negative_int64_hashes_become_uint64() -> None:
    payload = pack([1.0, [["BlockStored", [-5, 9], -6, list(TOKENS) * 2, 16, None], ["BlockRemoved", [-5]]]])
    stored, removed = decode_batch(payload).events
    assert stored.block_hashes == (U64 - 4, 9) and stored.parent_block_hash == U64 - 5
    assert removed.block_hashes == (U64 - 4,)


def test_sglang_positional_metadata_is_not_read_as_lora_name() -> None:
    # sgl-project/sglang#37271: a salted SGLang event had a metadata map at index 7.
    payload = pack([1.0, [["BlockStored", [123], None, [1, 2], 2, None, "GPU", {"cache_salt": "tenant-a"}]], None])
    (ev,) = decode_batch(payload).events
    assert ev.lora_name is None and ev.medium == "GPU" and ev.token_ids == (1, 2)


def test_bytes_hashes_are_kept_as_bytes() -> None:
    h1, h2 = b"\x01" * 32, b"\x02" * 32
    payload = pack([1.0, [{"type": "BlockStored", "block_hashes": [h2], "parent_block_hash": h1, "token_ids": list(TOKENS),
                           "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}]])
    (ev,) = decode_batch(payload).events
    assert ev.block_hashes == (h2,) and ev.parent_block_hash == h1


def test_unknown_keys_ignored_and_unknown_event_types_skipped_and_counted() -> None:
    seen: list[str] = []
    payload = pack([
        1.0,
        [
            {"type": "BlockPinned", "block_hashes": [1]},
            {"type": "BlockRemoved", "block_hashes": [4], "medium": "CPU", "some_future_key": {"x": [1, 2]}},
            ["SomethingNew", 1, 2],
        ],
        0,
        "a trailing element a newer vLLM might add",
    ])
    batch = decode_batch(payload, on_unknown=seen.append)
    assert batch.events == (BlockRemoved((4,), "CPU", None),)
    assert seen == ["BlockPinned", "SomethingNew"]


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"",
        pack({"ts": 1.0, "events": []}),  # a map envelope
        pack([1.0]),
        pack(["now", []]),
        pack([1.0, {"type": "AllBlocksCleared"}]),
        pack([1.0, [42]]),
        pack([1.0, [{"block_hashes": [1]}]]),  # no type tag
        pack([1.0, [{"type": "BlockStored", "block_hashes": "abc", "parent_block_hash": None, "token_ids": [], "block_size": 16}]]),
        pack([1.0, [{"type": "BlockStored", "block_hashes": [1.5], "parent_block_hash": None, "token_ids": [], "block_size": 16}]]),
        pack([1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1]}]]),
        pack([1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": ["a"], "block_size": 1}]]),
        pack([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": 5}]]),
        pack([1.0, [], "rank"]),
        pack([float("nan"), []]),
    ],
)
def test_malformed_payloads_raise_a_clear_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


# --- exact bytes --------------------------------------------------------------------------------


def _s(text: str) -> bytes:  # fixstr (< 32 bytes)
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def test_encoded_kvfleet_batch_matches_bytes_derived_from_the_vllm_layout() -> None:
    batch = EventBatch(
        ts=1.5,
        events=(
            BlockStored(block_hashes=(1, U64), parent_block_hash=None, token_ids=tuple(range(1, 9)), block_size=4),
            BlockRemoved(block_hashes=(7,)),
            AllBlocksCleared(),
        ),
        data_parallel_rank=0,
    )
    # msgspec (omit_defaults): "type" first, then fields in declaration order; lora_id, medium,
    # lora_name have no default so they are written even when nil; extra_keys (nil) omitted.
    stored = (
        b"\x8a"
        + _s("type") + _s("BlockStored")
        + _s("block_hashes") + b"\x92\x01\xcf" + b"\xff" * 8
        + _s("parent_block_hash") + b"\xc0"
        + _s("token_ids") + b"\x98" + bytes(range(1, 9))
        + _s("block_size") + b"\x04"
        + _s("lora_id") + b"\xc0"
        + _s("medium") + _s("GPU")
        + _s("lora_name") + b"\xc0"
        + _s("group_idx") + b"\x00"
        + _s("kv_cache_spec_kind") + _s("full_attention")
    )
    removed = b"\x84" + _s("type") + _s("BlockRemoved") + _s("block_hashes") + b"\x91\x07" + _s("medium") + _s("GPU") + _s("group_idx") + b"\x00"
    cleared = b"\x81" + _s("type") + b"\xb0AllBlocksCleared"
    expected = b"\x93" + b"\xcb" + struct.pack(">d", 1.5) + b"\x93" + stored + removed + cleared + b"\x00"
    assert encode_batch(batch) == expected


def test_offload_media_decode_in_both_vllm_layouts_and_name_their_tier() -> None:
    # vLLM's OffloadingConnector sends a tier's blocks under its medium ("CPU", "STORAGE": vLLM's
    # `Medium`), at BlockStored's 7th field (after lora_id) and BlockRemoved's 3rd; Dynamo's KVBM
    # writes "CPU_PINNED", others "DISK" (Dynamo's StorageTier::from_kv_medium spellings).
    payload = pack([
        4.0,
        [
            {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": [],
             "block_size": 16, "lora_id": None, "medium": "CPU", "lora_name": None},
            {"type": "BlockRemoved", "block_hashes": [5], "medium": "STORAGE"},
            ["BlockStored", [6], 5, list(TOKENS), 16, None, "CPU_PINNED", None],
            ["BlockRemoved", [6], "DISK"],
        ],
        0,
    ])
    events = decode_batch(payload).events
    assert [e.medium for e in events] == ["CPU", "STORAGE", "CPU_PINNED", "DISK"]
    assert [canonical_medium(e.medium) for e in events] == [MEDIUM_CPU, MEDIUM_DISK, MEDIUM_CPU, MEDIUM_DISK]
    assert (canonical_medium(None), canonical_medium("gpu"), canonical_medium("Disk"), canonical_medium("Certus")) == (
        MEDIUM_GPU, MEDIUM_GPU, MEDIUM_DISK, "Certus")
    assert MEDIUM_DISK == "STORAGE"


def test_a_disk_tier_event_goes_out_as_vllm_lays_it_out_with_medium_disk() -> None:
    # What a replica's disk tier publishes (replica/kv_offload.py), as a vLLM-format reader sees it:
    # vLLM's field order with vLLM's medium for a disk tier, "STORAGE" (Dynamo's router reads it as
    # its disk tier too; it did not know the "Disk" kvfleet sent before).
    events: list = []
    tiers = OffloadTiers(tier_specs(1, 2), 4, events.append)
    for n, parent in ((1, None), (2, 1)):  # device blocks evicted: the second pushes the first to disk
        tiers.spill(n, n, tuple(range(4 * n, 4 * n + 4)), parent, None)
    stored = next(e for e in events if isinstance(e, BlockStored) and e.medium == MEDIUM_DISK)
    (raw,) = msgpack.unpackb(encode_batch(EventBatch(ts=1.0, events=(stored,))), raw=False)[1]
    assert list(raw)[:8] == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                             "medium", "lora_name"]
    assert raw["medium"] == "STORAGE" and raw["block_hashes"] == [1] and raw["token_ids"] == [4, 5, 6, 7]
    removed = next(e for e in events if isinstance(e, BlockRemoved))
    assert removed.medium == MEDIUM_CPU  # it left the host tier
    assert decode_batch(encode_batch(EventBatch(ts=1.0, events=tuple(events)))).events == tuple(events)


def test_none_rank_is_omitted_as_msgspec_omits_defaults() -> None:
    assert encode_batch(EventBatch(ts=2.0)) == b"\x92\xcb" + struct.pack(">d", 2.0) + b"\x90"


# --- round trips --------------------------------------------------------------------------------

hashes = st.integers(min_value=0, max_value=U64)
opt_str = st.none() | st.sampled_from(["GPU", "CPU", "disk"])


@st.composite
def stored_events(draw) -> BlockStored:
    bs = draw(st.integers(1, 8))
    n = draw(st.integers(0, 4))
    return BlockStored(
        block_hashes=tuple(draw(st.lists(hashes, min_size=n, max_size=n))),
        parent_block_hash=draw(st.none() | hashes),
        token_ids=tuple(draw(st.lists(st.integers(0, 2**32 - 1), min_size=n * bs, max_size=n * bs))),
        block_size=bs,
        lora_id=draw(st.none() | st.integers(0, 100)),
        medium=draw(opt_str),
        lora_name=draw(st.none() | st.text(max_size=5)),
        group_idx=draw(st.none() | st.integers(0, 3)),
        kv_cache_spec_kind=draw(st.none() | st.just("full_attention") | st.just("sliding_window")),
    )


events = st.one_of(
    stored_events(),
    st.builds(BlockRemoved, st.lists(hashes, max_size=4).map(tuple), opt_str, st.none() | st.integers(0, 3)),
    st.just(AllBlocksCleared()),
)


@settings(max_examples=200, deadline=None)
@given(
    ts=st.floats(min_value=0, max_value=4e9),
    evs=st.lists(events, max_size=6),
    rank=st.none() | st.integers(0, 7),
)
def test_encode_decode_round_trip(ts: float, evs: list, rank: int | None) -> None:
    batch = EventBatch(ts=ts, events=tuple(evs), data_parallel_rank=rank)
    assert decode_batch(encode_batch(batch)) == batch


# --- frames -------------------------------------------------------------------------------------


def test_message_frames() -> None:
    batch = EventBatch(ts=1.0, events=(AllBlocksCleared(),), data_parallel_rank=0)
    frames = encode_message(b"kv@pod@model", 258, batch)
    assert frames[:2] == [b"kv@pod@model", b"\x00\x00\x00\x00\x00\x00\x01\x02"]
    topic, seq, payload = split_message(frames)
    assert (topic, seq, decode_batch(payload)) == (b"kv@pod@model", 258, batch)
    with pytest.raises(EventDecodeError):
        split_message(frames[:2])
    with pytest.raises(EventDecodeError):
        split_message([b"", b"\x01", b""])


def test_replay_request_reply_and_end_marker_in_both_layouts() -> None:
    assert encode_replay_request(5) == [b"", b"\x00" * 7 + b"\x05"]
    # vLLM >= 0.26: [b"", topic, seq, payload]
    assert parse_replay_reply(encode_replay_reply(b"t", 5, b"P")) == ReplayReply(b"t", 5, b"P")
    assert parse_replay_reply(replay_end_frames()) == ReplayReply(b"", None, b"")
    # vLLM <= 0.25 / SGLang: [b"", seq, payload] and [b"", END, b""]
    assert parse_replay_reply([b"", (6).to_bytes(8, "big"), b"Q"]) == ReplayReply(None, 6, b"Q")
    assert parse_replay_reply([b"", REPLAY_END_SEQ, b""]) == ReplayReply(None, None, b"")
    assert replay_end_frames() == [b"", b"", b"\xff" * 8, b""]
    with pytest.raises(EventDecodeError):
        parse_replay_reply([b"", b"x"])


# --- kvfleet extras -----------------------------------------------------------------------------


def _report() -> LoadReport:
    return LoadReport(
        replica_id="r0", ts=1700000000.25, num_running=3, num_waiting=2, queued_prefill_tokens=4096,
        running_decode_tokens=900, free_blocks=10, total_blocks=100, block_size=16, kv_usage=0.9,
        num_preemptions_total=1,
        steps=(StepSample(10.0, 0.021, 512, 3, 4, 2048, 0, 256), StepSample(10.03, 0.008, 0, 3, 3, 1500)),
        epoch=77, tiers=(TierUsage("CPU", 40, 512), TierUsage("Disk", 0, 4096)),
    )


def test_load_report_round_trip_and_tolerance() -> None:
    report = _report()
    assert decode_load(encode_load(report)) == report
    raw = msgpack.unpackb(encode_load(report))
    raw["a_future_field"] = [1, 2]
    raw["steps"][0].append("future step column")
    assert decode_load(pack(raw)) == report
    del raw["num_running"]
    with pytest.raises(EventDecodeError):
        decode_load(pack(raw))
    with pytest.raises(EventDecodeError):
        decode_load(encode_batch(EventBatch(ts=1.0)))  # a KV batch is not a load report
    with pytest.raises(ValueError):
        LoadReport("r", 0.0, -1, 0, 0, 0, 0, 1, 16, 0.0)


def test_load_report_offload_fields_and_an_older_replicas_report() -> None:
    """Tier loads per step and tier usage (issue #19); a report without them (a replica from
    before) reads as no tiers and nothing loaded."""
    raw = msgpack.unpackb(encode_load(_report()))
    assert raw["steps"][0][7] == 256 and raw["tiers"] == [["CPU", 40, 512], ["Disk", 0, 4096]]
    del raw["tiers"]
    raw["steps"] = [step[:7] for step in raw["steps"]]
    old = decode_load(pack(raw))
    assert old.tiers == () and [s.loaded_tokens for s in old.steps] == [0, 0]
    for bad in ([["CPU", 1]], [[1, 2, 3]], "CPU"):
        raw["tiers"] = bad
        with pytest.raises(EventDecodeError, match="tiers"):
            decode_load(pack(raw))

def test_a_load_report_carries_the_replica_role() -> None:
    report = dataclasses.replace(_report(), role="decode")
    assert decode_load(encode_load(report)).role == "decode"
    raw = msgpack.unpackb(encode_load(report))
    del raw["role"]  # an older replica's report: a unified replica
    assert decode_load(pack(raw)).role == "both"
    raw["role"] = "router"
    with pytest.raises(EventDecodeError):
        decode_load(pack(raw))


def test_snapshot_round_trip() -> None:
    snap = Snapshot(ts=5.0, kv_seq=41, epoch=3, events=(
        BlockStored((1, 2), None, TOKENS * 2, 16), BlockStored((3,), 2, TOKENS, 16, medium="CPU")))
    assert decode_snapshot(encode_snapshot(snap)) == snap
    assert decode_snapshot(encode_snapshot(Snapshot(ts=5.0, kv_seq=None, events=()))).kv_seq is None
    with pytest.raises(EventDecodeError):
        decode_snapshot(encode_load(_report()))


def test_state_header_shared_by_snapshots_and_digests() -> None:
    """protocol/load.py's encode_state / decode_state: the (ts, epoch, kv_seq) header of a
    snapshot and of a digest (protocol/digest.py), checked once for both."""
    payload = encode_state("snapshot", 5, 3, None, events=[])
    obj, ts, epoch, kv_seq = decode_state(payload, "snapshot")
    assert (ts, epoch, kv_seq, obj["events"]) == (5.0, 3, None, ()) and type(ts) is float
    with pytest.raises(EventDecodeError, match="not a kvfleet digest"):
        decode_state(payload, "digest")
    for field, bad in (("kv_seq", -1), ("kv_seq", "41"), ("epoch", -1), ("epoch", 1.5), ("ts", "now"),
                       ("ts", float("nan"))):
        with pytest.raises(EventDecodeError, match=field):
            decode_state(pack({**msgpack.unpackb(payload), field: bad}), "snapshot")
    headless = pack({"kind": "snapshot", "ts": 1.0, "kv_seq": None, "events": []})
    assert decode_state(headless, "snapshot", epoch_default=0)[2] == 0  # an older snapshot: no epoch
    with pytest.raises(EventDecodeError, match="epoch"):
        decode_state(headless, "snapshot")  # required unless defaulted (digests)


def test_extras_are_four_frames_that_a_vllm_reader_skips() -> None:
    frames = encode_extras_message(b"kvfleet.load", 3, encode_load(_report()))
    assert len(frames) == 4 and frames[3] == EXTRAS_MARKER and is_extras_message(frames)
    # vLLM's examples/online_serving/kv_events_subscriber.py unpacks exactly three frames inside
    # its try block: a 4-frame message raises there, before any seq bookkeeping.
    with pytest.raises(ValueError):
        _, seq_bytes, payload = frames
    with pytest.raises(EventDecodeError):
        split_message(frames)
    assert not is_extras_message(encode_message(b"", 0, EventBatch(ts=0.0)))
