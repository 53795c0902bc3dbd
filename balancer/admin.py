"""Operational routes: /health, /metrics, /v1/models and the admin API.

    GET    /admin/replicas              every replica: health, breaker, load, cached blocks, in-flight
    POST   /admin/replicas              {"url", "events"?, "replay"?, "topic"?} add one
    POST   /admin/replicas/drain        {"replica": id} stop sending it new requests
    POST   /admin/replicas/undrain      {"replica": id}
    DELETE /admin/replicas?replica=ID[&timeout=S]   drain, wait for its in-flight requests, remove
    POST   /admin/explain               a completions or chat body: the decision and every
                                        replica's score breakdown, without sending anything
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from balancer.config import ReplicaSpec
from balancer.proxy import read_json
from protocol.curve import is_z85_key
from protocol.openai_api import APIError, parse_chat, parse_completion


def _replica_json(b, r) -> dict:
    sub = b.subscribers.get(r.replica_id)
    return {
        "id": r.replica_id,
        "url": r.url,
        "events": r.spec.events,
        "replay": r.spec.replay,
        "healthy": r.healthy,
        "draining": r.draining,
        "breaker": r.breaker.name.lower(),
        "inflight_requests": r.inflight_requests,
        "requests_total": r.requests_total,
        "cached_blocks": b.index.num_blocks(r.replica_id) if b.index else 0,
        "load": {k: v for k, v in r.load._asdict().items() if k != "age_s"},
        "load_age_s": None if r.load_at == float("-inf") else round(b.clock() - r.load_at, 3),
        "events_in_sync": None if sub is None else sub.in_sync,
    }


def add_routes(app: web.Application, b) -> None:
    async def health(request: web.Request) -> web.Response:
        usable = len(b.registry.usable()) if b.proxy else 0
        status = 200 if usable else 503
        return web.json_response({"status": "ok" if usable else "no usable replica", "usable_replicas": usable,
                                  "replicas": len(b.registry)}, status=status)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(b.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": b.model, "object": "model", "created": 0, "owned_by": "kvfleet", "root": b.model}]})

    async def list_replicas(request: web.Request) -> web.Response:
        return web.json_response({"policy": b.policy.describe(), "model": b.model,
                                  "replicas": [_replica_json(b, r) for r in b.registry]})

    async def add_replica(request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise APIError(400, 'send {"url": "http://host:port", "events": "tcp://host:5557"?, "replay": ...?}', "url")
        key = body.get("curve_server_key")
        if key is not None and not (isinstance(key, str) and is_z85_key(key)):  # no file paths over HTTP
            raise APIError(400, "curve_server_key must be a 40-character Z85 public key", "curve_server_key")
        try:
            spec = ReplicaSpec(url=body["url"], events=body.get("events"), replay=body.get("replay"),
                               topic=body.get("topic") or "", curve_server_key=body.get("curve_server_key"))
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), "url") from None
        if b.registry.get(spec.replica_id) is not None:
            raise APIError(400, f"replica {spec.replica_id} is already registered", "url")
        b.add_replica(spec)
        return web.json_response(_replica_json(b, b.registry.get(spec.replica_id)), status=201)

    def _target(body_or_query) -> str:
        rid = body_or_query.get("replica") if hasattr(body_or_query, "get") else None
        if not isinstance(rid, str) or b.registry.get(rid) is None:
            known = [r.replica_id for r in b.registry]
            raise APIError(404, f"unknown replica {rid!r}; known replicas: {known}", "replica")
        return rid

    async def drain(request: web.Request) -> web.Response:
        rid = _target(await read_json(request))
        r = b.registry.drain(rid)
        return web.json_response(_replica_json(b, r))

    async def undrain(request: web.Request) -> web.Response:
        rid = _target(await read_json(request))
        r = b.registry.get(rid)
        r.draining = False
        return web.json_response(_replica_json(b, r))

    async def remove(request: web.Request) -> web.Response:
        rid = _target(request.query)
        try:
            timeout = float(request.query.get("timeout", "60"))
        except ValueError:
            raise APIError(400, "timeout must be a number of seconds", "timeout") from None
        r = b.registry.drain(rid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while r.inflight_requests > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = r.inflight_requests
        b.remove_replica(rid)
        return web.json_response({"removed": rid, "inflight_at_removal": left})

    async def explain(request: web.Request) -> web.Response:
        body = await read_json(request)
        req = parse_chat(body) if isinstance(body, dict) and "messages" in body else parse_completion(body)
        b.proxy.check_model(req)
        prepared = b.router.prepare(req)
        rr, candidates, d = b.router.choose(prepared, "explain")
        out = {
            "prompt_tokens": len(prepared.token_ids),
            "full_blocks": len(prepared.block_hashes),
            "block_size": b.cfg.block_size,
            "usable": [r.replica_id for r in candidates],
            "policy": b.policy.describe(),
        }
        if d is None:
            out.update(matched_blocks={}, predicted_output_tokens=None, decision=None, reason="no usable replica")
            return web.json_response(out)
        out.update(matched_blocks=dict(rr.matched_blocks),
                   # null unless the policy reads predicted output lengths (e.g. `predictive`)
                   predicted_output_tokens=rr.predicted_output_tokens,
                   decision=d.replica_id, reason=d.reason, scores={k: dict(v) for k, v in d.scores.items()})
        return web.json_response(out)

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/admin/replicas", list_replicas)
    app.router.add_post("/admin/replicas", add_replica)
    app.router.add_post("/admin/replicas/drain", drain)
    app.router.add_post("/admin/replicas/undrain", undrain)
    app.router.add_delete("/admin/replicas", remove)
    app.router.add_post("/admin/explain", explain)
