"""Operational routes: /health, /metrics, /v1/models and the admin API, as `Exchange` handlers.

    GET    /admin/replicas              every replica: health, breaker, load, cached blocks, in-flight
    POST   /admin/replicas              {"url", "events"?, "replay"?, "topic"?} add one
    POST   /admin/replicas/drain        {"replica": id} stop sending it new requests
    POST   /admin/replicas/undrain      {"replica": id}
    DELETE /admin/replicas?replica=ID[&timeout=S]   drain, wait for its in-flight requests, remove
    GET    /admin/decisions?limit=N     the latest routed requests: chosen replica, predicted, best
                                        offered and delivered cached tokens, mismatch, scores
    POST   /admin/explain               a completions or chat body: the decision and every
                                        replica's score breakdown, without sending anything
                                        (a session key in its header or `user`: the session's outcome;
                                        on a prefill/decode fleet: the pair, `pair`)
    GET    /admin/sessions?limit=N      sticky sessions (balancer/sessions.py), most recently used first
    GET    /admin/sessions?key=K        one session: its home replica
    DELETE /admin/sessions?key=K        release it: its next request is a new session
"""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from balancer.config import ReplicaSpec
from balancer import handover
from balancer.exchange import Exchange, Handler, reply_json
from balancer.proxy import read_json
from balancer.disagg import PairDecision
from protocol.curve import is_z85_key
from protocol.openai_api import APIError, parse_for_routing


def _replica_json(b, r) -> dict:
    sub = b.subscribers.get(r.replica_id)
    return {
        "id": r.replica_id,
        "url": r.url,
        "events": r.spec.events,
        "replay": r.spec.replay,
        "role": r.role,
        "healthy": r.healthy,
        "draining": r.draining,
        "breaker": r.breaker.name.lower(),
        "inflight_requests": r.inflight_requests,
        "requests_total": r.requests_total,
        "cached_blocks": b.index.num_blocks(r.replica_id) if b.index else 0,
        "load": {k: v for k, v in r.load._asdict().items() if k != "age_s"},
        "load_age_s": None if r.load_at == float("-inf") else round(b.clock() - r.load_at, 3),
        "events_in_sync": None if sub is None else sub.in_sync,
        "digest": _digest_json(b, r.replica_id),
        "models": sorted(r.models),
        "lora_adapters": sorted(r.adapters),  # of models, the LoRA adapters
        "loras_resident": sorted(r.loras),  # adapters it reports loaded now
    }


def _digest_json(b, replica_id: str) -> dict | None:
    """The replica's cache digest as routing sees it (None: the balancer follows no digests of it)."""
    if replica_id not in b.digest_feeds:
        return None
    latest, age = b.digests.latest(replica_id), b.digests.age_s(replica_id)
    return {"in_use": b.digest_in_use(replica_id),
            "age_s": None if age is None else round(age, 3),
            "blocks": None if latest is None else latest.num_blocks,
            "filter": None if latest is None else latest.filter.kind_on_wire,
            "bytes": b.digests.wire_bytes(replica_id)}


def _limit(ex: Exchange, default: int, what: str) -> int:
    """The `?limit=N` of a listing endpoint: a whole number >= 1 (`default` when absent)."""
    raw = ex.query.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        raise APIError(400, f"limit must be a whole number of {what}, got {raw!r}", "limit") from None
    if limit < 1:
        raise APIError(400, "limit must be at least 1", "limit")
    return limit


def routes(b) -> dict[str, dict[str, Handler]]:
    """path -> method -> handler, for balancer `b` (a `balancer.app.Balancer`)."""

    async def health(ex: Exchange) -> None:
        usable = len(b.registry.usable()) if b.proxy else 0
        status = 200 if usable else 503
        reply_json(ex, {"status": "ok" if usable else "no usable replica", "usable_replicas": usable,
                        "replicas": len(b.registry)}, status)

    async def metrics(ex: Exchange) -> None:
        ex.reply(200, generate_latest(b.metrics.registry), {"Content-Type": CONTENT_TYPE_LATEST})

    async def models(ex: Exchange) -> None:
        # The union over the healthy replicas (several models may share one fleet), in the
        # shape of vLLM's answer; `root` as vLLM sets it for a base model, `parent` = the base
        # model of a LoRA adapter (None for a base model).
        parent = b.registry.adapter_parent
        reply_json(ex, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "kvfleet", "root": m, "parent": parent(m)}
            for m in b.served_models()]})

    async def list_replicas(ex: Exchange) -> None:
        reply_json(ex, {"policy": b.policy.describe(), "model": b.model, "models": b.served_models(),
                        "replicas": [_replica_json(b, r) for r in b.registry]})

    async def add_replica(ex: Exchange) -> None:
        body = await read_json(ex)
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise APIError(400, 'send {"url": "http://host:port", "events": "tcp://host:5557"?, "replay": ...?}', "url")
        key = body.get("curve_server_key")
        if key is not None and not (isinstance(key, str) and is_z85_key(key)):  # no file paths over HTTP
            raise APIError(400, "curve_server_key must be a 40-character Z85 public key", "curve_server_key")
        try:
            spec = ReplicaSpec(url=body["url"], events=body.get("events"), replay=body.get("replay"),
                               topic=body.get("topic") or "", curve_server_key=body.get("curve_server_key"),
                               role=body.get("role"))
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), "url") from None
        if b.registry.get(spec.replica_id) is not None:
            raise APIError(400, f"replica {spec.replica_id} is already registered", "url")
        b.add_replica(spec)
        reply_json(ex, _replica_json(b, b.registry.get(spec.replica_id)), 201)

    def _target(body_or_query) -> str:
        rid = body_or_query.get("replica") if hasattr(body_or_query, "get") else None
        if not isinstance(rid, str) or b.registry.get(rid) is None:
            known = [r.replica_id for r in b.registry]
            raise APIError(404, f"unknown replica {rid!r}; known replicas: {known}", "replica")
        return rid

    async def drain(ex: Exchange) -> None:
        rid = _target(await read_json(ex))
        r = b.registry.drain(rid)
        reply_json(ex, _replica_json(b, r))

    async def undrain(ex: Exchange) -> None:
        rid = _target(await read_json(ex))
        reply_json(ex, _replica_json(b, b.registry.undrain(rid)))

    async def remove(ex: Exchange) -> None:
        rid = _target(ex.query)
        try:
            timeout = float(ex.query.get("timeout", "60"))
        except ValueError:
            raise APIError(400, "timeout must be a number of seconds", "timeout") from None
        r = b.registry.drain(rid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while r.inflight_requests > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = r.inflight_requests
        b.remove_replica(rid)
        reply_json(ex, {"removed": rid, "inflight_at_removal": left})

    async def decisions(ex: Exchange) -> None:
        limit = _limit(ex, 20, "decisions")
        reply_json(ex, {"kept": len(b.audit.recent), "keep": b.cfg.audit.keep,
                        "mismatch_rule": {"min_tokens": b.cfg.audit.mismatch_min_tokens,
                                          "ratio": b.cfg.audit.mismatch_ratio},
                        "decisions": b.audit.latest(limit)})

    def _session_json(key: str, home, now: float) -> dict:
        return {"key": key, "replica": home.replica_id, "home_for_s": round(now - home.since, 3),
                "idle_s": round(now - home.used_at, 3),
                "expires_in_s": round(home.used_at + b.cfg.sessions.ttl_s - now, 3), "routed": home.routed}

    def _session_key(ex: Exchange) -> str:
        key = ex.query.get("key")
        if not key:
            raise APIError(400, "give the session as ?key=KEY (GET /admin/sessions lists them)", "key")
        return key

    async def list_sessions(ex: Exchange) -> None:
        now = b.clock()
        if "key" in ex.query:
            key = _session_key(ex)
            home = b.sessions.get(key, now)
            if home is None:
                raise APIError(404, f"no session {key!r} is remembered (never seen, expired or released); "
                                    "GET /admin/sessions lists them", "key")
            return reply_json(ex, _session_json(key, home, now))
        limit = _limit(ex, 100, "sessions")
        cfg = b.cfg.sessions
        reply_json(ex, {"enabled": cfg.enabled, "header": cfg.header, "ttl_s": cfg.ttl_s,
                        "active": b.sessions.active(now), "routed": dict(b.sessions.routed),
                        "ended": dict(b.sessions.ended),
                        "sessions": [_session_json(k, h, now) for k, h in b.sessions.homes(now, limit)]})

    async def release_session(ex: Exchange) -> None:
        key = _session_key(ex)
        home = b.sessions.release(key)
        if home is None:
            raise APIError(404, f"no session {key!r} is remembered (never seen, expired or released already); "
                                "GET /admin/sessions lists them", "key")
        reply_json(ex, {"released": key, "replica": home.replica_id})

    async def explain(ex: Exchange) -> None:
        body = await read_json(ex)
        chat = isinstance(body, dict) and "messages" in body
        req = parse_for_routing(body, "chat" if chat else "completion")
        b.proxy.check_model(req)
        prepared = b.router.prepare(req, b.sessions.key_of(ex.header, req))
        split = handover.wanted("/v1/chat/completions" if chat else "/v1/completions", body, prepared)
        rr, candidates, d = b.router.choose(prepared, "explain", split=split)
        out = {
            "prompt_tokens": len(prepared.token_ids),
            "full_blocks": len(prepared.block_hashes),
            "block_size": b.cfg.block_size,
            "usable": [r.replica_id for r in candidates],
            "policy": b.policy.describe(),
            "consistent_routing": b.cfg.consistent_routing,  # decided from shared state only
            "session": prepared.session,
        }
        if d is None:
            out.update(matched_blocks={}, offloaded_blocks={}, predicted_output_tokens=None, decision=None,
                       reason="no usable replica")
            return reply_json(ex, out)
        out.update(matched_blocks=dict(rr.matched_blocks),
                   # per replica, blocks after its device prefix held in a lower KV tier (host, disk)
                   offloaded_blocks=dict(rr.offloaded_blocks),
                   # null unless the policy reads predicted output lengths (e.g. `predictive`)
                   predicted_output_tokens=rr.predicted_output_tokens,
                   decision=d.replica_id, reason=d.reason, scores={k: dict(v) for k, v in d.scores.items()},
                   session_outcome=getattr(d.decode_side if isinstance(d, PairDecision) else d, "outcome", None))
        if isinstance(d, PairDecision):  # `decision` and `scores` are its decode side's
            out["pair"] = {"prefill": d.prefill, "decode": d.decode, "unified": d.unified,
                           "prefill_scores": {k: dict(v) for k, v in d.prefill_scores.items()}}
        reply_json(ex, out)

    return {
        "/health": {"GET": health},
        "/metrics": {"GET": metrics},
        "/v1/models": {"GET": models},
        "/admin/replicas": {"GET": list_replicas, "POST": add_replica, "DELETE": remove},
        "/admin/replicas/drain": {"POST": drain},
        "/admin/replicas/undrain": {"POST": undrain},
        "/admin/explain": {"POST": explain},
        "/admin/decisions": {"GET": decisions},
        "/admin/sessions": {"GET": list_sessions, "DELETE": release_session},
    }
