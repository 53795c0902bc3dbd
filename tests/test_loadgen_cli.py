"""`kvfleet loadgen` end to end: the sub-commands, and a replay through a real balancer and replica."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace

import pytest

from kvfleet import cmd_loadgen
from loadgen.client import LoadConfig, run_load
from loadgen.generate import BUNDLED
from loadgen.metrics import summarize
from loadgen.traces import TraceOptions, load_trace
from tests.test_loadgen_client import fake_server


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="kvfleet loadgen", description=cmd_loadgen.__doc__)
    cmd_loadgen.add_arguments(p)
    return cmd_loadgen.run(p.parse_args(list(argv)))


def test_help_describes_the_command_with_examples():
    assert "kvfleet loadgen --url" in cmd_loadgen.__doc__
    assert "kvfleet loadgen generate" in cmd_loadgen.__doc__


def test_generate_then_replay_then_compare(tmp_path, capsys):
    trace = tmp_path / "agentic.jsonl"
    assert _cli("generate", "--kind", "agentic", "--num-requests", "40", "--seed", "3", "--out", str(trace)) == 0
    assert len(load_trace(trace)) == 40
    out = tmp_path / "res"
    with fake_server("--uvloop", "--replica-name", "r0") as url:
        assert _cli("--url", url, "--trace", str(trace), "--scale-input", "0.03125", "--time-scale", "0.02",
                    "--out", str(out), "--label", "a", "--goodput", "ttft:1000", "--no-progress") == 0
        assert _cli("--url", url, "--rate", "50", "--num-requests", "20", "--input-len", "uniform:10:30",
                    "--output-len", "4", "--prefix-groups", "2", "--prefix-len", "32", "--sweep-rates", "25,50",
                    "--out", str(out), "--label", "b", "--no-plots", "--no-progress") == 0
    a = json.loads((out / "a.json").read_text())
    assert a["completed"] == 40 and a["failed"] == 0 and a["request_goodput"] is not None
    assert a["cache_hit_rate"] > 0.3  # tenants' system prompts and growing sessions are shared
    assert a["replicas"]["r0"]["requests"] == 40
    for name in ("a.requests.jsonl", "a.md", "a.ttft_cdf.png", "a.latency.png", "a.replicas.png",
                 "b-r25.json", "b-r50.json"):
        assert (out / name).is_file()
    capsys.readouterr()
    assert _cli("compare", str(out / "a.json"), str(out / "b-r25.json"), "--plot", str(tmp_path / "cdf.png")) == 0
    table = capsys.readouterr().out
    assert table.startswith("| metric | a | b-r25 |") and (tmp_path / "cdf.png").is_file()


@pytest.mark.parametrize("argv,advice", [
    (["--trace", "x.jsonl"], "give --url"),
    (["--url", "http://127.0.0.1:9", "--num-requests", "2"], "start a server first"),
    (["--url", "http://127.0.0.1:9", "--trace", "/nonexistent/t.jsonl"], "loadgen generate"),
    (["--url", "http://127.0.0.1:9", "--input-len", "gauss:3"], "uniform:64:256"),
    (["--url", "http://127.0.0.1:9", "--goodput", "latency:5"], "ttft:500"),
    (["compare", "/nonexistent.json"], "kvfleet loadgen --out"),
])
def test_errors_say_what_to_do(argv, advice, capsys):
    assert _cli(*argv) == 2
    assert advice in capsys.readouterr().err


@pytest.mark.slow
def test_replay_through_the_balancer_reports_replica_and_cache_hits():
    from harness.fleet import balancer, start_replicas

    reqs = load_trace(BUNDLED, options=TraceOptions(scale_input=1 / 32, max_requests=24, time_scale=0.02))
    reqs = [replace(r, output_length=min(r.output_length, 4)) for r in reqs]
    replicas = start_replicas(1)
    try:
        async def go():
            async with balancer([replicas[0].replica_arg]) as (url, _):
                return await run_load(url, reqs, LoadConfig(model="tiny", progress=False))

        result = asyncio.run(go())
    finally:
        for p in replicas:
            p.stop()
    s = summarize(result)
    assert s["completed"] == 24, s["errors"]
    assert [r.prompt_tokens for r in result.records] == [r.input_length for r in reqs]
    assert all(r.output_tokens == q.output_length for r, q in zip(result.records, reqs))
    assert list(s["replicas"]) == [replicas[0].url]
    assert s["cache_hit_rate"] > 0.2  # sessions and tenants share prefixes; the replica caches them
