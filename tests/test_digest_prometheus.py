"""The fleet overview's "Cache digests" panels proven on a real Prometheus (issue #17 part 2): a
local fleet of sim replicas publishing digests every half second behind a balancer subprocess
started with `--index-source digests`, real traffic, then every query of that row runs through
Prometheus' HTTP API and must show the digests: received, in use, a fresh age, a size."""

from __future__ import annotations

import math
import time

import pytest

from kvfleet.fleet import FleetSpec, LocalFleet
from kvfleet.prometheus import PrometheusConfig
from tests.test_observability_prometheus import (
    SIM_ARGS,
    _get,
    _load,
    _metric_sum,
    _promtool_check_metrics,
    _substitute,
    prometheus_tools,  # noqa: F401 - the fixture
    row_queries,
)

pytestmark = pytest.mark.slow
ROW = "Cache digests"


def test_digest_panels_show_the_digests_on_prometheus(prometheus_tools):  # noqa: F811
    queries = row_queries(ROW)
    assert len(queries) >= 4
    spec = FleetSpec(replicas=2, engine="sim", balancer_port=0,
                     replica_args=(*SIM_ARGS, "--kv-digest-interval", "0.5"),
                     balancer_args=("--index-source", "digests"),
                     prometheus=PrometheusConfig(port=0, scrape_interval_s=1.0))
    with LocalFleet(spec) as fleet:
        base = fleet.balancer.url
        _load(base, 12)
        prom = fleet.prometheus
        deadline = time.monotonic() + 60
        while True:  # until Prometheus has scraped a few of the balancer's digest counts
            got = prom.query("sum(kvfleet_digest_received_total)")
            if got and float(got[0]["value"][1]) >= 8:
                break
            assert time.monotonic() < deadline, f"no digests in Prometheus; its log:\n{prom.log_tail()}"
            time.sleep(0.5)
        time.sleep(2.5)  # two more scrapes: the increase() window holds several points
        metrics = _get(base + "/metrics")
        code, findings = _promtool_check_metrics(metrics)
        results = {}
        for title, expr in queries:
            result = prom.query(_substitute(expr, fleet.replicas[0].url.split("://", 1)[1]))
            results[(title, expr)] = {s["metric"].get("replica"): float(s["value"][1]) for s in result}
        urls = {r.url for r in fleet.replicas}
    assert code == 0 and not findings, findings
    for r in urls:
        assert _metric_sum(metrics, "kvfleet_digest_received_total", replica=r) >= 4
    for (title, expr), by_replica in results.items():
        assert set(by_replica) == urls, f"{title}: {expr} -> {by_replica}"
        assert all(not math.isnan(v) for v in by_replica.values()), (title, expr, by_replica)
        if "received_total" in expr or "in_use" in expr or "size_bytes" in expr:
            assert all(v > 0 for v in by_replica.values()), (title, expr, by_replica)
        if "age_seconds" in expr:
            assert all(0 <= v < 30 for v in by_replica.values()), (title, expr, by_replica)
