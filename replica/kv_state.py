"""Inspection routes for the replica's prefix cache, and a fault-injection hook for tests.

    GET  /kv_cache_state                  the hashes of every cached block, with the KV-event seq
                                          they correspond to (compare with the balancer's
                                          `GET /admin/index?replica=ID`), and of every block in
                                          an offload tier, by medium
    POST /_test/mute_kv_events?seconds=S  only with KVFLEET_TEST_HOOKS=1 in the environment: the
                                          publisher sends nothing on PUB for S seconds (KV batches
                                          are still numbered and kept for replay), which is what a
                                          cut link or an overflowing subscriber queue looks like

`kv_seq` is the seq of the last KV batch that the engine handed to the publisher before the
hashes were read (-1: none yet), read between two engine steps, so an index that has applied
exactly the batches up to `kv_seq` holds exactly `block_hashes`. `pending_events` > 0 means
events were emitted (e.g. by an abort between steps) but not yet published: the state is then
ahead of `kv_seq` and not comparable.

Hashes are 16 hex digits (uint64), the same values a kvfleet replica publishes and the
balancer's index keys on (design §3).
"""

from __future__ import annotations

import math
import os
import time

from aiohttp import web

from protocol.openai_api import APIError
from replica.service import EngineService

TEST_HOOKS_ENV = "KVFLEET_TEST_HOOKS"


def cache_state(service: EngineService) -> dict:
    """The cached block hashes and the seq they match. Call between steps (see `between_steps`)."""
    pool = service.engine.kv.pool
    pub = service.publisher
    tiers = service.engine.kv.offload.tiers if service.engine.kv.offload is not None else ()
    return {
        "kv_seq": (pub.kv_batches_queued - 1) if pub is not None else None,
        "pending_events": len(pool._events),
        "block_size": pool.block_size,
        "total_blocks": pool.num_blocks,
        "num_cached_blocks": len(pool.cached_blocks()),
        "block_hashes": sorted(f"{h:016x}" for h in pool.cached_blocks()),
        # The offload tiers' blocks by medium ("CPU", "STORAGE"; replica/kv_offload.py), at the same seq.
        "tier_block_hashes": {t.medium: sorted(f"{b.block_hash:016x}" for b in t.held()) for t in tiers},
    }


def add_routes(app: web.Application, service: EngineService) -> None:
    async def kv_cache_state(request: web.Request) -> web.Response:
        if not service.healthy:
            raise APIError(503, "the engine is not running; check the replica's log")
        return web.json_response(await service.between_steps(lambda: cache_state(service)))

    async def mute_kv_events(request: web.Request) -> web.Response:
        if service.publisher is None:
            raise APIError(400, "this replica publishes no KV events")
        try:
            seconds = float(request.query.get("seconds", "1"))
        except ValueError:
            raise APIError(400, "seconds must be a number", "seconds") from None
        if not math.isfinite(seconds) or not 0 <= seconds <= 600:
            raise APIError(400, "seconds must be in [0, 600]", "seconds")
        service.publisher.mute_until = time.monotonic() + seconds
        return web.json_response({"muted_s": seconds})

    app.router.add_get("/kv_cache_state", kv_cache_state)
    if os.environ.get(TEST_HOOKS_ENV) == "1":
        app.router.add_post("/_test/mute_kv_events", mute_kv_events)
