"""Fuzz the balancer from the OpenAPI document it serves (GET /openapi.json).

Requests are generated with hypothesis straight from the document's JSON schemas: valid bodies,
valid bodies with one field replaced by an arbitrary JSON value, bodies missing a required
field, and arbitrary JSON. Whatever is sent, the balancer (a real subprocess, in front of a
simulated replica) answers below 500, an error body has the documented shape, and the process
survives. Also: the document lists exactly the routes the app serves.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.app import ROUTES, create_app
from balancer.config import BalancerConfig, ReplicaSpec
from balancer.openapi import document
from harness import procs

SIM = ["replica", "--port", "0", "--engine", "sim", "--preset", "llama3-8b-h100", "--time-scale", "50",
       "--model", "tiny", "--num-blocks", "1024", "--max-model-len", "2048",
       "--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
# addReplica is left out: a generated valid body would make the balancer dial made-up hosts.
SKIP = {"addReplica"}
EXAMPLES = {"createCompletion": 250, "createChatCompletion": 250, "explain": 80}
DEFAULT_EXAMPLES = 25


# ---------------------------------------------------------------------------------- schema -> strategy

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def from_schema(schema: dict, doc: dict) -> st.SearchStrategy:
    """Values valid for the subset of JSON Schema that balancer/openapi.py uses."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(doc["components"]["schemas"][name], doc))
    if "oneOf" in schema:
        return st.one_of([from_schema(s, doc) for s in schema["oneOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    types = schema.get("type", "object")
    if isinstance(types, list):
        return st.one_of([from_schema({**schema, "type": t}, doc) for t in types])
    if types == "null":
        return st.none()
    if types == "boolean":
        return st.booleans()
    if types == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if types == "number":
        lo = schema.get("exclusiveMinimum", schema.get("minimum"))
        return st.floats(lo, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema, allow_nan=False)
    if types == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if types == "array":
        return st.lists(from_schema(schema.get("items", {}), doc), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 6), 6))
    props = schema.get("properties", {})
    required = schema.get("required", [])
    optional = [k for k in props if k not in required]
    return st.fixed_dictionaries({k: from_schema(props[k], doc) for k in required},
                                 optional={k: from_schema(props[k], doc) for k in optional})


def bodies(schema: dict, doc: dict) -> st.SearchStrategy:
    """Valid, nearly valid and arbitrary request bodies for `schema`."""
    valid = from_schema(schema, doc)
    target = schema
    if "$ref" in target:
        target = doc["components"]["schemas"][target["$ref"].rsplit("/", 1)[1]]
    names = sorted(target.get("properties", {}))
    required = target.get("required", [])
    strategies = [valid, JSON_VALUES]
    if names:
        strategies.append(st.tuples(valid, st.sampled_from(names), JSON_VALUES).map(
            lambda t: {**t[0], t[1]: t[2]} if isinstance(t[0], dict) else t[0]))
    if required:
        strategies.append(st.tuples(valid, st.sampled_from(required)).map(
            lambda t: {k: v for k, v in t[0].items() if k != t[1]} if isinstance(t[0], dict) else t[0]))
    return st.one_of(strategies)


def operations(doc: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()
            if op["operationId"] not in SKIP]


# ---------------------------------------------------------------------------------- the target


@pytest.fixture(scope="module")
def fleet():
    rep = procs.start(SIM)
    try:
        bal = procs.start(["balancer", "--port", "0", "--model", "tiny", "--replica", rep.replica_arg,
                           "--max-tokens-cap", "8"])
    except Exception:
        rep.stop()
        raise
    yield bal
    bal.stop()
    rep.stop()


def send(base: str, method: str, path: str, query: dict | None, body: object) -> tuple[int, bytes, str]:
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = None if body is _NO_BODY else json.dumps(body, allow_nan=True).encode()
    req = urllib.request.Request(url, data=data, method=method.upper(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


_NO_BODY = object()


def test_served_document_is_the_module_document_and_lists_every_route(fleet):
    with urllib.request.urlopen(fleet.url + "/openapi.json", timeout=10) as r:
        served = json.loads(r.read())
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"].startswith("3.")
    app = create_app(BalancerConfig(replicas=(ReplicaSpec("http://127.0.0.1:9"),), model="tiny"))
    routes = {(path, method.lower()) for method, path, _ in app[ROUTES]}
    documented = {(path, method) for path, item in served["paths"].items() for method in item}
    assert routes == documented


@pytest.mark.parametrize("op_id", [op["operationId"] for _, _, op in operations(document())])
def test_fuzz_operation_never_5xx(fleet, op_id):
    with urllib.request.urlopen(fleet.url + "/openapi.json", timeout=10) as r:
        doc = json.loads(r.read())
    path, method, op = next(o for o in operations(doc) if o[2]["operationId"] == op_id)
    query_params = [p for p in op.get("parameters", []) if p["in"] == "query"]
    query = st.fixed_dictionaries({p["name"]: st.one_of(from_schema(p["schema"], doc).map(str), st.text(max_size=10))
                                   for p in query_params if p.get("required")},
                                  optional={p["name"]: st.one_of(from_schema(p["schema"], doc).map(str),
                                                                 st.text(max_size=10))
                                            for p in query_params if not p.get("required")})
    if "requestBody" in op:
        body = bodies(op["requestBody"]["content"]["application/json"]["schema"], doc)
    else:
        body = st.just(_NO_BODY)
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES.get(op_id, DEFAULT_EXAMPLES), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(query=query, body=body)
    def run(query, body):
        status, raw, ctype = send(fleet.url, method, path, query, body)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (method, path, query, body, status, raw[:300])
        assert str(status) in op["responses"] or status in (405,), (op_id, status, raw[:200])
        if status >= 400 and ctype.startswith("application/json"):
            err = json.loads(raw)["error"]
            assert isinstance(err["message"], str) and err["code"] == status

    run()
    assert fleet.popen.poll() is None
    if op_id in EXAMPLES:  # the generator reaches both sides of the validation
        assert any(200 <= s < 300 for s in seen) and any(400 <= s < 500 for s in seen), seen
    with urllib.request.urlopen(fleet.url + "/health", timeout=10) as r:
        assert r.status == 200


def test_strategies_cover_the_schema_bounds():
    doc = document()
    schema = doc["components"]["schemas"]["CompletionRequest"]

    @settings(max_examples=50, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(from_schema(schema, doc))
    def run(body):
        assert "prompt" in body
        t = body.get("temperature")
        assert t is None or (0 <= t <= 2 and not math.isnan(t))

    run()
