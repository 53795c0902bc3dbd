"""Trace readers: every format on hand-written fixtures and on ../shared/traces; the reshaping
options; errors that name the line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadgen.generate import BUNDLED
from loadgen.traces import (
    TraceOptions,
    TraceRequest,
    detect_format,
    load_trace,
    scale_input,
    spread_ticks,
    write_mooncake,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


MOONCAKE = (
    '{"timestamp": 0, "input_length": 1000, "output_length": 6, "hash_ids": [0, 1]}\n'
    '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [0, 2]}\n'
    '\n'
    '{"timestamp": 3000, "input_length": 1536, "output_length": 10, "hash_ids": [0, 1, 3]}\n'
)
AZURE = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
         "2023-11-16 18:17:03.9799600,4808,10\n"
         "2023-11-16 18:17:04.0319600,3180,8\n"
         "2023-11-16 18:17:05.5000000,110,27\n")
BURST_NEW = ("Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
             "5,s1,1.2,ChatGPT,472,18,490,Conversation log\n"
             "7.5,s1,0.8,ChatGPT,1087,0,1087,Conversation log\n"
             "9,,2.0,GPT-4,20,30,50,API log\n")
BURST_OLD = ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
             "100,ChatGPT,472,18,490,Conversation log\n"
             "101,GPT-4,100,200,300,API log\n")
BAILIAN = (
    '{"chat_id": 1, "parent_chat_id": -1, "timestamp": 10.5, "input_length": 40, "output_length": 5, '
    '"type": "text", "turn": 1, "hash_ids": [1, 2, 3]}\n'
    '{"chat_id": 2, "parent_chat_id": 1, "timestamp": 12.0, "input_length": 70, "output_length": 9, '
    '"type": "text", "turn": 2, "hash_ids": [1, 2, 4, 5, 6]}\n'
    '{"chat_id": 3, "parent_chat_id": 2, "timestamp": 15.25, "input_length": 90, "output_length": 3, '
    '"type": "search", "turn": 3, "hash_ids": [1, 2, 4, 5, 7, 8]}\n'
    '{"chat_id": 9, "parent_chat_id": 77, "timestamp": 16.0, "input_length": 16, "output_length": 3, '
    '"type": "text", "turn": 4, "hash_ids": [9]}\n'
)
SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                  {"from": "gpt", "value": "Paris is the capital."},
                                  {"from": "human", "value": "And of Spain, please?"},
                                  {"from": "gpt", "value": "Madrid, of course."}]},
    {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
    {"id": "c", "conversations": [{"from": "gpt", "value": "unprompted"}]},
]


def test_mooncake_fixture(tmp_path):
    p = _write(tmp_path, "t.jsonl", MOONCAKE)
    assert detect_format(p) == "mooncake"
    reqs = load_trace(p)
    assert [r.arrival_s for r in reqs] == [0.0, 0.0, 3.0]
    assert reqs[2] == TraceRequest(3.0, 1536, 10, (0, 1, 3), 512)
    assert all(r.hash_block_tokens == 512 for r in reqs)


def test_azure_fixture_rebases_and_keeps_sub_second_time(tmp_path):
    p = _write(tmp_path, "a.csv", AZURE)
    assert detect_format(p) == "azure"
    reqs = load_trace(p)
    assert [r.input_length for r in reqs] == [4808, 3180, 110]
    assert [r.output_length for r in reqs] == [10, 8, 27]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(0.052, abs=1e-6)
    assert reqs[2].arrival_s == pytest.approx(1.52004, abs=1e-6)
    assert all(r.hash_ids is None for r in reqs)


def test_burstgpt_new_and_old_columns_skip_failures(tmp_path):
    new = load_trace(_write(tmp_path, "b.csv", BURST_NEW))
    assert [(r.arrival_s, r.input_length, r.output_length) for r in new] == [(0.0, 472, 18), (4.0, 20, 30)]
    assert new[0].session_id == "s1" and new[0].tenant == "ChatGPT" and new[1].session_id is None
    kept = load_trace(_write(tmp_path, "b.csv", BURST_NEW), options=TraceOptions(keep_failed=True))
    assert len(kept) == 3
    old = load_trace(_write(tmp_path, "o.csv", BURST_OLD))
    assert detect_format(tmp_path / "o.csv") == "burstgpt"
    assert [(r.arrival_s, r.input_length, r.output_length) for r in old] == [(0.0, 472, 18), (1.0, 100, 200)]


def test_bailian_sessions_and_16_token_blocks(tmp_path):
    p = _write(tmp_path, "q.jsonl", BAILIAN)
    assert detect_format(p) == "bailian"
    reqs = load_trace(p)
    assert [r.arrival_s for r in reqs] == [0.0, 1.5, 4.75, 5.5]
    assert [r.session_id for r in reqs] == ["1", "1", "1", "77"]  # a parent outside the file is the root
    assert [r.turn for r in reqs] == [1, 2, 3, 4]
    assert all(r.hash_block_tokens == 16 for r in reqs)
    assert reqs[2].hash_ids == (1, 2, 4, 5, 7, 8) and reqs[2].tenant == "search"


def test_sharegpt_first_turn_like_vllm_and_all_turns(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(SHAREGPT))
    assert detect_format(p) == "sharegpt"
    reqs = load_trace(p, options=TraceOptions(rate=10.0, seed=1))
    # "b" is skipped: its prompt is under 4 byte tokens; "c" has no human turn
    assert [r.text for r in reqs] == ["What is the capital of France?"]
    assert reqs[0].input_length == len(b"What is the capital of France?")
    assert reqs[0].output_length == len(b"Paris is the capital.")
    all_turns = load_trace(p, options=TraceOptions(sharegpt_all_turns=True))
    assert [r.turn for r in all_turns] == [0, 1]
    assert all_turns[1].text == ("What is the capital of France?\nParis is the capital.\nAnd of Spain, please?")
    assert all_turns[1].session_id == "a"


def test_sharegpt_arrivals_come_from_the_rate(tmp_path):
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": f"question number {i}"},
                                              {"from": "gpt", "value": "an answer"}]} for i in range(50)]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(convs))
    reqs = load_trace(p, options=TraceOptions(rate=5.0))
    assert len(reqs) == 50 and reqs[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert reqs[-1].arrival_s == pytest.approx(10.0 - reqs[0].arrival_s, rel=0.3)


@pytest.mark.parametrize("text,fmt,line", [
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n{"timestamp": 1, "input_length": "x"}\n',
     "mooncake", 2),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\nnot json\n', "mooncake", 2),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\nyesterday,1,2\n", "azure", 3),
    ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,m,10,5,15,API log\n2,m,ten,5,15,API\n",
     "burstgpt", 3),
])
def test_malformed_files_name_the_line(tmp_path, text, fmt, line):
    p = _write(tmp_path, "bad.txt", text)
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}:"):
        load_trace(p, fmt)


def test_unknown_content_and_missing_file_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="--format"):
        load_trace(_write(tmp_path, "x.csv", "a,b,c\n1,2,3\n"))
    with pytest.raises(ValueError, match="empty"):
        load_trace(_write(tmp_path, "e.jsonl", "\n"))
    with pytest.raises(FileNotFoundError, match="loadgen generate"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="missing column"):
        load_trace(_write(tmp_path, "m.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9,5\n"), "azure")


def test_options_time_scale_duration_max_requests(tmp_path):
    lines = "".join(json.dumps({"timestamp": 1000 * i, "input_length": 10, "output_length": 2, "hash_ids": [i]}) + "\n"
                    for i in range(10))
    p = _write(tmp_path, "t.jsonl", lines)
    reqs = load_trace(p, options=TraceOptions(time_scale=0.5))
    assert [r.arrival_s for r in reqs] == [0.5 * i for i in range(10)]
    assert len(load_trace(p, options=TraceOptions(time_scale=0.5, duration_s=2.0))) == 4  # 0, .5, 1, 1.5
    assert len(load_trace(p, options=TraceOptions(max_requests=3))) == 3
    with pytest.raises(ValueError, match="time_scale"):
        TraceOptions(time_scale=0)


def test_spread_ticks_spreads_a_tick_uniformly_and_deterministically():
    reqs = [TraceRequest(0.0, 10, 1)] * 200 + [TraceRequest(3.0, 10, 1)] * 5 + [TraceRequest(4.0, 10, 1)] * 3
    a = spread_ticks(reqs, 3.0, seed=7)
    assert a == spread_ticks(reqs, 3.0, seed=7)
    first = [r.arrival_s for r in a[:200]]
    assert all(0.0 <= t < 3.0 for t in first) and first == sorted(first)
    assert 1.2 < sum(first) / 200 < 1.8  # uniform over the tick
    assert all(3.0 <= r.arrival_s < 4.0 for r in a[200:205])  # cut short by the next timestamp
    assert all(4.0 <= r.arrival_s < 7.0 for r in a[205:])


def test_scale_input_keeps_block_structure():
    r = TraceRequest(0.0, 1536 + 100, 5, (0, 1, 2, 3), 512)
    s = scale_input(r, 1 / 32)
    assert s.hash_block_tokens == 16 and s.hash_ids == r.hash_ids
    assert math.ceil(s.input_length / s.hash_block_tokens) == len(s.hash_ids)
    assert s.input_length == 3 * 16 + 3  # 100/512 of a block -> 3 of 16
    assert scale_input(TraceRequest(0.0, 1000, 5), 0.1).input_length == 100


def test_write_mooncake_round_trip_keeps_kvfleet_extras(tmp_path):
    reqs = [TraceRequest(0.0, 40, 3, (1, 2, 3), 16, "s0", 0, "tenant0"),
            TraceRequest(1.25, 60, 3, (1, 2, 3, 4), 16, "s0", 1, "tenant0")]
    p = tmp_path / "w.jsonl"
    assert write_mooncake(p, reqs) == 2
    assert load_trace(p) == reqs


def test_bundled_trace_is_small_and_has_structure():
    assert BUNDLED.is_file() and BUNDLED.stat().st_size < 200_000
    reqs = load_trace(BUNDLED)
    assert 200 <= len(reqs) <= 1000
    assert all(math.ceil(r.input_length / r.hash_block_tokens) == len(r.hash_ids) for r in reqs)
    assert len({r.tenant for r in reqs}) > 1 and len({r.session_id for r in reqs}) > 10


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/traces is not present")
def test_shared_mooncake_trace():
    p = SHARED / "mooncake_synthetic.jsonl"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    assert detect_format(p) == "mooncake"
    reqs = load_trace(p)
    assert len(reqs) == 3993
    assert all(len(r.hash_ids) == math.ceil(r.input_length / 512) for r in reqs)
    assert 14_000 < sum(r.input_length for r in reqs) / len(reqs) < 17_000
    small = load_trace(p, options=TraceOptions(scale_input=1 / 32, max_requests=100, spread_ticks=3.0))
    assert len(small) == 100 and all(r.hash_block_tokens == 16 for r in small)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/traces is not present")
def test_shared_azure_trace():
    p = SHARED / "azure2023_code.csv"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    assert detect_format(p) == "azure"
    reqs = load_trace(p)
    assert len(reqs) == 8819
    assert 50 * 60 < reqs[-1].arrival_s < 60 * 60  # ~57 minutes
