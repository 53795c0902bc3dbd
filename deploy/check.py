"""Render, lint and schema-check the Helm chart, with no cluster and no `helm` binary.

    python deploy/check.py                       # the chart's value sets below: lint + validate
    python deploy/check.py --set picker.enabled=true --set inferencePool.create=true
    python deploy/check.py -f deploy/examples/values-disaggregated.yaml [--set ...]   # a values file
    python deploy/check.py --print [-f FILE] [--set ...]   # the rendered manifests

Needs the [deploy] extra (pip install 'kvfleet[deploy]'): helm-python-sdk (Helm's own Go library:
`helm lint --strict`, `helm template`; Linux x86_64 wheels) and kubernetes-validate (the JSON
schemas of every built-in kind, strict: unknown fields are errors). The custom resources
(InferencePool, ServiceMonitor, HTTPRoute) are checked against deploy/schemas/.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "helm", "kvfleet")
SCHEMAS = os.path.join(HERE, "schemas")
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are checked against (gRPC probes: 1.27 GA)
HINT = "install the chart's checkers: pip install 'kvfleet[deploy]' (make install does)"
RELEASE, NAMESPACE = "kvfleet", "llm"

# The value sets the tests and this script check: the defaults, and each way to run kvfleet.
VALUE_SETS: dict[str, dict] = {
    "defaults": {},
    "gateway": {"picker": {"enabled": True}, "inferencePool": {"create": True}, "httpRoute": {"enabled": True},
                "balancer": {"discovery": "inferencePool"}, "serviceMonitor": {"enabled": True,
                "labels": {"release": "kube-prometheus-stack"}}, "dashboards": {"enabled": True}},
    "picker-on-dns": {"balancer": {"enabled": False}, "picker": {"enabled": True, "discovery": "dns"}},
    "external-vllm": {"replicas": {"enabled": False, "dnsName": "vllm.llm.svc.cluster.local:8000", "port": 8000},
                      "model": "meta-llama/Llama-3.1-8B-Instruct", "balancer": {"extraArgs": ["--sessions"]}},
    # prefill/decode disaggregation: 2 prefill + 3 decode replicas, no unified group
    "disaggregated": {"replicas": {"count": 0},
                      "disaggregation": {"enabled": True, "prefill": {"count": 2}, "decode": {"count": 3,
                                         "extraArgs": ["--kv-transfer-timeout", "10"]}}},
    # both groups next to a unified one, discovered through an InferencePool by balancer and picker
    "disaggregated-pool": {"replicas": {"count": 1}, "disaggregation": {"enabled": True, "extraPeers": ["10.0.0.0/8"]},
                           "picker": {"enabled": True}, "inferencePool": {"create": True},
                           "balancer": {"discovery": "inferencePool"}},
}


def _helm():
    try:
        import helm_python
    except ImportError as e:
        raise RuntimeError(f"{e}; {HINT}") from None
    helm_python.disable_logging()  # its failures come back as exceptions; no copy on stderr
    return helm_python


def render(values: dict | None = None) -> list[dict]:
    """The chart's manifests for `values` (as `helm template kvfleet deploy/helm/kvfleet -n llm`)."""
    import yaml

    out = _helm().Chart.load(CHART).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def lint(values: dict | None = None) -> list[str]:
    """`helm lint --strict`'s warnings and errors (info-level messages are not problems)."""
    report = _helm().lint(CHART, values or {}, strict=True, namespace=NAMESPACE)
    return [f"{m['path']}: {m['error']}" for m in report.get("messages") or () if m.get("severity", 0) >= 2] + \
        list(report.get("errors") or ())


def _crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in glob.glob(os.path.join(SCHEMAS, "*.json")):
        with open(path) as f:
            s = json.load(f)
        schemas[(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"])] = s
    return schemas


def validate(doc: dict, kube_version: str = KUBE_VERSION) -> list[str]:
    """Schema errors of one manifest: built-in kinds by kubernetes-validate (strict), custom ones
    by deploy/schemas/. A kind neither knows is an error too (nothing passes unchecked)."""
    try:
        import jsonschema
        import kubernetes_validate
    except ImportError as e:
        raise RuntimeError(f"{e}; {HINT}") from None
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    custom = _crd_schemas().get((doc.get("apiVersion"), doc.get("kind")))
    if custom is not None:
        v = jsonschema.Draft202012Validator(custom)
        return [f"{name}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(map(str, e.path)) or '(root)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')} ({e.message})"]
    return []


def check(values: dict | None = None) -> list[str]:
    """Every problem of the chart with `values`: lint, then each rendered manifest's schema."""
    problems = lint(values)
    try:
        docs = render(values)
    except _helm().HelmError as e:  # a template's `fail` or `required`: its message says what to set
        return problems + [f"render: {e}"]
    for doc in docs:
        problems.extend(validate(doc))
    return problems


def load_values(path: str) -> dict:
    """A values file (`helm -f`), as a dict."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: a values file holds a YAML mapping (key: value), got {type(values).__name__}")
    return values


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, maps merged key by key (as helm merges -f files and --set)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(values: dict, item: str) -> None:
    """`a.b.c=VALUE` into values (VALUE as JSON when it parses, else a string), like helm --set."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"--set takes KEY=VALUE (e.g. picker.enabled=true), got {item!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    *parents, last = key.split(".")
    for p in parents:
        values = values.setdefault(p, {})
    values[last] = value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                    help="a values file, as helm's -f (repeatable, later ones win)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a chart value (repeatable, over the files); without any --set or -f, every value set "
                         "of VALUE_SETS is checked")
    ap.add_argument("--print", action="store_true", help="print the rendered manifests (YAML) instead")
    args = ap.parse_args(argv)
    sets = VALUE_SETS
    if args.set or args.values:
        values: dict = {}
        for path in args.values:
            try:
                values = merge(values, load_values(path))
            except OSError as e:
                raise SystemExit(f"deploy/check.py: cannot read values file {path}: {e.strerror}") from None
        over: dict = {}
        for item in args.set:
            _set(over, item)
        sets = {" ".join([*args.values, *(f"--set {i}" for i in args.set)]): merge(values, over)}
    try:
        if args.print:
            import yaml

            for name, values in sets.items():
                print(yaml.safe_dump_all(render(values), sort_keys=False))
            return 0
        bad = 0
        for name, values in sets.items():
            problems = check(values)
            print(f"{name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
            for p in problems:
                print(f"  {p}")
            bad += bool(problems)
        return 1 if bad else 0
    except RuntimeError as e:
        print(f"deploy/check.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
