"""Observability without a Prometheus server: the dashboards are what dashboards/build.py makes
and are well-formed for the Grafana schema they declare; metric names follow the conventions;
the Prometheus helpers write targets atomically and say how to install a missing binary; JSON
logs carry the request id from the balancer to the replica (a real two-process fleet)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from balancer.metrics import BalancerMetrics
from harness import procs
from kvfleet import logs
from kvfleet.fleet import FleetSpec, LocalFleet
from kvfleet.prometheus import (INSTALL_HINT, PrometheusConfig, PrometheusNotFound, PrometheusServer,
                                scrape_config, write_targets)
from replica.metrics import ReplicaMetrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARDS = os.path.join(ROOT, "dashboards")
DASHBOARD_FILES = ("fleet-overview.json", "replica-detail.json", "picker-overview.json")


def load_build():
    """dashboards/build.py as a module (it needs grafana-foundation-sdk, a dev dependency)."""
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is not installed (pip install "
                        "the dev extra); it builds dashboards/*.json")
    spec = importlib.util.spec_from_file_location("kvfleet_dashboards_build", os.path.join(DASHBOARDS, "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_dashboard(name: str) -> dict:
    with open(os.path.join(DASHBOARDS, name)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ dashboards
def test_committed_dashboards_equal_what_build_py_generates():
    build = load_build()
    for name, text in build.render().items():
        with open(os.path.join(DASHBOARDS, name)) as f:
            assert f.read() == text, f"dashboards/{name} is out of date: run `python dashboards/build.py`"


def test_dashboards_round_trip_through_the_sdk_model_unchanged():
    """The SDK's own model of the schema reads every field back: nothing unknown, nothing lost."""
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is not installed")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for name in DASHBOARD_FILES:
        data = load_dashboard(name)
        again = json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))
        assert again == data, name


PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table", "gauge", "bargauge", "heatmap", "text"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


def _variables_used(text: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)", text))


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_is_well_formed_for_its_schema_version(name):
    """The structure Grafana needs for schemaVersion 41 (Grafana 11.x; the version the SDK
    emits): required fields, unique panel ids on a 24-column grid without overlaps, every query
    with a refId and a Prometheus datasource, every variable a query uses defined."""
    d = load_dashboard(name)
    assert d["schemaVersion"] == 41
    for key in ("uid", "title", "panels", "templating", "time", "schemaVersion"):
        assert key in d, key
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert set(d["time"]) == {"from", "to"}
    variables = {v["name"]: v for v in d["templating"]["list"]}
    for v in variables.values():
        assert v["type"] in {"datasource", "query", "custom", "constant", "interval", "textbox", "adhoc"}
        if v["type"] == "query":
            assert v["datasource"]["type"] == "prometheus" and v["query"]
    assert variables["datasource"]["query"] == "prometheus"

    ids, cells = set(), set()
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert isinstance(p["id"], int) and p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["h"] > 0 and 0 < g["w"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            assert p["panels"] == [] and not p.get("collapsed")
            continue
        assert p["title"] and p.get("description"), "every panel says what it shows"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["type"] == "prometheus"
            unknown = _variables_used(t["expr"]) - set(variables) - BUILTIN_VARIABLES
            assert not unknown, f"{p['title']}: undefined variables {unknown}"


def test_fleet_overview_covers_what_the_issue_asks_for():
    exprs = " ".join(t["expr"] for p in load_dashboard("fleet-overview.json")["panels"] for t in p.get("targets", []))
    for metric in ("kvfleet_requests_total", "kvfleet_time_to_first_token_seconds_bucket",
                   "kvfleet_e2e_request_latency_seconds_bucket", "kvfleet_predicted_cached_tokens_total",
                   "kvfleet_reported_cached_tokens_total", "kvfleet_routing_decision_seconds_bucket",
                   "kvfleet_replica_inflight_requests", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting",
                   "kvfleet_retries_total", "kvfleet_failovers_total", "kvfleet_kv_resyncs_total",
                   "kvfleet_replica_healthy", "kvfleet_replica_circuit_state"):
        assert metric in exprs, metric
    assert exprs.count("histogram_quantile(") >= 6


def test_static_prometheus_config_is_the_generated_one():
    with open(os.path.join(DASHBOARDS, "prometheus.yml")) as f:
        text = f.read()
    assert text == scrape_config("targets", 5.0)
    assert "file_sd_configs" in text and "kvfleet-balancer" in text and "kvfleet-replica" in text


def test_provisioning_files_point_at_the_dashboards_and_prometheus():
    with open(os.path.join(DASHBOARDS, "provisioning", "datasources", "prometheus.yaml")) as f:
        ds = f.read()
    assert "type: prometheus" in ds and "uid: prometheus" in ds and "timeInterval:" in ds
    with open(os.path.join(DASHBOARDS, "provisioning", "dashboards", "kvfleet.yaml")) as f:
        prov = f.read()
    assert "type: file" in prov and "path:" in prov and "apiVersion: 1" in prov


# ------------------------------------------------------------------------------ metrics
def _families(registry):
    return {f.name: f for f in registry.collect()}


def test_balancer_metric_names_follow_conventions():
    m = BalancerMetrics()
    m.add_replica("http://127.0.0.1:1")
    m.requests.labels("http://127.0.0.1:1", "round_robin", "2xx").inc()
    m.resyncs.labels("http://127.0.0.1:1", "startup").inc()
    for fam in m.registry.collect():
        assert fam.name.startswith("kvfleet_") and fam.documentation, fam.name
        if fam.type == "counter":
            assert {s.name for s in fam.samples} == {fam.name + "_total", fam.name + "_created"}, fam.name
        if fam.type == "histogram":  # a base unit in the name
            assert fam.name.endswith(("_seconds", "_tokens")), fam.name
        for s in fam.samples:
            assert set(s.labels) <= {"replica", "policy", "status", "reason", "le", "outcome"}, s.labels


def test_balancer_creates_a_replicas_series_at_zero_and_drops_them_when_it_leaves():
    m = BalancerMetrics()
    a, b = "http://127.0.0.1:1", "http://127.0.0.1:2"
    m.add_replica(a)
    m.add_replica(b)
    m.requests.labels(a, "round_robin", "2xx").inc()
    m.resyncs.labels(a, "startup").inc()
    text = _exposition(m.registry)
    assert f'kvfleet_retries_total{{replica="{a}"}} 0.0' in text
    assert f'kvfleet_failovers_total{{replica="{b}"}} 0.0' in text
    m.forget_replica(a)
    text = _exposition(m.registry)
    assert a not in text and b in text


def _plain_and_prometheus_expositions(counter, gauge, histogram) -> str:
    """The same series updated the same way, built from `counter`, `gauge` and `histogram`."""
    from prometheus_client import CollectorRegistry

    from balancer.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS

    r = CollectorRegistry()
    requests = counter("kvfleet_requests_total", "Requests.", ("replica", "policy", "status"), registry=r)
    refused = counter("kvfleet_no_replica_total", "Refused.", registry=r)
    inflight = gauge("kvfleet_replica_inflight_requests", "In flight.", ("replica",), registry=r)
    e2e = histogram("kvfleet_e2e_request_latency_seconds", "E2E.", buckets=LATENCY_BUCKETS, registry=r)
    cached = histogram("kvfleet_request_delivered_cached_tokens", "Cached.", ("replica",), buckets=TOKEN_BUCKETS,
                       registry=r)
    a, b = "http://127.0.0.1:1", "http://127.0.0.1:2"
    requests.labels(b, "precise_prefix", "2xx")
    requests.labels(a, "precise_prefix", "2xx").inc()
    requests.labels(a, "precise_prefix", "2xx").inc(3)
    requests.labels(a, "precise_prefix", "5xx").inc()
    refused.inc(2)
    inflight.labels(a).set(4)
    inflight.labels(b).set(1)
    inflight.labels(b).set(0)
    for v in (0.0, 0.005, 0.0051, 0.3, 1, 25.0, 1e6):  # on a bound, past one, past the last
        e2e.observe(v)
    for v in (0, 16, 17, 4096, 300_000):
        cached.labels(a).observe(v)
    cached.labels(b)
    requests.remove(b, "precise_prefix", "2xx")
    return _exposition(r)


def test_plain_series_expose_exactly_what_prometheus_client_would():
    """The request path's series (balancer/plain_series.py) are scraped as prometheus_client's
    Counter, Gauge and Histogram are: names, HELP, TYPE, labels, order, values; only the
    `_created` timestamps differ (the series were made at other instants)."""
    from prometheus_client import Counter, Gauge, Histogram

    from balancer.plain_series import PlainCounter, PlainGauge, PlainHistogram

    def created_masked(text: str) -> str:
        return re.sub(r"^(\S+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text, flags=re.M)

    plain = _plain_and_prometheus_expositions(PlainCounter, PlainGauge, PlainHistogram)
    theirs = _plain_and_prometheus_expositions(Counter, Gauge, Histogram)
    assert "_created" in theirs and 'le="+Inf"' in theirs
    assert created_masked(plain) == created_masked(theirs)


def test_a_balancer_scrape_has_every_request_series():
    """One request's worth of updates on the balancer's metrics, scraped: every per-request
    series is there by its Prometheus name."""
    m = BalancerMetrics()
    a = "http://127.0.0.1:1"
    m.add_replica(a)
    m.series(m.requests, a, "precise_prefix", "2xx").inc()
    m.series(m.inflight, a).set(1)
    m.decision.observe(1e-4)
    m.e2e.observe(0.01)
    m.ttft.observe(0.005)
    m.series(m.predicted_cached_hist, a).observe(16)
    text = _exposition(m.registry)
    for line in (f'kvfleet_requests_total{{policy="precise_prefix",replica="{a}",status="2xx"}} 1.0',
                 f'kvfleet_replica_inflight_requests{{replica="{a}"}} 1.0',
                 'kvfleet_routing_decision_seconds_bucket{le="0.0001"} 1.0',
                 'kvfleet_e2e_request_latency_seconds_count 1.0',
                 'kvfleet_time_to_first_token_seconds_sum 0.005',
                 f'kvfleet_request_predicted_cached_tokens_bucket{{le="16.0",replica="{a}"}} 1.0',
                 f'kvfleet_prompt_tokens_total{{replica="{a}"}} 0.0',
                 f'kvfleet_cache_mismatch_total{{replica="{a}"}} 0.0',
                 '# TYPE kvfleet_lora_routed_total counter',
                 'kvfleet_lora_routed_total{outcome="resident"} 0.0'):
        assert line in text.splitlines(), line
    m.forget_replica(a)
    assert a not in _exposition(m.registry)


def _exposition(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_replica_metrics_keep_vllm_names():
    text = _exposition(ReplicaMetrics("tiny").registry)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert f"\n{name}{{" in text, name
    for reason in ("stop", "length", "abort"):
        assert f'finished_reason="{reason}"' in text


# ------------------------------------------------------------------------------ prometheus helpers
def test_targets_are_replaced_atomically(tmp_path):
    d = str(tmp_path / "targets")
    write_targets(d, ["http://127.0.0.1:8080"], ["http://127.0.0.1:8001", "127.0.0.1:8002"])
    path = os.path.join(d, "replicas.json")
    with open(path) as f:
        assert json.load(f) == [{"targets": ["127.0.0.1:8001", "127.0.0.1:8002"], "labels": {}}]
    before = os.stat(path).st_ino
    write_targets(d, ["127.0.0.1:8080"], [])
    with open(path) as f:
        assert json.load(f) == []
    assert os.stat(path).st_ino != before, "a new file renamed over the old one, never rewritten in place"
    assert sorted(os.listdir(d)) == ["balancers.json", "replicas.json"], "no temp file left behind"


def test_missing_prometheus_says_how_to_install_it():
    with pytest.raises(PrometheusNotFound, match="apt-get install prometheus"):
        PrometheusServer(PrometheusConfig(binary="no-such-prometheus-binary"))
    spec = FleetSpec(engine="sim", balancer_port=0, prometheus=PrometheusConfig(binary="no-such-prometheus-binary"))
    fleet = LocalFleet(spec)
    with pytest.raises(PrometheusNotFound):
        fleet.__enter__()
    assert fleet.replicas == [] and fleet.balancer is None, "nothing was started"


def test_fleet_up_without_prometheus_exits_with_the_install_hint():
    out = subprocess.run([sys.executable, "-m", "kvfleet.cli", "fleet", "up", "--engine", "sim", "--port", "0",
                          "--prometheus", "--prometheus-binary", "/nonexistent/prometheus"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    assert INSTALL_HINT in out.stderr


# ------------------------------------------------------------------------------ logs
def test_json_log_lines_carry_the_standard_fields_and_extras():
    buf = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup("json", "info", stream=buf)
        logging.getLogger("kvfleet.test").info("served %s", "x", extra={"request_id": "r-1", "status": 200})
        logging.getLogger("kvfleet.test").debug("not at info")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["level"] == "info" and rec["logger"] == "kvfleet.test" and rec["message"] == "served x"
    assert rec["request_id"] == "r-1" and rec["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])


def _json_lines(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))  # every line is one JSON object
    return out


@pytest.mark.slow
def test_a_request_is_followed_from_balancer_to_replica_by_its_id(tmp_path):
    rlog, blog = str(tmp_path / "replica.log"), str(tmp_path / "balancer.log")
    replica = procs.start(["replica", "--port", "0", "--engine", "sim", "--preset", "llama3-8b-h100", "--time-scale", "20",
                           "--log-format", "json"], stderr=rlog)
    balancer = None
    try:
        balancer = procs.start(["balancer", "--port", "0", "--replica", replica.url, "--log-format", "json"], stderr=blog)
        for rid, stream in (("trace-unary-1", False), ("trace-stream-1", True)):
            body = {"prompt": "Follow me from the balancer to the replica. " * 8, "max_tokens": 12,
                    "stream": stream, "stream_options": {"include_usage": True} if stream else None}
            req = urllib.request.Request(balancer.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "X-Request-Id": rid})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 200 and r.headers["X-Request-Id"] == rid
                r.read()
    finally:
        if balancer is not None:
            balancer.stop()
        replica.stop()
    b_lines = [r for r in _json_lines(blog) if r["logger"] == "kvfleet.balancer.access"]
    r_lines = [r for r in _json_lines(rlog) if r["logger"] == "kvfleet.replica.access"]
    assert len(b_lines) == 2 and len(r_lines) == 2, "one access line per request, none per token"
    b_access = {r["request_id"]: r for r in b_lines}
    r_access = {r["request_id"]: r for r in r_lines}
    for rid in ("trace-unary-1", "trace-stream-1"):
        b, r = b_access[rid], r_access[rid]
        assert b["replica"] == replica.url and b["status"] == 200 and b["policy"]
        assert b["ttft_s"] > 0 and b["e2e_s"] >= b["ttft_s"] and b["attempts"] == 1
        assert r["prompt_tokens"] == b["prompt_tokens"] > 0
        assert r["output_tokens"] == 12 and r["finish_reason"] == "length"
        assert 0 <= r["cached_tokens"] <= r["prompt_tokens"]
        for rec in (b, r):
            assert {"ts", "level", "logger", "message"} <= set(rec)
    # the second request shares the first one's prompt: the replica says so, the balancer relays it
    assert r_access["trace-stream-1"]["cached_tokens"] > 0
    assert b_access["trace-stream-1"]["reported_cached_tokens"] == r_access["trace-stream-1"]["cached_tokens"]
