"""`kvfleet simulate --sweep`: the matrix file, its cells, and one table against the bounds."""

import json

import pytest

from loadgen.traces import TraceRequest, write_mooncake
from simulator.sweep import Cell, SweepSpec, Workload, cell_row, cell_trace, load_spec, run_sweep, summarize_rows, sweep_table

SPEC = """
preset = "llama3-8b-h100"
candidate = "predictive"
policies = ["round_robin", "precise_prefix", "predictive", "pred_ttft"]
replicas = [2]
loads = [0.7]
kv_tokens = [16000]
seeds = [0, 1]
requests_per_replica = 15
[[workloads]]
name = "tiny"
trace = "tiny.jsonl"
[[workloads]]
name = "chat"
generate = { kind = "chat", session_rate = 2.0, tenants = 3 }
[variants.pred_ttft]
policy = "predictive"
others_weight = 0.0
"""


def tiny_trace(path, n=40):
    reqs = [TraceRequest(arrival_s=0.3 * i, input_length=1500 + 10 * i, output_length=20,
                         hash_ids=[i % 3, 100 + i % 3, 1000 + i]) for i in range(n)]
    write_mooncake(path, reqs)


@pytest.fixture
def spec_file(tmp_path):
    tiny_trace(tmp_path / "tiny.jsonl")
    (tmp_path / "m.toml").write_text(SPEC)
    return tmp_path / "m.toml"


def test_spec_resolves_traces_beside_the_file_and_crosses_the_axes(spec_file):
    spec = load_spec(spec_file)
    assert spec.workloads[0].trace == str(spec_file.parent / "tiny.jsonl")
    cells = spec.cells()
    assert [c.key for c in cells] == [("tiny", 2, 0.7, 16000, 0), ("tiny", 2, 0.7, 16000, 1),
                                      ("chat", 2, 0.7, 16000, 0), ("chat", 2, 0.7, 16000, 1)]
    assert all(c.requests == 30 for c in cells)


def test_seeds_take_consecutive_windows_of_a_trace_and_new_generations(spec_file):
    spec = load_spec(spec_file)
    tiny0, tiny1, chat0, chat1 = (cell_trace(c) for c in spec.cells())
    assert tiny0[0][0].arrival_s == 0 == tiny1[0][0].arrival_s
    assert [r.input_length for r in tiny0[0]] == [1500 + 10 * i for i in range(30)]
    # 40 requests hold one window of 30: seed 1 reuses it with other prompt contents
    assert [r.input_length for r in tiny1[0]] == [r.input_length for r in tiny0[0]] and tiny1[1] == 1
    assert [r.input_length for r in chat0[0]] != [r.input_length for r in chat1[0]]


@pytest.mark.parametrize("text, message", [
    ('policies = ["round_robin"]\n', "candidate"),
    ('bogus = 1\npolicies = ["round_robin", "predictive"]\n', "unknown keys"),
    ('policies = ["round_robin", "predictive"]\n[[workloads]]\nname = "x"\n', "exactly one of"),
    ('policies = ["nope", "predictive"]\n', "unknown policies"),
    ('policies = [\n', "not valid TOML"),
    ('policies = ["round_robin", "predictive"]\n[variants.v]\nothers_weight = 1\n', "needs policy"),
    # only the candidate and its own variant: no peer to score it against (found after a 7-minute run)
    ('policies = ["predictive", "v"]\n[variants.v]\npolicy = "predictive"\nothers_weight = 0.5\n', "at least one peer"),
])
def test_bad_spec_files_say_what_is_wrong(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_spec(tmp_path / "bad.toml")


def test_sweep_is_the_same_in_one_process_or_many_and_holds_the_bounds(spec_file):
    spec = load_spec(spec_file)
    one = run_sweep(spec, jobs=1)
    two = run_sweep(spec, jobs=2)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "policies"} for r in rows]  # noqa: E731
    assert strip(one["rows"]) == strip(two["rows"])
    for r in one["rows"]:
        assert r["requests"] == 30
        assert r["mean_ttft_s"] >= r["ideal_mean_ttft_s"] - 1e-9
        peers = ("round_robin", "precise_prefix")  # pred_ttft is predictive's variant, not a peer
        assert r["peer_mean_ttft_s"] == min(r["policies"][p]["mean_ttft_s"] for p in peers)
        assert 0 <= r["hit_rate"] <= r["infinite_hit_rate"] + 1e-9
        assert r["pooled_hit_rate"] <= r["infinite_hit_rate"] + 1e-9
    text = sweep_table(one)
    assert "| tiny " in text and "of 4 cells" in text
    # the variant's own figures are printed beside the candidate's and the best peer's
    pred_ttft = one["rows"][0]["policies"]["pred_ttft"]
    variant_lines = [ln for ln in text.splitlines() if "| pred_ttft " in ln]
    assert len(variant_lines) == 4 and f"{pred_ttft['mean_ttft_s']:.3f}" in variant_lines[0]
    assert "(best peer)" in text
    json.dumps(one)  # the whole result is JSON


def _summary(peer, cand, ideal, load=0.8, e2e=0.0):
    return {"policy": {"mean_ttft_s": cand, "p99_ttft_s": cand, "cache_hit_rate": 0.4, "completed": 10, "rejected": 0,
                       "mean_tpot_s": 0, "mean_e2el_s": e2e, "wall_s": 0},
            "bounds": {"ideal_mean_ttft_s": ideal, "ideal_p99_ttft_s": ideal, "pooled_cache_hit_rate": 0.6,
                       "infinite_cache_hit_rate": 0.7}}


def test_gap_closed_and_goal_counts_by_hand():
    spec = SweepSpec(workloads=(Workload("w", trace="x"),), policies=("round_robin", "predictive"))
    cell = Cell(spec.workloads[0], 8, 0.8, 120000, 0, 1000)
    peer = _summary(None, 1.0, 0.2)
    row = cell_row(spec, cell, {"round_robin": peer, "predictive": _summary(1.0, 0.52, 0.2)})
    assert row["gap_closed_mean"] == pytest.approx(0.6)
    worse = cell_row(spec, cell, {"round_robin": peer, "predictive": _summary(1.0, 1.2, 0.2, e2e=-1.0)})
    assert worse["gap_closed_mean"] == pytest.approx(-0.25)
    assert worse["best_e2e_peer"] == "round_robin" and worse["mean_e2e_s"] < worse["best_peer_mean_e2e_s"]
    s = summarize_rows([row, worse])
    assert s["e2e_not_worse"] == {"met": 2, "cells": 2}  # 0 <= 0 and -1 <= 0: E2E is scored apart from TTFT
    assert s["gap_mean"] == {"met": 1, "cells": 2}
    assert s["p99_not_worse"] == {"met": 1, "cells": 2}
    assert s["hit_vs_pooled"] == {"met": 0, "cells": 2}  # 0.4 < 0.8 × 0.6


def test_cli_sweep_writes_the_table(spec_file, tmp_path, capsys):
    from kvfleet.cli import main

    assert main(["simulate", "--sweep", str(spec_file), "--jobs", "1", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "sweep.md").read_text().startswith("| workload")
    assert main(["simulate"]) == 2
    assert "--sweep FILE" in capsys.readouterr().err
