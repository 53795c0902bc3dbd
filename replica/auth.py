"""Optional API keys on the replica (`kvfleet replica --api-key KEY`, repeatable).

With keys set, every route needs `Authorization: Bearer KEY` except the ones that probes and
scrapers call without credentials: /health, /metrics, /version, /load and /kv_event_sources
(vLLM's `--api-key` likewise leaves /health and /metrics open). Give the balancer the same key
(`kvfleet balancer --replica-api-key KEY`) and the replica serves only the balancer.
"""

from __future__ import annotations

from aiohttp import web

from protocol.auth import KeySet, bearer_token, unauthorized

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/load", "/kv_event_sources"})


def middlewares(api_keys: tuple[str, ...]) -> list:
    """The middleware list for `web.Application`: empty when no key is configured."""
    if not api_keys:
        return []
    keys = KeySet(api_keys)

    @web.middleware
    async def require_key(request: web.Request, handler):
        if request.path in OPEN_PATHS or keys.accepts(bearer_token(request)):
            return await handler(request)
        return unauthorized()

    return [require_key]
