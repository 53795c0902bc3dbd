"""`GET /admin/index?replica=ID`: what the prefix index believes one replica caches.

    {"replica", "events_in_sync", "exact", "last_seq", "num_blocks", "block_hashes": ["%016x", ...]}

`last_seq` is the replica's last KV-event batch applied (None: unknown, e.g. before the first
snapshot). Compared with the replica's `GET /kv_cache_state` at the same seq, `block_hashes`
must be equal when `exact` is true: that is how the fault tests check that the index recovered.
"""

from __future__ import annotations

from aiohttp import web

from protocol.openai_api import APIError


def index_state(b, replica_id: str) -> dict:
    sub = b.subscribers.get(replica_id)
    hashes = b.index.replica_block_hashes(replica_id) if b.index is not None else set()
    return {
        "replica": replica_id,
        "events_in_sync": None if sub is None else sub.in_sync,
        "exact": None if sub is None else sub.exact,
        "last_seq": None if sub is None else sub.last_seq,
        "num_blocks": len(hashes),
        "block_hashes": sorted(f"{h:016x}" for h in hashes),
    }


def add_routes(app: web.Application, b) -> None:
    async def index(request: web.Request) -> web.Response:
        rid = request.query.get("replica")
        if rid is None or b.registry.get(rid) is None:
            known = [r.replica_id for r in b.registry]
            raise APIError(404, f"unknown replica {rid!r}; known replicas: {known}", "replica")
        return web.json_response(index_state(b, rid))

    app.router.add_get("/admin/index", index)
