"""`GET /admin/index?replica=ID`: what the prefix index believes one replica caches.

    {"replica", "events_in_sync", "exact", "last_seq", "num_blocks", "block_hashes": ["%016x", ...]}

`last_seq` is the replica's last KV-event batch applied (None: unknown, e.g. before the first
snapshot). Compared with the replica's `GET /kv_cache_state` at the same seq, `block_hashes`
must be equal when `exact` is true: that is how the fault tests check that the index recovered.
"""

from __future__ import annotations

from balancer.exchange import Exchange, Handler, reply_json
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


def routes(b) -> dict[str, dict[str, Handler]]:
    async def index(ex: Exchange) -> None:
        rid = ex.query.get("replica")
        if rid is None or b.registry.get(rid) is None:
            known = [r.replica_id for r in b.registry]
            raise APIError(404, f"unknown replica {rid!r}; known replicas: {known}", "replica")
        reply_json(ex, index_state(b, rid))

    return {"/admin/index": {"GET": index}}
