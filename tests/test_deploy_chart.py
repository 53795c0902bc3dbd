"""The Helm chart (deploy/helm/kvfleet), checked without a cluster: Helm's own linter and renderer
(helm-python-sdk), every rendered manifest against the Kubernetes schemas (kubernetes-validate,
strict) and the custom resources' schemas (deploy/schemas/), and the wiring between the pieces:
the flags each container runs with are kvfleet's, Services select their pods and name real ports,
the pool selects the replica pods, the ServiceMonitor's jobs are the dashboards' jobs, the Role
grants what `--inference-pool` reads."""

from __future__ import annotations

import copy
import importlib.util
import os
import platform
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _load("deploy/check.py", "deploy_check")

try:
    import helm_python  # noqa: F401
    import kubernetes_validate  # noqa: F401
except ImportError as e:
    if sys.platform == "linux" and platform.machine() == "x86_64":
        raise ImportError(f"{e}: {check.HINT}") from None
    pytest.skip("helm-python-sdk ships Linux x86_64 wheels only", allow_module_level=True)


@pytest.fixture(scope="module", params=sorted(check.VALUE_SETS))
def rendered(request) -> tuple[str, dict, list[dict]]:
    values = check.VALUE_SETS[request.param]
    return request.param, values, check.render(values)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def containers(docs: list[dict]) -> dict[str, dict]:
    """component -> (its workload, its one container)"""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            (c,) = d["spec"]["template"]["spec"]["containers"]
            out[d["metadata"]["labels"]["app.kubernetes.io/component"]] = {"workload": d, "container": c}
    return out


# The components whose pods run `kvfleet replica`: the unified group and the P/D groups.
REPLICA_GROUPS = {"replica": "replica", "prefill": "replica", "decode": "replica"}


def expand(arg: str, env: list[dict], pod: str) -> str:
    """`$(VAR)` in a container arg, as the kubelet expands it from the container's env (only the
    fieldRef metadata.name this chart uses), for the pod named `pod`."""
    for e in env:
        assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        arg = arg.replace(f"$({e['name']})", pod)
    assert "$(" not in arg, arg
    return arg


# ------------------------------------------------------------------------------ schema checks
def test_the_chart_lints_strict(rendered):
    name, values, _ = rendered
    assert check.lint(values) == [], name


def test_every_rendered_manifest_matches_its_schema(rendered):
    name, _, docs = rendered
    assert docs
    problems = [p for d in docs for p in check.validate(d)]
    assert problems == [], name


def test_the_schema_check_catches_broken_manifests():
    """Not vacuous: a wrong type, an unknown field, a bad enum and a bad duration are all refused."""
    docs = check.render(check.VALUE_SETS["gateway"])
    sts = copy.deepcopy(by_kind(docs, "StatefulSet")[0])
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    assert any("containerPort" in p for p in check.validate(sts))
    svc = copy.deepcopy(by_kind(docs, "Service")[0])
    svc["spec"]["selektor"] = {}
    assert check.validate(svc)
    pool = copy.deepcopy(by_kind(docs, "InferencePool")[0])
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Open"
    assert any("failureMode" in p for p in check.validate(pool))
    pool["spec"]["targetPortNumber"] = 8000  # the v1alpha2 field: not in v1
    assert any("targetPortNumber" in p for p in check.validate(pool))
    sm = copy.deepcopy(by_kind(docs, "ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert any("interval" in p for p in check.validate(sm))
    assert check.validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_values_that_cannot_work_fail_with_what_to_set():
    problems = check.check({"inferencePool": {"create": True}})
    assert any("needs picker.enabled=true" in p for p in problems), problems
    problems = check.check({"picker": {"enabled": True}})  # its default discovery needs a pool
    assert any("set inferencePool.create=true" in p for p in problems), problems
    assert check.check({"picker": {"enabled": True}, "inferencePool": {"name": "existing"}}) == []
    problems = check.check({"replicas": {"enabled": False}})
    assert any("set replicas.dnsName" in p for p in problems), problems
    # values.schema.json: a misspelt key or a value outside its set is refused by name
    problems = check.check({"picker": {"enable": True}, "balancer": {"discovery": "DNS"}})
    assert any("'enable' not allowed" in p for p in problems), problems
    assert any("/balancer/discovery" in p and "'dns', 'inferencePool'" in p for p in problems), problems


# ------------------------------------------------------------------------------ the wiring
def test_every_container_runs_with_kvfleets_own_flags(rendered):
    """The args parse with `kvfleet`'s own parser and build a valid config (a renamed flag fails here)."""
    from kvfleet import cli, cmd_balancer, cmd_picker, cmd_replica

    name, values, docs = rendered
    parser = cli.build_parser()
    for component, c in containers(docs).items():
        args = parser.parse_args(c["container"]["args"])
        assert args.command == REPLICA_GROUPS.get(component, component), (name, component)
        if component == "balancer":
            cfg = cmd_balancer.build_config(args)
        elif component == "picker":
            cfg = cmd_picker.build_config(args).fleet
        else:
            replica = cmd_replica.replica_config(args)
            assert replica.server.host == "0.0.0.0"
            continue
        assert cfg.host == "0.0.0.0" and cfg.model == values.get("model", "tiny")
        pool = cfg.inference_pool
        if pool is not None:
            assert pool.namespace == check.NAMESPACE and pool.kubeconfig is None  # in-cluster credentials
        else:
            assert cfg.dns, (name, component)


def test_services_select_their_pods_and_name_real_ports(rendered):
    name, _, docs = rendered
    pods = containers(docs)
    for svc in by_kind(docs, "Service"):
        sel = svc["spec"]["selector"]
        matched = [c for c in pods.values()
                   if sel.items() <= c["workload"]["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, (name, svc["metadata"]["name"])
        (c,) = matched
        names = {p["name"] for p in c["container"]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
        workload = c["workload"]
        assert sel.items() <= workload["spec"]["selector"]["matchLabels"].items()
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] == svc["metadata"]["name"]
            assert svc["spec"]["clusterIP"] == "None"  # headless: DNS lists every Ready pod


def test_dns_discovery_names_the_headless_service_and_event_ports():
    docs = check.render({})
    args = containers(docs)["balancer"]["container"]["args"]
    svc = by_kind(docs, "Service")
    headless = next(s for s in svc if s["spec"].get("clusterIP") == "None")
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    host = f"{headless['metadata']['name']}.{check.NAMESPACE}.svc.cluster.local:{ports['http']}"
    assert args[args.index("--dns") + 1] == host
    assert args[args.index("--dns-events-port") + 1] == str(ports["kv-events"])
    assert args[args.index("--dns-replay-port") + 1] == str(ports["kv-replay"])


def test_the_gateway_objects_point_at_each_other():
    docs = check.render(check.VALUE_SETS["gateway"])
    (pool,) = by_kind(docs, "InferencePool")
    (route,) = by_kind(docs, "HTTPRoute")
    pods = containers(docs)
    replica = pods["replica"]
    # the pool selects the replica pods, on their HTTP port, and names the picker's gRPC Service port
    assert pool["spec"]["selector"]["matchLabels"].items() <= \
        replica["workload"]["spec"]["template"]["metadata"]["labels"].items()
    http = {p["name"]: p["containerPort"] for p in replica["container"]["ports"]}
    assert pool["spec"]["targetPorts"] == [{"number": http["http"]}]
    picker_svc = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == pool["spec"]["endpointPickerRef"]["name"])
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in {p["port"] for p in picker_svc["spec"]["ports"]}
    # ... and the KV-event ports are named as balancer/inference_pool.py reads them
    from balancer.inference_pool import EVENTS_PORT_NAME, REPLAY_PORT_NAME

    assert {EVENTS_PORT_NAME, REPLAY_PORT_NAME} <= set(http)
    # the picker and balancer read this pool
    for component in ("picker", "balancer"):
        args = pods[component]["container"]["args"]
        assert args[args.index("--inference-pool") + 1] == f"{check.NAMESPACE}/{pool['metadata']['name']}"
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])
    # the picker's probes ask the gRPC health services it serves
    probes = pods["picker"]["container"]
    assert probes["readinessProbe"]["grpc"]["service"] == "readiness"
    assert probes["livenessProbe"]["grpc"]["service"] == "liveness"


def test_the_role_grants_what_inference_pool_discovery_reads():
    from balancer.inference_pool import API_VERSIONS, PLURAL

    docs = check.render(check.VALUE_SETS["gateway"])
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    needed = {("", "pods", v) for v in ("list", "watch")} | {(g, PLURAL, "get") for g, _ in API_VERSIONS}
    assert needed <= grants
    assert all(v in ("get", "list", "watch") for _, _, v in grants)  # read-only
    (subject,) = binding["subjects"]
    for c in containers(docs).values():
        if c["workload"]["metadata"]["labels"]["app.kubernetes.io/component"] not in REPLICA_GROUPS:
            assert c["workload"]["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]
    assert not by_kind(check.render({}), "Role")  # DNS discovery reads no API: no Role


def test_the_service_monitor_scrapes_every_component_under_the_dashboards_job_names():
    from kvfleet.prometheus import BALANCER_JOB, REPLICA_JOB

    docs = check.render(check.VALUE_SETS["gateway"])
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sel = sm["spec"]["selector"]["matchLabels"]
    scraped = [s for s in by_kind(docs, "Service") if sel.items() <= s["metadata"]["labels"].items()]
    jobs = {s["metadata"]["labels"][sm["spec"]["jobLabel"]] for s in scraped}
    assert jobs == {REPLICA_JOB, BALANCER_JOB, "kvfleet-picker"}  # the fleet panels' job=~"kvfleet-.*"
    endpoint_ports = {e["port"] for e in sm["spec"]["endpoints"]}
    for s in scraped:  # each Service has a port some endpoint scrapes, and it serves /metrics
        assert endpoint_ports & {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]


def test_the_dashboards_configmap_holds_what_dashboards_build_py_makes():
    build = _load("dashboards/build.py", "dashboards_build")
    docs = check.render(check.VALUE_SETS["gateway"])
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    made = {os.path.basename(k): v for k, v in build.render().items() if k.endswith(".json") and "deploy" not in k}
    assert cm["data"] == made


# ------------------------------------------------------------------------------ prefill/decode
def test_the_default_values_render_no_disaggregation():
    docs = check.render({})
    pods = containers(docs)
    assert set(pods) == {"replica", "balancer"}
    args = pods["replica"]["container"]["args"]
    assert not [a for a in args if a.startswith(("--role", "--kv-transfer"))]
    assert "env" not in pods["replica"]["container"]


def _replica(c) -> "object":
    from kvfleet import cli, cmd_replica

    return cmd_replica.replica_config(cli.build_parser().parse_args(c["container"]["args"]))


@pytest.mark.parametrize("name", ["disaggregated", "disaggregated-pool"])
def test_each_group_runs_its_role_and_decode_pulls_from_every_prefill_pod(name):
    """Each group's pods run with their --role; every pod that can be a pair's prefill side binds
    its KV block socket at its own pod DNS name (POD.SERVICE.NAMESPACE.svc.cluster.local, the
    StatefulSet's headless Service) on the kv-transfer port; every pod that pulls allows exactly
    those names (and extraPeers), as the replica's own allows_peer decides."""
    values = check.VALUE_SETS[name]
    d = values["disaggregation"]
    docs = check.render(values)
    pods = containers(docs)
    counts = {"prefill": d.get("prefill", {}).get("count", 1), "decode": d.get("decode", {}).get("count", 1),
              "replica": values["replicas"]["count"]}
    assert {k for k, n in counts.items() if n} == set(pods) - {"balancer", "picker"}
    roles = {"replica": "both", "prefill": "prefill", "decode": "decode"}
    senders, pullers = [], []
    for component in set(pods) & set(roles):
        c = pods[component]
        cfg = _replica(c).kv_transfer
        assert cfg.role == roles[component]
        sts = c["workload"]
        assert sts["spec"]["replicas"] == counts[component]
        assert sts["spec"]["template"]["metadata"]["labels"]["kvfleet.io/role"] == roles[component]
        ports = {p["name"]: p["containerPort"] for p in c["container"]["ports"]}
        if cfg.role != "decode":  # binds a KV block socket
            assert cfg.port == ports["kv-transfer"] == d.get("kvTransferPort", 5600)
            svc = sts["spec"]["serviceName"]
            for i in range(counts[component]):
                pod = f"{sts['metadata']['name']}-{i}"
                host = expand(cfg.host, c["container"]["env"], pod)
                assert host == f"{pod}.{svc}.{check.NAMESPACE}.svc.cluster.local"
                senders.append(host)
        else:
            assert "kv-transfer" not in ports
        if cfg.role != "prefill":
            pullers.append(cfg)
    assert senders and pullers
    for cfg in pullers:
        assert all(cfg.allows_peer(h) for h in senders)
        assert set(cfg.peers) == set(senders) | set(d.get("extraPeers", []))
        assert not cfg.allows_peer("kvfleet-prefill-9.kvfleet-prefill.llm.svc.cluster.local")
    assert "decode" in pods and "prefill" in pods


def test_the_decode_group_takes_its_own_extra_args():
    pods = containers(check.render(check.VALUE_SETS["disaggregated"]))
    assert _replica(pods["decode"]).kv_transfer.timeout_s == 10.0
    assert _replica(pods["prefill"]).kv_transfer.timeout_s == 5.0


def test_the_balancer_discovers_every_groups_headless_service():
    docs = check.render(check.VALUE_SETS["disaggregated"])
    args = containers(docs)["balancer"]["container"]["args"]
    dns = [args[i + 1] for i, a in enumerate(args) if a == "--dns"]
    headless = {s["metadata"]["name"]: s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"}
    assert set(headless) == {"kvfleet-prefill", "kvfleet-decode"}  # replicas.count 0: no unified group
    http = {n: next(p["port"] for p in s["spec"]["ports"] if p["name"] == "http") for n, s in headless.items()}
    assert sorted(dns) == sorted(f"{n}.{check.NAMESPACE}.svc.cluster.local:{http[n]}" for n in headless)
    for s in headless.values():  # the dashboards' replica job, on every group
        assert s["metadata"]["labels"]["kvfleet.io/job"] == "kvfleet-replica"


def test_the_pool_selects_every_replica_group_and_nothing_else():
    docs = check.render(check.VALUE_SETS["disaggregated-pool"])
    (pool,) = by_kind(docs, "InferencePool")
    sel = pool["spec"]["selector"]["matchLabels"]
    selected = {k for k, c in containers(docs).items()
                if sel.items() <= c["workload"]["spec"]["template"]["metadata"]["labels"].items()}
    assert selected == {"replica", "prefill", "decode"}


def test_the_example_values_file_deploys_a_prefill_and_a_decode_group():
    values = check.load_values(os.path.join(ROOT, "deploy", "examples", "values-disaggregated.yaml"))
    assert check.check(values) == []
    pods = containers(check.render(values))
    assert set(pods) == {"prefill", "decode", "balancer"}
    d = values["disaggregation"]
    for role in ("prefill", "decode"):
        c = pods[role]
        assert c["workload"]["spec"]["replicas"] == d[role]["count"]
        assert c["container"]["resources"] == d[role]["resources"]
        args = c["container"]["args"]
        shared, own = values["replicas"]["extraArgs"], d[role]["extraArgs"]
        assert args[-len(own) - len(shared):] == shared + own  # the group's flags after the shared ones
        assert _replica(c).kv_transfer.role == role
    assert _replica(pods["decode"]).kv_transfer.timeout_s == 10.0
    assert len(_replica(pods["decode"]).kv_transfer.peers) == d["prefill"]["count"]


def test_check_py_takes_values_files_under_set(tmp_path, capsys):
    f = tmp_path / "pd.yaml"
    f.write_text("disaggregation:\n  enabled: true\n  decode: {count: 2}\n")
    assert check.merge(check.load_values(str(f)), {"disaggregation": {"decode": {"count": 3}}}) == \
        {"disaggregation": {"enabled": True, "decode": {"count": 3}}}
    assert check.main(["-f", str(f), "--set", "disaggregation.prefill.count=2"]) == 0
    assert check.main(["-f", str(f), "--set", "disaggregation.decode.cuont=2"]) == 1
    out = capsys.readouterr().out
    assert f"{f} --set disaggregation.prefill.count=2: ok" in out and "'cuont' not allowed" in out


def test_disaggregation_without_the_charts_replicas_fails_with_what_to_set():
    problems = check.check({"disaggregation": {"enabled": True},
                            "replicas": {"enabled": False, "dnsName": "vllm.llm.svc.cluster.local:8000"}})
    assert any("set replicas.enabled=true" in p for p in problems), problems
    problems = check.check({"disaggregation": {"enabled": True, "prefil": {"count": 1}}})
    assert any("'prefil' not allowed" in p for p in problems), problems


def test_a_kv_block_socket_binds_at_a_host_name_and_is_reached_by_it():
    """The chart binds each prefill pod's KV block socket at its DNS name (--kv-transfer-host
    POD.SERVICE...): libzmq resolves a host name on bind (through /etc/hosts, where the kubelet
    puts the pod's own name), and a peer dials the same name. Here with `localhost`."""
    import zmq

    from replica.kv_transfer import _endpoint

    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.linger = dealer.linger = 0
        port = router.bind_to_random_port(_endpoint("localhost", 0).rsplit(":", 1)[0])
        dealer.connect(_endpoint("localhost", port))
        dealer.send(b"PULL")
        assert router.poll(5000)
        ident, msg = router.recv_multipart()
        assert msg == b"PULL"
    finally:
        ctx.destroy(linger=0)
