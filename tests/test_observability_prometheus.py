"""The dashboards proven on a real Prometheus: a local fleet (three sim replicas and the balancer)
with `LocalFleet(prometheus=...)`, real load (shared prefixes, streams, one replica killed
mid-stream: a failover and retries), then every query of every panel of both dashboards runs
through Prometheus' HTTP API and must return data. Also `promtool check metrics` on the
balancer's and a replica's /metrics, and `promtool check config` on dashboards/prometheus.yml.

Prometheus is Debian's `prometheus` package (it ships `promtool`); the test installs it with
apt-get when it is missing and skips only where apt-get itself is unavailable.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvfleet.fleet import FleetSpec, LocalFleet
from kvfleet.prometheus import PrometheusConfig

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARDS = os.path.join(ROOT, "dashboards")
# Two LoRA adapters on every replica (a sim adapter has no weights: the paths are never read),
# one resident at a time: the LoRA panels get adapter traffic, loads and evictions. A host KV
# tier on every replica: the offload panels' series exist (their values are rates, zero here).
SIM_ARGS = ("--preset", "llama3-8b-h100", "--time-scale", "20",
            "--lora-modules", "sql=/sim/sql.safetensors", "chat=/sim/chat.safetensors",
            "--kv-offload-host-blocks", "4096")
SCRAPE_S = 1.0
RATE_WINDOW = "1m"  # what `$__rate_interval` becomes in the queries

# What `promtool check metrics` may say about a replica's /metrics: vLLM's own names, kept so
# vLLM dashboards work (replica/metrics.py). Anything else is a finding that fails the test.
VLLM_LINT_ALLOWED = (
    re.compile(r"^vllm:\w+ metric names should not contain ':'$"),
    re.compile(r'^vllm:iteration_tokens_total non-counter metrics should not have "_total" suffix$'),
)


# ------------------------------------------------------------------------------ prometheus install
def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s: {(e.stdout or '')[-2000:]}")


@pytest.fixture(scope="module")
def prometheus_tools() -> None:
    """`prometheus` and `promtool` on PATH, installed from Debian's package if missing."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("Prometheus is not installed and apt-get is unavailable here: install `prometheus` and "
                    "`promtool` (Debian/Ubuntu: apt-get install prometheus) to run this test")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        pytest.skip("Prometheus is not installed and apt-get needs root here (no sudo): run "
                    "`apt-get install prometheus` as root to run this test")
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    out = _run([*prefix, apt, *lock, "update", "-q"], timeout=300)
    if out.returncode != 0:
        pytest.fail(f"`apt-get update` failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    out = _run([*prefix, apt, *lock, "install", "-y", "-q", "--no-install-recommends", "prometheus"], timeout=600)
    if out.returncode != 0:
        pytest.fail(f"`apt-get install prometheus` failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                    f"{out.stderr[-2000:]}")
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.fail("apt-get installed the prometheus package but `prometheus` / `promtool` are not on PATH")


# ------------------------------------------------------------------------------ load
SYSTEM_PROMPTS = [f"System prompt {i}: you are assistant number {i}. " + f"Rule {i} says be brief. " * 40
                  for i in range(4)]


def _post(url: str, body: dict, timeout: float = 60, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _request(base: str, i: int) -> int:
    """Request i of the shared-prefix mix: completions and chat, unary and streamed."""
    system = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
    stream = i % 2 == 1
    extra = {"stream": stream, "max_tokens": 8 + i % 16}
    if i % 4 == 2:  # a LoRA adapter's request, by its `model` name
        extra["model"] = ("sql", "chat")[i // 4 % 2]
    if stream:
        extra["stream_options"] = {"include_usage": True}
    if i % 3 == 0:
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
                **extra}
        status, raw, _ = _post(base + "/v1/chat/completions", body)
    else:  # every fourth completion in a sticky session, conv-1 or conv-2 (the balancer runs with --sessions)
        session = {"X-Session-Id": f"conv-{i % 3}"} if i % 4 == 1 else None
        status, raw, _ = _post(base + "/v1/completions", {"prompt": system + f"question {i}", **extra},
                               headers=session)
    if stream:
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    return status


def _load(base: str, n: int, start: int = 0) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda i: _request(base, i), range(start, start + n)))
    assert statuses == [200] * n, statuses


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _admin(base: str, action: str, replica: str) -> None:
    status, raw, _ = _post(f"{base}/admin/replicas/{action}", {"replica": replica})
    assert status == 200, raw


def _kill_mid_stream(fleet: LocalFleet) -> str:
    """Pin a cached prompt and a long stream on one replica (the others drained meanwhile), SIGKILL
    it once the stream's first tokens arrive, then send the pinned prompt again: the prefix index
    still says only the dead replica holds it, so each goes there first, is refused and retried
    elsewhere; the stream is continued on another replica. Returns the dead replica's URL."""
    base = fleet.balancer.url
    victim, others = fleet.replicas[0], fleet.replicas[1:]
    pinned = "A prompt that only the first replica has cached. " * 40
    # Greedy: only a stream that can be continued exactly is failed over (issue #20).
    story = {"prompt": "A long story. " * 100, "max_tokens": 3000, "ignore_eos": True, "stream": True,
             "temperature": 0, "stream_options": {"include_usage": True}}
    for r in others:
        _admin(base, "drain", r.url)
    try:
        status, raw, headers = _post(base + "/v1/completions", {"prompt": pinned, "max_tokens": 1})
        assert status == 200 and headers["X-Kvfleet-Replica"] == victim.url, raw
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(story).encode(),
                                     headers={"Content-Type": "application/json"})
        stream = urllib.request.urlopen(req, timeout=120)
    finally:
        for r in others:
            _admin(base, "undrain", r.url)
    with stream:
        assert stream.headers["X-Kvfleet-Replica"] == victim.url
        first = stream.readline()
        assert first.startswith(b"data: "), first
        victim.popen.kill()
        victim.popen.wait()
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(lambda _: _post(base + "/v1/completions", {"prompt": pinned, "max_tokens": 4}),
                                    range(3)))
        assert [s for s, _, _ in results] == [200] * 3
        assert all(h["X-Kvfleet-Replica"] != victim.url for _, _, h in results)
        rest = stream.read()
    assert rest.rstrip().endswith(b"data: [DONE]") and b'"error"' not in rest, rest[-500:]
    return victim.url


@pytest.fixture(scope="module")
def loaded_fleet(prometheus_tools):
    # --fairness: the fair admission queue's panels get data (with one class and room for all: nothing waits)
    spec = FleetSpec(replicas=3, engine="sim", balancer_port=0, replica_args=SIM_ARGS,
                     balancer_args=("--sessions", "--fairness"),
                     prometheus=PrometheusConfig(port=0, scrape_interval_s=SCRAPE_S))
    with LocalFleet(spec) as fleet:
        base = fleet.balancer.url
        _load(base, 24)
        victim = _kill_mid_stream(fleet)
        metrics = _get(base + "/metrics")
        assert _metric_sum(metrics, "kvfleet_failovers_total", replica=victim) >= 1
        assert _metric_sum(metrics, "kvfleet_retries_total", replica=victim) >= 1
        time.sleep(3 * SCRAPE_S)  # let Prometheus scrape the failure before the replica's series go
        dead = next(r for r in fleet.replicas if r.url == victim)
        fleet.remove_replica(dead)
        _load(base, 12, start=24)
        _wait_for_scrape(fleet)
        yield fleet, victim


def _wait_for_scrape(fleet: LocalFleet, timeout: float = 30.0) -> None:
    """Until Prometheus holds the balancer's current request count (its last scrape is recent)."""
    prom = fleet.prometheus
    deadline = time.monotonic() + timeout
    want = None
    while time.monotonic() < deadline:
        want = _metric_sum(_get(fleet.balancer.url + "/metrics"), "kvfleet_requests_total")
        got = prom.query('sum(kvfleet_requests_total{job="kvfleet-balancer"})')
        if got and float(got[0]["value"][1]) == want:
            return
        time.sleep(0.5)
    pytest.fail(f"Prometheus did not scrape the balancer's {want} requests within {timeout:.0f} s; "
                f"its log:\n{prom.log_tail()}")


# ------------------------------------------------------------------------------ the dashboards
def _panel_queries(name: str) -> list[tuple[str, str, str]]:
    with open(os.path.join(DASHBOARDS, name)) as f:
        d = json.load(f)
    return [(p["title"], t["refId"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def row_queries(row: str, name: str = "fleet-overview.json") -> list[tuple[str, str]]:
    """(panel title, expr) of the panels under the dashboard's row titled `row`."""
    with open(os.path.join(DASHBOARDS, name)) as f:
        panels = json.load(f)["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == row)
    out = []
    for p in panels[start + 1:]:
        if p["type"] == "row":
            break
        out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def _substitute(expr: str, replica: str) -> str:
    return (expr.replace("$__rate_interval", RATE_WINDOW).replace("${replica}", replica)
            .replace("$replica", replica))


METRIC_NAME = re.compile(r"\b(kvfleet_[a-z0-9_]+|vllm:[a-z0-9_:]+)")


def test_every_panel_query_returns_data(loaded_fleet):
    fleet, victim = loaded_fleet
    prom = fleet.prometheus
    known = set(json.loads(_get(prom.url + "/api/v1/label/__name__/values"))["data"])
    # the replica variable: what the dashboard's own variable query offers, a live replica
    offered = json.loads(_get(prom.url + "/api/v1/label/instance/values?match[]=vllm:num_requests_running"))["data"]
    live = [r.url.split("://", 1)[1] for r in fleet.replicas]
    assert set(live) <= set(offered)
    replica = live[0]

    empty, unknown, checked = [], set(), 0
    for name in ("fleet-overview.json", "replica-detail.json"):
        for title, ref, expr in _panel_queries(name):
            q = _substitute(expr, replica)
            assert "$" not in q, f"unsubstituted variable in {name} / {title}: {q}"
            unknown |= {m for m in METRIC_NAME.findall(q) if m not in known}
            result = prom.query(q)
            values = [float(s["value"][1]) for s in result]
            if not any(not math.isnan(v) for v in values):
                empty.append(f"{name} / {title} [{ref}]: {q} -> {result}")
            checked += 1
    assert not unknown, f"panels query metrics Prometheus never saw: {sorted(unknown)}"
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert checked >= 40


def test_the_failure_shows_in_prometheus(loaded_fleet):
    fleet, victim = loaded_fleet
    prom = fleet.prometheus
    failovers = prom.query(f'max_over_time(kvfleet_failovers_total{{replica="{victim}"}}[5m])')
    retries = prom.query(f'max_over_time(kvfleet_retries_total{{replica="{victim}"}}[5m])')
    assert failovers and float(failovers[0]["value"][1]) >= 1
    assert retries and float(retries[0]["value"][1]) >= 1
    assert prom.query("sum(kvfleet_kv_resyncs_total)"), "every subscriber resyncs at startup"


def test_lora_routing_shows_in_prometheus(loaded_fleet):
    fleet, _ = loaded_fleet
    prom = fleet.prometheus
    status, raw, _ = _post(fleet.balancer.url + "/v1/completions", {"model": "no-such-adapter", "prompt": "x"})
    assert status == 404 and "no-such-adapter" in json.loads(raw)["error"]["message"]
    deadline = time.monotonic() + 30
    while True:  # until Prometheus has scraped the 404
        routed = {s["metric"]["outcome"]: float(s["value"][1])
                  for s in prom.query("sum by (outcome) (kvfleet_lora_routed_total)")}
        if routed.get("unserved", 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert routed["resident"] >= 1 and routed["load"] >= 1 and routed["unserved"] >= 1, routed
    resident = prom.query("sum by (lora_name) (kvfleet_replica_lora_resident)")
    assert {s["metric"]["lora_name"] for s in resident} == {"sql", "chat"}
    loads = prom.query("sum(kvfleet_replica_lora_loads_total)")
    assert loads and float(loads[0]["value"][1]) > len(fleet.replicas)  # the start's preloads, then chat's


def test_sticky_sessions_show_in_prometheus(loaded_fleet):
    fleet, _ = loaded_fleet
    prom = fleet.prometheus
    routed = {s["metric"]["outcome"]: float(s["value"][1])
              for s in prom.query("sum by (outcome) (kvfleet_session_routed_total)")}
    assert routed["new"] >= 1 and routed["stuck"] >= 1, routed
    active = prom.query("max_over_time(kvfleet_sessions_active[5m])")
    assert active and float(active[0]["value"][1]) >= 1


def test_prometheus_targets_follow_the_fleet(loaded_fleet):
    fleet, victim = loaded_fleet
    prom = fleet.prometheus
    with open(os.path.join(prom.targets_dir, "replicas.json")) as f:
        listed = json.load(f)[0]["targets"]
    assert sorted(listed) == sorted(r.url.split("://", 1)[1] for r in fleet.replicas)
    assert victim.split("://", 1)[1] not in listed
    deadline = time.monotonic() + 20  # Prometheus applies target changes every 5 s
    while True:
        active = json.loads(_get(prom.url + "/api/v1/targets?state=active"))["data"]["activeTargets"]
        scraped = sorted(t["labels"]["instance"] for t in active if t["labels"]["job"] == "kvfleet-replica")
        if scraped == sorted(listed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert scraped == sorted(listed)
    assert [t["health"] for t in active] == ["up"] * len(active)


# ------------------------------------------------------------------------------ promtool
def _promtool_check_metrics(text: str) -> tuple[int, list[str]]:
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    findings = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return out.returncode, findings


def test_promtool_check_metrics_passes_on_the_balancer(loaded_fleet):
    fleet, _ = loaded_fleet
    code, findings = _promtool_check_metrics(_get(fleet.balancer.url + "/metrics"))
    assert code == 0 and not findings, findings


def test_promtool_check_metrics_on_a_replica_finds_only_vllms_own_names(loaded_fleet):
    fleet, _ = loaded_fleet
    text = _get(fleet.replicas[0].url + "/metrics")
    code, findings = _promtool_check_metrics(text)
    assert code in (0, 3), f"promtool could not parse the exposition ({code}): {findings}"  # 3: lint findings
    other = [f for f in findings if not any(p.match(f) for p in VLLM_LINT_ALLOWED)]
    assert not other, f"lint findings beyond vLLM's own naming: {other}"
    # and with vLLM's colon names written as Prometheus would have them, everything passes
    code, findings = _promtool_check_metrics(text.replace("vllm:iteration_tokens_total", "vllm:iteration_tokens")
                                             .replace("vllm:", "vllm_"))
    assert code == 0 and not findings, findings


def test_promtool_check_config_on_the_static_scrape_config(prometheus_tools):
    out = subprocess.run(["promtool", "check", "config", os.path.join(DASHBOARDS, "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
