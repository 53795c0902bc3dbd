"""What the proxy and failover share about one attempt on one replica: how it failed, how a
write to the client fails, and which response headers go on to the client."""

from __future__ import annotations

from balancer.exchange import Exchange
from balancer.registry import ReplicaState
from balancer.upstream import UpstreamError, UpstreamResponse

REPLICA_HEADER = "X-Kvfleet-Replica"
_RELAY_HEADERS = (("content-type", "Content-Type"), ("cache-control", "Cache-Control"))


class UpstreamFailed(Exception):
    """An attempt on `replica` failed before the client got anything from it: retry elsewhere.
    `refused`: the connection was refused (the breaker opens at once); `status`/`body`: a 5xx
    answer, relayed if no other replica does better."""

    def __init__(self, replica: ReplicaState, reason: str, refused: bool = False, status: int | None = None,
                 body: bytes | None = None) -> None:
        super().__init__(reason)
        self.replica = replica
        self.reason = reason
        self.refused = refused
        self.status = status
        self.body = body


class CannotHold(UpstreamFailed):
    """The replica answered that its whole KV cache cannot hold the request (a 400 with code
    `kv_cache_capacity_exceeded`): healthy, just too small for this one; a replica with more KV
    memory may serve it. Never counted against the replica (breaker) nor as an attempt."""


class ClientGone(Exception):
    """Writing to the client failed: it went away. Not the replica's fault: no retry, no
    failover, no breaker penalty; the handler just stops."""


async def write(out: Exchange, data: bytes | None = None) -> None:
    """Write to the client (`None`: end the response), telling a client that left (`ClientGone`)
    apart from a replica that failed (aiohttp raises ClientConnectionResetError, a ClientError,
    for both)."""
    try:
        await (out.write(data) if data is not None else out.end())
    except ConnectionResetError:
        raise ClientGone() from None


async def read_safely(resp: UpstreamResponse) -> bytes | None:
    try:
        return await resp.read()
    except UpstreamError:
        return None


def relayed_headers(upstream: UpstreamResponse, replica_id: str, request_id: str) -> dict[str, str]:
    """The replica's response headers that go on to the client (Content-Type, Cache-Control),
    with the serving replica and the request id."""
    h = upstream.headers
    out = {name: h[key] for key, name in _RELAY_HEADERS if key in h}
    out[REPLICA_HEADER] = replica_id
    out["X-Request-Id"] = request_id
    return out
