"""The endpoint picker's dashboard (dashboards/picker-overview.json) proven on a real Prometheus:
two sim replicas, `kvfleet picker` and the real Envoy in front, load through Envoy (shared
prefixes, streams, a refusal, a route placed by load), Prometheus scraping the picker's /metrics
as a balancer target; every panel's query must return data. Also `promtool check metrics` on
the picker's /metrics. Prometheus and promtool come from Debian's package, installed by
tests/test_observability_prometheus.py's fixture when missing."""

from __future__ import annotations

import math
import time

import pytest

from balancer.picker.envoy import bootstrap
from harness import procs
from harness.envoy import start_envoy
from harness.fleet import http
from kvfleet.prometheus import PrometheusConfig, PrometheusServer
from tests.test_observability_prometheus import (RATE_WINDOW, _get, _metric_sum, _panel_queries,  # noqa: F401
                                                 _promtool_check_metrics, prometheus_tools)
from tests.test_picker_envoy import SIM, start_picker, stream

pytestmark = pytest.mark.slow


def load(url: str, round_: int) -> None:
    """Shared-prefix completions through Envoy, unary and streamed, a refusal and a route by load."""
    shared = "Scraped: a system prompt that every request of this test shares, word for word. " * 8
    for i in range(8):
        body = {"model": "tiny", "prompt": shared + f"question {round_}.{i}", "max_tokens": 4 + i % 4}
        if i % 2:
            assert stream(url, {**body, "stream_options": {"include_usage": True}})[0] == 200
        else:
            assert http("POST", url + "/v1/completions", body)[0] == 200
    assert http("POST", url + "/v1/completions", {"model": "nope", "prompt": "hi"})[0] == 404
    assert http("GET", url + "/v1/models")[0] == 200


def wait_for_scrape(prom: PrometheusServer, picker: procs.Proc, timeout: float = 30.0) -> None:
    """Until Prometheus holds the picker's current request count."""
    want = _metric_sum(_get(picker.url + "/metrics"), "kvfleet_requests_total")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = prom.query('sum(kvfleet_requests_total{job="kvfleet-balancer"})')
        if got and float(got[0]["value"][1]) == want:
            return
        time.sleep(0.5)
    pytest.fail(f"Prometheus did not scrape the picker's {want} requests in {timeout:.0f} s: {prom.log_tail()}")


@pytest.fixture(scope="module")
def scraped(prometheus_tools):
    reps = procs.start_all([SIM] * 2)
    grpc_port = procs.free_port()
    picker = start_picker(reps, grpc_port)
    listen, admin = procs.free_port(), procs.free_port()
    envoy = start_envoy(bootstrap(f"127.0.0.1:{listen}", f"127.0.0.1:{grpc_port}",
                                  [r.url.split("//", 1)[1] for r in reps], admin=f"127.0.0.1:{admin}"), admin)
    prom = PrometheusServer(PrometheusConfig(port=0, scrape_interval_s=1.0)).start()
    try:
        prom.set_targets(balancers=[picker.url], replicas=[r.url for r in reps])
        prom.wait_for_targets([picker.url, *(r.url for r in reps)])
        url = f"http://127.0.0.1:{listen}"
        # Two rounds with a scrape after each: a rate needs two samples of a series that exists.
        for round_ in range(2):
            load(url, round_)
            wait_for_scrape(prom, picker)
        yield prom, picker
    finally:
        prom.stop()
        envoy.stop()
        for p in [picker, *reps]:
            p.stop()


def test_every_picker_panel_query_returns_data(scraped):
    prom, _ = scraped
    empty, checked = [], 0
    for title, ref, expr in _panel_queries("picker-overview.json"):
        q = expr.replace("$__rate_interval", RATE_WINDOW)
        assert "$" not in q, f"unsubstituted variable in {title}: {q}"
        values = [float(s["value"][1]) for s in prom.query(q)]
        if not any(not math.isnan(v) for v in values):
            empty.append(f"{title} [{ref}]: {q}")
        checked += 1
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert checked >= 10
    outcomes = {s["metric"]["outcome"] for s in prom.query("sum by (outcome) (kvfleet_picker_picks_total)")}
    assert {"policy", "load", "not_found"} <= outcomes


def test_promtool_check_metrics_passes_on_the_picker(scraped):
    _, picker = scraped
    code, findings = _promtool_check_metrics(_get(picker.url + "/metrics"))
    assert code == 0 and not findings, findings
