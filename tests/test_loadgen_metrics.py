"""Metrics on hand-made per-request records, with exact expected values, and the reports."""

from __future__ import annotations

import json

import pytest

from loadgen.client import LoadConfig, RequestRecord, RunResult
from loadgen.metrics import parse_goodput, parse_percentiles, summarize, tpot_s
from loadgen.report import compare, load_summary, write_report


def _rec(i, ttft, e2el, out, itl=(), sched=0.0, sent=None, prompt=100, cached=0, replica="r1", **kw):
    return RequestRecord(index=i, scheduled_s=sched, input_length=prompt, output_length=out,
                         sent_s=sched if sent is None else sent, ttft_s=ttft, e2el_s=e2el, itl_s=list(itl),
                         output_tokens=out, prompt_tokens=prompt, cached_tokens=cached, replica=replica,
                         status=200, **kw)


def _result(records, duration=10.0):
    return RunResult(url="http://x", config=LoadConfig(), records=records, duration_s=duration, started_at=0.0)


RECORDS = [
    # ttft, e2el, output tokens -> tpot = (e2el - ttft) / (out - 1)
    _rec(0, 0.100, 1.000, 10, itl=[0.1] * 9, sched=0.0, sent=0.001, prompt=100, cached=0, replica="a"),      # tpot .1
    _rec(1, 0.200, 0.600, 5, itl=[0.1] * 4, sched=1.0, sent=1.003, prompt=200, cached=100, replica="a"),     # tpot .1
    _rec(2, 0.300, 0.300, 1, sched=2.0, sent=2.000, prompt=300, cached=300, replica="b"),                    # no tpot
    _rec(3, 0.400, 2.400, 3, itl=[1.0, 1.0], sched=3.0, sent=3.010, prompt=400, cached=0, replica="b"),      # tpot 1
]
FAILED = RequestRecord(index=4, scheduled_s=4.0, input_length=50, output_length=5, sent_s=4.002, status=500,
                       error="HTTP 500: boom", error_kind="http")


def test_tpot_is_vllms_definition():
    assert tpot_s(RECORDS[0]) == pytest.approx(0.1)
    assert tpot_s(RECORDS[3]) == pytest.approx(1.0)
    assert tpot_s(RECORDS[2]) is None


def test_summary_exact_values():
    s = summarize(_result(RECORDS + [FAILED]), percentiles=(50, 90, 99), goodput={"ttft": 250, "tpot": 100})
    assert s["completed"] == 4 and s["failed"] == 1 and s["num_requests"] == 5
    assert s["total_input_tokens"] == 1000 and s["total_output_tokens"] == 19
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_throughput"] == pytest.approx(1.9)
    assert s["total_token_throughput"] == pytest.approx(101.9)
    # TTFT 100, 200, 300, 400 ms
    assert s["mean_ttft_ms"] == pytest.approx(250.0)
    assert s["median_ttft_ms"] == pytest.approx(250.0)
    assert s["std_ttft_ms"] == pytest.approx(111.80339887)  # population std
    assert s["p50_ttft_ms"] == pytest.approx(250.0)
    assert s["p90_ttft_ms"] == pytest.approx(370.0)  # linear interpolation: 300 + 0.7 * 100
    assert s["p99_ttft_ms"] == pytest.approx(397.0)
    # TPOT over requests with > 1 output token: 100, 100, 1000 ms
    assert s["mean_tpot_ms"] == pytest.approx(400.0)
    assert s["median_tpot_ms"] == pytest.approx(100.0)
    # ITL pools all gaps: 13 x 100 ms and 2 x 1000 ms
    assert s["mean_itl_ms"] == pytest.approx((13 * 100 + 2000) / 15)
    assert s["median_itl_ms"] == pytest.approx(100.0)
    assert s["mean_e2el_ms"] == pytest.approx(1075.0)
    # goodput: ttft <= 250 ms and tpot <= 100 ms: requests 0 and 1 (request 2 fails ttft, 3 both)
    assert s["request_goodput"] == pytest.approx(0.2)
    assert s["goodput_slos_ms"] == {"ttft": 250, "tpot": 100}
    # kvfleet: hit rate = 400 cached / 1000 prompt tokens; per replica
    assert s["cache_hit_rate"] == pytest.approx(0.4)
    assert s["replicas"]["a"] == {"requests": 2, "share": 0.5, "cached_tokens": 100, "prompt_tokens": 300,
                                  "hit_rate": pytest.approx(1 / 3)}
    assert s["replicas"]["b"]["hit_rate"] == pytest.approx(300 / 700)
    # lag: 1, 3, 0, 10, 2 ms
    assert s["schedule_lag_ms"]["p50"] == pytest.approx(2.0)
    assert s["schedule_lag_ms"]["max"] == pytest.approx(10.0)
    assert s["schedule_lag_ms"]["p99"] == pytest.approx(9.72)
    assert s["errors"] == {"count": 1, "by_kind": {"http": 1}, "first": ["request 4: HTTP 500: boom"]}
    assert s["max_concurrent_requests"] >= 1 and s["max_output_tokens_per_s"] >= 1


def test_goodput_counts_single_token_requests_tpot_as_zero_and_e2el():
    s = summarize(_result(RECORDS), goodput={"tpot": 50})
    assert s["request_goodput"] == pytest.approx(0.1)  # only request 2 (tpot counted as 0)
    s = summarize(_result(RECORDS), goodput={"e2el": 1000})
    assert s["request_goodput"] == pytest.approx(0.3)  # e2el <= 1 s: requests 0, 1, 2
    assert summarize(_result(RECORDS))["request_goodput"] is None


def test_percentile_keys_and_parsing():
    s = summarize(_result(RECORDS), percentiles=parse_percentiles("25,99.9"))
    assert "p25_ttft_ms" in s and "p99.9_ttft_ms" in s and "p99_ttft_ms" not in s
    assert parse_goodput(["ttft:500", "tpot:50 e2el:9000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 9000.0}
    with pytest.raises(ValueError, match="KEY:MS"):
        parse_goodput(["itl:5"])
    with pytest.raises(ValueError, match="between 0 and 100"):
        parse_percentiles("50,101")


def test_empty_run_does_not_divide_by_zero():
    s = summarize(_result([FAILED]))
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0 and s["cache_hit_rate"] is None


def test_write_report_and_compare(tmp_path):
    paths = write_report(_result(RECORDS + [FAILED]), tmp_path, "base line", goodput={"ttft": 250})
    assert paths["json"].name == "base_line.json"
    for key in ("json", "requests", "markdown", "ttft_cdf", "latency", "replicas"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    rows = [json.loads(line) for line in paths["requests"].read_text().splitlines()]
    assert len(rows) == 5 and rows[1]["ttft_ms"] == 200.0 and rows[1]["tpot_ms"] == 100.0
    assert rows[4]["success"] is False and rows[4]["error_kind"] == "http"
    assert "| TTFT | 250.00 |" in paths["markdown"].read_text()
    other = write_report(_result(RECORDS[:2]), tmp_path, "other", plots=False)
    table = compare([load_summary(paths["json"]), load_summary(other["json"])])
    assert table.splitlines()[0] == "| metric | base line | other |"
    assert "| mean TTFT ms | 250.00 | 150.00 |" in table
    with pytest.raises(ValueError, match="loadgen results"):
        (tmp_path / "x.json").write_text("{}")
        load_summary(tmp_path / "x.json")


def test_goodput_and_shed_per_class():
    from loadgen.report import markdown

    recs = [_rec(0, 0.100, 1.0, 10, tenant="interactive"), _rec(1, 0.300, 1.0, 10, tenant="interactive"),
            _rec(2, 0.200, 1.0, 10, tenant="batch"),
            RequestRecord(index=3, scheduled_s=0.0, input_length=10, output_length=5, sent_s=0.0, status=429,
                          error="HTTP 429: shed", error_kind="http", tenant="batch"),
            RequestRecord(index=4, scheduled_s=0.0, input_length=10, output_length=5, sent_s=0.0, status=500,
                          error="HTTP 500: boom", error_kind="http", tenant="batch")]
    s = summarize(_result(recs, duration=10.0), percentiles=(99,), goodput={"ttft": 250})
    i, b = s["classes"]["interactive"], s["classes"]["batch"]
    assert (i["requests"], i["completed"], i["shed"], i["failed"]) == (2, 2, 0, 0)
    assert i["request_goodput"] == pytest.approx(0.1) and i["good_share"] == pytest.approx(0.5)
    assert i["mean_ttft_ms"] == pytest.approx(200.0) and i["p99_ttft_ms"] == pytest.approx(298.0)
    assert (b["requests"], b["completed"], b["shed"], b["failed"]) == (3, 1, 1, 1)
    assert b["request_goodput"] == pytest.approx(0.1) and b["good_share"] == pytest.approx(1 / 3)
    table = markdown(s)
    assert "| class | requests | completed | shed (429) |" in table and "| batch | 3 | 1 | 1 | 1 |" in table
    assert summarize(_result(RECORDS))["classes"] == {}  # no classes: no table
    assert "| class |" not in markdown(summarize(_result(RECORDS)))
