"""The async client against servers with known behaviour, each in its own process (so the server
never shares the client's event loop or its GIL).

Two tests here are about timing accuracy, which is what the acceptance criteria ask for: TTFT and
ITL within 5 % of a known delay profile, and schedule lag p99 under 5 ms at 200 req/s. Everything
else asserts behaviour (ordering, counts, error kinds).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from loadgen.client import LoadConfig, bare_timer_lag_p99_ms, run_load, run_load_sync
from loadgen.metrics import summarize
from loadgen.prompts import PromptConfig
from loadgen.synthetic import LengthDist, SyntheticConfig, synthesize
from loadgen.traces import TraceRequest


@contextlib.contextmanager
def fake_server(*args: str):
    p = subprocess.Popen([sys.executable, "-m", "loadgen.fake_server", "--port", "0", *args],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, f"fake server did not start: {line!r}"
        yield m.group(1)
    finally:
        p.terminate()
        p.wait(10)


def _workload(n: int, rate: float, out: int = 16, inp: int = 64, seed: int = 0, **kw) -> list[TraceRequest]:
    return synthesize(SyntheticConfig(num_requests=n, rate=rate, input_len=LengthDist("fixed", inp),
                                      output_len=LengthDist("fixed", out), seed=seed, **kw))


@pytest.fixture(scope="module")
def profile_server():
    with fake_server("--ttft-ms", "50", "--itl-ms", "10") as url:
        yield url


@pytest.fixture(scope="module")
def fast_server():
    with fake_server("--uvloop", "--replica-name", "fast-1") as url:
        yield url


def test_ttft_and_itl_match_a_known_delay_profile(profile_server):
    res = run_load_sync(profile_server, _workload(150, 50.0), LoadConfig(progress=False))
    s = summarize(res)
    assert s["completed"] == 150, s["errors"]
    assert all(r.output_tokens == 16 and len(r.itl_s) == 15 for r in res.records)
    # truth: first token 50 ms after the request, then one every 10 ms
    assert s["median_ttft_ms"] == pytest.approx(50.0, rel=0.05)
    assert s["median_itl_ms"] == pytest.approx(10.0, rel=0.05)
    assert s["median_tpot_ms"] == pytest.approx(10.0, rel=0.05)
    assert s["median_e2el_ms"] == pytest.approx(200.0, rel=0.05)


def test_requests_leave_on_schedule_at_200_per_second(fast_server):
    reqs = _workload(600, 200.0)
    p99s = []
    for _ in range(2):  # a second try absorbs one burst of noise from other processes
        res = run_load_sync(fast_server, reqs, LoadConfig(progress=False))
        s = summarize(res)
        assert s["completed"] == 600, s["errors"]
        p99s.append(s["schedule_lag_ms"]["p99"])
        if p99s[-1] < 5.0:
            return
    bare = bare_timer_lag_p99_ms(200.0, 600)
    if bare >= 4.0:
        pytest.skip(f"machine too busy to judge: a loop that only sleeps lags p99 {bare:.1f} ms "
                    f"(loadgen: {p99s} ms)")
    assert min(p99s) < 5.0, f"schedule lag p99 {p99s} ms (a bare timer loop: {bare:.1f} ms)"


def test_slow_responses_never_hold_back_later_sends():
    with fake_server("--ttft-ms", "1500", "--itl-ms", "1") as url:
        res = run_load_sync(url, _workload(50, 100.0, out=2), LoadConfig(progress=False))
    assert all(r.success for r in res.records)
    last_send = max(r.sent_s for r in res.records)
    first_token = min(r.sent_s + r.ttft_s for r in res.records)
    assert last_send < first_token  # every request left before any response began
    # (Not asserted: that sends happen in index order. Two requests due in the same loop turn may
    # leave in either order, e.g. when one waits for a new connection; CI saw 19 and 20 swap.)


def test_usage_cached_tokens_and_replica_header(fast_server):
    reqs = [TraceRequest(0.01 * i, 64, 4, (1, 2, 3, 4), 16) for i in range(3)]
    res = run_load_sync(fast_server, reqs, LoadConfig(progress=False, prompt=PromptConfig(seed=99)))
    assert [r.prompt_tokens for r in res.records] == [64, 64, 64]
    assert [r.cached_tokens for r in res.records] == [0, 64, 64]
    assert {r.replica for r in res.records} == {"fast-1"}
    s = summarize(res)
    assert s["cache_hit_rate"] == pytest.approx(128 / 192)
    assert s["replicas"]["fast-1"]["requests"] == 3


def test_output_tokens_counted_from_chunks_without_usage(fast_server):
    res = run_load_sync(fast_server, _workload(5, 100.0, out=7), LoadConfig(progress=False, include_usage=False))
    assert [r.output_tokens for r in res.records] == [7] * 5
    assert all(r.cached_tokens is None for r in res.records)


def test_chat_endpoint_with_text_prompts(fast_server):
    res = run_load_sync(fast_server, _workload(5, 100.0, out=3),
                        LoadConfig(progress=False, endpoint="chat", token_prompts=False))
    assert all(r.success and r.output_tokens == 3 and r.ttft_s is not None for r in res.records)


def test_errors_are_recorded_by_kind():
    with fake_server("--fail-every", "3", "--error-in-stream-every", "5") as url:
        res = run_load_sync(url, _workload(15, 200.0), LoadConfig(progress=False))
    kinds = [r.error_kind for r in res.records]
    assert kinds.count("http") == 5  # requests 3, 6, 9, 12, 15 (1-based) get HTTP 500
    assert kinds.count("in_band") == 2  # requests 5 and 10 (15 got the 500)
    s = summarize(res)
    assert s["completed"] == 8 and s["failed"] == 7
    assert s["errors"]["by_kind"] == {"http": 5, "in_band": 2}
    assert any("injected failure" in e for e in s["errors"]["first"])
    # nobody listening: connection errors, not an exception
    refused = run_load_sync("http://127.0.0.1:9", _workload(3, 100.0), LoadConfig(progress=False))
    assert [r.error_kind for r in refused.records] == ["connection"] * 3


def test_closed_loop_keeps_concurrency_requests_in_flight():
    with fake_server("--ttft-ms", "20", "--itl-ms", "2") as url:
        res = asyncio.run(run_load(url, _workload(40, 1.0, out=5), LoadConfig(progress=False, concurrency=4)))
    assert res.closed_loop and all(r.success for r in res.records)
    events = sorted([(r.sent_s, 1) for r in res.records] + [(r.sent_s + r.e2el_s, -1) for r in res.records],
                    key=lambda e: (e[0], e[1]))
    in_flight, peak = 0, 0
    for _, d in events:
        in_flight += d
        peak = max(peak, in_flight)
    assert peak == 4
    # closed loop ignores the 1 req/s arrivals: 40 requests of ~30 ms, 4 at a time, take well under 40 s
    assert res.duration_s < 10


def test_each_request_sends_its_class_and_a_shed_one_counts_as_shed():
    from aiohttp import web

    seen = []

    async def completions(request: web.Request) -> web.StreamResponse:
        klass = request.headers.get("X-Kvfleet-Class")
        seen.append(klass)
        if klass == "flood":
            return web.json_response({"error": {"message": "shed", "type": "RateLimitError", "code": 429}},
                                     status=429, headers={"Retry-After": "1"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"text":"a"}]}\n\ndata: [DONE]\n\n')
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            reqs = [TraceRequest(arrival_s=i * 0.01, input_length=8, output_length=1,
                                 tenant=("interactive", "flood", None)[i % 3]) for i in range(6)]
            return await run_load(f"http://127.0.0.1:{port}", reqs,
                                  LoadConfig(class_header="X-Kvfleet-Class", progress=False))
        finally:
            await runner.cleanup()

    result = asyncio.run(main())
    assert sorted(seen, key=str) == sorted(["interactive", "flood", None] * 2, key=str)
    classes = summarize(result)["classes"]
    assert classes["flood"]["shed"] == 2 and classes["flood"]["completed"] == 0
    assert classes["interactive"]["completed"] == 2 and classes["interactive"]["shed"] == 0
