"""Replicas from an InferencePool (balancer/inference_pool.py): the real `kubernetes` client against a
real HTTP server speaking the Kubernetes API subset kvfleet uses (harness/kube_api.py), in front
of real replicas (echo servers on the pods' loopback addresses)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

pytest.importorskip("kubernetes", reason="the [k8s] extra (make install installs it)")

from balancer.config import BalancerConfig, InferencePoolConfig, ReplicaSpec
from balancer.inference_pool import PoolError, pod_replica, pod_replicas, pool_target
from balancer.membership import Membership
from harness import procs
from harness.fleet import balancer, wait_for
from harness.kube_api import PODS, KubeAPI

LABELS = {"app": "kvfleet-replica"}


# ------------------------------------------------------------------------------ the pool's spec
def test_pool_target_reads_both_published_versions():
    v1 = {"spec": {"selector": {"matchLabels": {"b": "2", "a": "1"}}, "targetPorts": [{"number": 8000}],
                   "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}
    alpha = {"spec": {"selector": {"a": "1", "b": "2"}, "targetPortNumber": 8000, "extensionRef": {"name": "epp"}}}
    assert pool_target(v1) == pool_target(alpha)
    assert pool_target(v1).label_selector == "a=1,b=2"
    assert pool_target(v1).ports == (8000,)
    two = {"spec": {**v1["spec"], "targetPorts": [{"number": 8000}, {"number": 8001}]}}
    assert pool_target(two).ports == (8000, 8001)


@pytest.mark.parametrize("spec, says", [
    ({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]}, "non-empty map of labels"),
    ({"selector": {"a": "1"}}, "names no port"),
    ({"selector": {"a": "1"}, "targetPortNumber": 70000}, "names no port"),
])
def test_pool_target_refuses_what_would_select_wrongly(spec, says):
    with pytest.raises(PoolError, match=says):
        pool_target({"spec": spec})


def _pod(**status) -> dict:
    base = {"phase": "Running", "podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]}
    return {"metadata": {"name": "p"}, "status": {**base, **status},
            "spec": {"containers": [{"ports": [{"name": "kv-events", "containerPort": 5557},
                                               {"name": "kv-replay", "containerPort": 5558}]}]}}


def test_pod_replica_only_for_ready_running_pods_with_an_ip():
    r = pod_replica(_pod(), 8000)
    assert r == ReplicaSpec("http://10.1.2.3:8000", "tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558")
    assert pod_replica(_pod(), 8000, events_port=6000).events == "tcp://10.1.2.3:6000"
    assert pod_replica(_pod(podIP="fd00::7"), 8000).url == "http://[fd00::7]:8000"
    assert pod_replica(_pod(conditions=[{"type": "Ready", "status": "False"}]), 8000) is None
    assert pod_replica(_pod(podIP=None), 8000) is None
    assert pod_replica(_pod(phase="Pending"), 8000) is None
    terminating = _pod()
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_replica(terminating, 8000) is None
    # v1 pools may list several target ports: one replica per port, KV events with the first
    both = pod_replicas(_pod(), (8000, 8001))
    assert [(r.url, r.events) for r in both] == [("http://10.1.2.3:8000", "tcp://10.1.2.3:5557"),
                                                 ("http://10.1.2.3:8001", None)]
    assert pod_replicas(_pod(podIP=None), (8000, 8001)) == []


def test_membership_touches_only_what_its_source_added():
    from balancer.config import BreakerConfig, HealthConfig
    from balancer.registry import Registry

    reg = Registry(BreakerConfig(), HealthConfig(), clock=lambda: 0.0)
    reg.add(ReplicaSpec("http://10.0.0.1:8000"))  # from --replica
    m = Membership(reg, reg.add, reg.remove)
    a, b = ReplicaSpec("http://10.0.0.1:8000"), ReplicaSpec("http://10.0.0.2:8000")
    assert m.reconcile([a, b]) == (["http://10.0.0.2:8000"], [])
    assert m.reconcile([]) == ([], ["http://10.0.0.2:8000"])
    assert [r.replica_id for r in reg] == ["http://10.0.0.1:8000"]  # not its own: kept
    moved = ReplicaSpec("http://10.0.0.2:8000", events="tcp://10.0.0.2:5557")
    m.reconcile([b])
    assert m.reconcile([moved]) == (["http://10.0.0.2:8000"], ["http://10.0.0.2:8000"])
    assert reg.get("http://10.0.0.2:8000").spec.events == "tcp://10.0.0.2:5557"


# ------------------------------------------------------------------------------ against the API
@pytest.fixture(scope="module")
def echoes():
    """Two real replicas on two pod addresses (127.0.0.2, 127.0.0.3), on one port, as a pool's pods."""
    port = procs.free_port()
    started = []
    try:
        for ip in ("127.0.0.2", "127.0.0.3"):
            started.append(procs.launch([sys.executable, "-m", "harness.echo_server", "--model", "m",
                                         "--host", ip, "--port", str(port)], name=f"echo {ip}"))
        yield port
    finally:
        for p in started:
            p.stop()


@pytest.fixture
def kube(tmp_path):
    with KubeAPI() as api:
        api.kubeconfig_path = api.kubeconfig(str(tmp_path / "kubeconfig"))
        yield api


def _ids(b) -> list[str]:
    return sorted(r.replica_id for r in b.registry)


async def _served_by(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 4}) as r:
            assert r.status == 200, await r.text()
            return r.headers["x-kvfleet-replica"]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v1alpha2"])
def test_ready_pods_of_the_pool_become_replicas_and_leave_with_readiness(kube, echoes, version):
    port = echoes
    kube.put_pool("pool", LABELS, port, version=version)
    kube.put_pod("r-0", "127.0.0.2", LABELS)
    kube.put_pod("r-1", "127.0.0.3", LABELS, ready=False)
    kube.put_pod("other", "127.0.0.4", {"app": "something-else"})  # not selected
    pool = InferencePoolConfig("default", "pool", kubeconfig=kube.kubeconfig_path, resync_s=1)
    a, b = f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"

    async def scenario():
        async with balancer([], inference_pool=pool, model="m") as (url, bal):
            assert _ids(bal) == [a]  # from the first list, before the app serves
            assert await _served_by(url) == a
            kube.put_pod("r-1", "127.0.0.3", LABELS, ready=True)  # becomes Ready
            await wait_for(lambda: _ids(bal) == [a, b])
            kube.put_pod("r-0", "127.0.0.2", LABELS, ready=False)  # fails its readiness probe
            await wait_for(lambda: _ids(bal) == [b])
            assert {await _served_by(url) for _ in range(4)} == {b}
            kube.put_pod("r-0", "127.0.0.2", LABELS, ready=True)
            await wait_for(lambda: _ids(bal) == [a, b])
            kube.delete(PODS, "default", "r-1")  # scaled down
            await wait_for(lambda: _ids(bal) == [a])
            kube.compact()  # history gone: the next watch gets 410 and lists again
            kube.put_pod("r-1", "127.0.0.3", LABELS, ready=True)
            await wait_for(lambda: _ids(bal) == [a, b])
            assert {await _served_by(url) for _ in range(6)} <= {a, b}
            # the pool now selects other labels: its pods are listed again
            kube.put_pod("canary", "127.0.0.3", {"app": "canary"})
            kube.put_pool("pool", {"app": "canary"}, port, version=version)
            await wait_for(lambda: _ids(bal) == [b])

    asyncio.run(scenario())
    watches = [r for r in kube.requests if "watch=true" in r]
    assert watches and all("resourceVersion=" in r for r in watches)


def test_kv_event_ports_come_from_the_pods_named_ports(kube):
    kube.put_pool("pool", LABELS, 8000)
    kube.put_pod("r-0", "127.0.0.2", LABELS, ports={"http": 8000, "kv-events": 5557, "kv-replay": 5558})
    pool = InferencePoolConfig("default", "pool", kubeconfig=kube.kubeconfig_path)

    async def scenario():
        async with balancer([], inference_pool=pool) as (_, bal):
            r = bal.registry.get("http://127.0.0.2:8000")
            assert (r.spec.events, r.spec.replay) == ("tcp://127.0.0.2:5557", "tcp://127.0.0.2:5558")
            assert "http://127.0.0.2:8000" in bal.subscribers  # its KV events are followed

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ errors a user sees
def _run_balancer(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfleet.cli", "balancer", "--port", "0", "--model", "m", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_a_missing_pool_says_how_to_create_it(kube):
    out = _run_balancer("--inference-pool", "default/nope", "--kubeconfig", kube.kubeconfig_path)
    assert out.returncode == 1
    assert "InferencePool default/nope not found" in out.stderr
    assert "inference.networking.k8s.io/v1" in out.stderr and "kubectl get inferencepools -n default" in out.stderr


def _start_error(pool: InferencePoolConfig) -> str:
    """What starting a balancer on `pool` raises (the CLI prints it and exits 1)."""
    from balancer.app import Balancer

    async def start():
        b = Balancer(BalancerConfig(model="m", inference_pool=pool))
        with pytest.raises(RuntimeError) as e:
            await b.start()
        assert b._session.closed  # cleaned up: nothing left open
        return str(e.value)

    return asyncio.run(start())


def test_a_bad_kubeconfig_says_what_to_pass(tmp_path, monkeypatch):
    bad = tmp_path / "kubeconfig"
    bad.write_text("this: is: not: a kubeconfig")
    for path in (str(bad), str(tmp_path / "missing")):
        msg = _start_error(InferencePoolConfig("default", "pool", kubeconfig=path))
        assert f"cannot load the kubeconfig {path}" in msg and "--kubeconfig PATH" in msg
    # no kubeconfig at all, outside a cluster
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    msg = _start_error(InferencePoolConfig("default", "pool"))
    assert "not in a pod" in msg and "--kubeconfig PATH" in msg
    # "in a pod" without a service-account token (automountServiceAccountToken: false)
    if not os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
        msg = _start_error(InferencePoolConfig("default", "pool"))
        assert "the pod's service account" in msg and "token" in msg, msg


def test_refused_credentials_say_what_rbac_to_grant(kube, tmp_path):
    kube.put_pool("pool", LABELS, 8000)
    doc = json.loads(open(kube.kubeconfig_path).read())
    doc["users"][0]["user"]["token"] = "wrong"
    path = tmp_path / "wrong-token"
    path.write_text(json.dumps(doc))
    msg = _start_error(InferencePoolConfig("default", "pool", kubeconfig=str(path)))
    assert "401" in msg and "get, list and watch on pods and inferencepools" in msg


def test_an_unreachable_api_server_says_what_to_check(kube):
    path, url = kube.kubeconfig_path, kube.url
    kube.stop()  # nothing listens there now
    msg = _start_error(InferencePoolConfig("default", "pool", kubeconfig=path))
    assert "cannot reach the Kubernetes API server" in msg and "kubectl cluster-info" in msg, (url, msg)


def test_config_file_and_flags(tmp_path):
    from kvfleet import cli, cmd_balancer, cmd_picker

    cfg = BalancerConfig.from_dict({"inference_pool": {"pool": "ns/p", "events_port": 5557}})
    assert cfg.inference_pool == InferencePoolConfig("ns", "p", events_port=5557)
    assert BalancerConfig.from_dict({"inference_pool": "ns/p"}).inference_pool.ref == "ns/p"
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        InferencePoolConfig.parse("just-a-name")
    with pytest.raises(ValueError, match="Kubernetes name"):
        InferencePoolConfig.parse("ns/Bad_Name")
    parser = cli.build_parser()
    for cmd, build in (("balancer", cmd_balancer.build_config), ("picker", lambda a: cmd_picker.build_config(a).fleet)):
        args = parser.parse_args([cmd, "--inference-pool", "ns/p", "--kubeconfig", "/k", "--kube-context", "c"])
        assert build(args).inference_pool == InferencePoolConfig("ns", "p", kubeconfig="/k", context="c")
        with pytest.raises(ValueError, match="need --inference-pool"):
            build(parser.parse_args([cmd, "--replica", "http://h:1", "--kubeconfig", "/k"]))


@pytest.mark.slow
def test_the_picker_follows_the_pool_and_is_ready_once_a_pod_is(kube, echoes):
    """`kvfleet picker --inference-pool`: its gRPC readiness (what the chart's probe asks) is
    NOT_SERVING while the pool has no Ready pod, SERVING once one is."""
    pytest.importorskip("grpc", reason="the [picker] extra")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from harness.envoy import picker

    port = echoes
    kube.put_pool("pool", LABELS, port)
    kube.put_pod("r-0", "127.0.0.2", LABELS, ready=False)
    pool = InferencePoolConfig("default", "pool", kubeconfig=kube.kubeconfig_path, resync_s=1)

    async def scenario():
        async with picker([], inference_pool=pool, model="m") as p:
            async with grpc.aio.insecure_channel(p.grpc_target) as ch:
                stub = health_pb2_grpc.HealthStub(ch)

                async def status() -> int:
                    return (await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))).status

                assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
                kube.put_pod("r-0", "127.0.0.2", LABELS, ready=True)
                await wait_for(lambda: _ids(p.balancer) == [f"http://127.0.0.2:{port}"])
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20
                while await status() != health_pb2.HealthCheckResponse.SERVING:
                    assert loop.time() < deadline, "the picker never became ready"
                    await asyncio.sleep(0.1)

    asyncio.run(scenario())


@pytest.mark.slow
def test_an_api_server_outage_keeps_the_replicas_and_the_watch_resumes(kube, echoes, caplog, tmp_path):
    port = echoes
    kube.put_pool("pool", LABELS, port)
    kube.put_pod("r-0", "127.0.0.2", LABELS)
    pool = InferencePoolConfig("default", "pool", kubeconfig=kube.kubeconfig_path, resync_s=0.5)
    a, b = f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"
    api_port = int(kube.url.rsplit(":", 1)[1])

    async def scenario():
        async with balancer([], inference_pool=pool, model="m") as (url, bal):
            assert _ids(bal) == [a]
            kube.stop()  # the API server goes away
            await wait_for(lambda: any("cannot reach the Kubernetes API server" in r.getMessage()
                                       and "keeping the current replicas" in r.getMessage() for r in caplog.records))
            assert _ids(bal) == [a] and await _served_by(url) == a  # still served
            back = KubeAPI(port=api_port).start()  # back, with another pod Ready meanwhile
            try:
                back.put_pool("pool", LABELS, port)
                back.put_pod("r-0", "127.0.0.2", LABELS)
                back.put_pod("r-1", "127.0.0.3", LABELS)
                await wait_for(lambda: _ids(bal) == [a, b])
            finally:
                back.stop()

    with caplog.at_level("WARNING", logger="balancer.inference_pool"):
        asyncio.run(scenario())
