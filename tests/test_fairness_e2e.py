"""Request classes and fair admission through the real balancer (issue #17 part 4): two sim
replica subprocesses behind a balancer subprocess started with `--fairness` and two classes, a
real Prometheus scraping them. A flood of one class is shed early (429 with Retry-After and an
OpenAI-style body) while the other class's requests, within their share, are all served; then
every query of the fleet overview's fairness row runs on Prometheus and shows it."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvfleet.fleet import FleetSpec, LocalFleet
from kvfleet.prometheus import PrometheusConfig
from tests.test_observability_prometheus import (  # noqa: F401 - prometheus_tools: the fixture
    _post,
    _substitute,
    prometheus_tools,
    row_queries,
)

pytestmark = pytest.mark.slow
ROW = "Classes and fairness"
# Real time on the modelled GPU: a 64-token request takes a few hundred ms, so a queue of a
# dozen behind two slots is seconds of wait, far beyond the flood class's 50 ms target.
REPLICA_ARGS = ("--preset", "llama3-8b-h100", "--time-scale", "1")
BALANCER_ARGS = ("--fairness", "--fair-max-inflight-per-replica", "1",
                 "--fair-class", "interactive,ttft=10", "--fair-class", "flood,ttft=0.05")


def _send(base: str, klass: str, i: int) -> tuple[int, bytes, dict]:
    if klass == "flood":
        body = {"prompt": f"flood request {i}: " + "x" * 200, "max_tokens": 64, "ignore_eos": True}
    else:
        body = {"prompt": f"hi {i}", "max_tokens": 8, "ignore_eos": True}
    return _post(base + "/v1/completions", body, headers={"X-Kvfleet-Class": klass})


def test_a_flood_is_shed_early_while_the_other_class_is_served(prometheus_tools):  # noqa: F811
    spec = FleetSpec(replicas=2, engine="sim", balancer_port=0, replica_args=REPLICA_ARGS,
                     balancer_args=BALANCER_ARGS, prometheus=PrometheusConfig(port=0, scrape_interval_s=1.0))
    with LocalFleet(spec) as fleet:
        base = fleet.balancer.url
        status, raw, _ = _post(base + "/v1/completions", {"prompt": "x", "max_tokens": 1},
                               headers={"X-Kvfleet-Class": "vip"})
        assert status == 400 and "interactive" in json.loads(raw)["error"]["message"]
        with ThreadPoolExecutor(max_workers=24) as pool:
            # A first burst: the queue drains it and measures its rate (nothing is shed early before).
            list(pool.map(lambda i: _send(base, "flood", i), range(8)))
            flood = [pool.submit(_send, base, "flood", 100 + i) for i in range(20)]
            time.sleep(0.3)  # the flood is queued
            interactive = [_send(base, "interactive", i) for i in range(4)]  # one at a time, beside it
            flooded = [f.result() for f in flood]
        assert [s for s, _, _ in interactive] == [200] * 4, interactive
        shed = [(raw, headers) for s, raw, headers in flooded if s == 429]
        assert shed, [s for s, _, _ in flooded]
        assert any(s == 200 for s, _, _ in flooded)  # the flood is served too, up to its share
        raw, headers = shed[0]
        assert int(headers["Retry-After"]) >= 1
        err = json.loads(raw)["error"]
        assert err["code"] == 429 and "flood" in err["message"] and "TTFT target" in err["message"]

        prom = fleet.prometheus
        deadline = time.monotonic() + 60
        while True:  # until Prometheus has scraped the shed requests and a later point
            got = {(s["metric"]["class"], s["metric"]["reason"]): float(s["value"][1])
                   for s in prom.query("sum by (class, reason) (kvfleet_fairness_shed_requests_total)")}
            if got.get(("flood", "predicted_wait"), 0) >= len(shed):
                break
            assert time.monotonic() < deadline, f"no shed requests in Prometheus: {got}\n{prom.log_tail()}"
            time.sleep(0.5)
        time.sleep(2.5)  # more scrapes: rate() windows hold several points
        assert got.get(("interactive", "predicted_wait"), 0) == 0
        admitted = {s["metric"]["class"]: float(s["value"][1])
                    for s in prom.query("sum by (class) (kvfleet_fairness_admitted_requests_total)")}
        assert admitted["interactive"] >= 4 and admitted["flood"] >= 1, admitted
        results = {(title, expr): prom.query(_substitute(expr, "")) for title, expr in row_queries(ROW)}
    assert len(results) >= 8
    for (title, expr), result in results.items():
        values = [float(s["value"][1]) for s in result]
        assert any(not math.isnan(v) for v in values), (title, expr, result)
        if "shed_requests_total" in expr:
            assert any(s["metric"].get("class") == "flood" and float(s["value"][1]) > 0 for s in result), result


def test_an_api_keys_class_wins_over_the_header_through_the_balancer():
    """A key listed under a class puts its requests there (the guard verifies the key; the
    header cannot move them elsewhere); another key's request goes by its header; a wrong key is
    refused with 401 before any class is read."""
    import asyncio

    from balancer.fairness import ClassConfig, FairnessConfig
    from balancer.guard import GuardConfig
    from harness import fleet as hf

    replicas = hf.start_replicas(1, ["--engine", "sim"])
    try:
        async def main():
            paid_class = ClassConfig("paid", priority=1, api_keys=("sk-paid-0123456789",))
            fairness = FairnessConfig(enabled=True, classes=(paid_class, ClassConfig("batch")))
            guard = GuardConfig(api_keys=("sk-paid-0123456789", "sk-free-0123456789"))
            async with hf.balancer([r.replica_arg for r in replicas], fairness=fairness, guard=guard) as (url, _):
                def post(key):
                    return hf.http("POST", url + "/v1/completions", {"prompt": "hello", "max_tokens": 2},
                                   {"Authorization": f"Bearer {key}", "X-Kvfleet-Class": "batch"})

                loop = asyncio.get_running_loop()
                paid = await loop.run_in_executor(None, post, "sk-paid-0123456789")
                free = await loop.run_in_executor(None, post, "sk-free-0123456789")
                nokey = await loop.run_in_executor(None, post, "nope")
                _, _, metrics = await loop.run_in_executor(None, hf.http, "GET", url + "/metrics")
                return paid[0], free[0], nokey[0], metrics.decode()

        paid, free, nokey, metrics = asyncio.run(main())
    finally:
        for r in replicas:
            r.stop()
    assert (paid, free, nokey) == (200, 200, 401)
    assert 'kvfleet_fairness_admitted_requests_total{class="paid"} 1.0' in metrics
    assert 'kvfleet_fairness_admitted_requests_total{class="batch"} 1.0' in metrics
