"""Prefill/decode disaggregation at the balancer: the two legs of one request through a pair.

The wire shape is vLLM's disaggregated-serving proxy (vLLM's
`tests/v1/kv_connector/nixl_integration/toy_proxy_server.py`, with NixlConnector's
`kv_transfer_params`), so kvfleet fronts vLLM P/D replicas and kvfleet replicas alike:

    prefill leg: the client's body with max_tokens = 1 (max_completion_tokens too), stream = false,
                 no stream_options, no min_tokens, and kv_transfer_params = {do_remote_decode: true,
                 do_remote_prefill: false, remote_engine_id/block_ids/host/port: null}
                 ─▶ the prefill replica's JSON answer carries kv_transfer_params (where its KV waits)
    decode leg:  the client's body as it came, plus those kv_transfer_params ─▶ relayed to the
                 client as any answer (a stream as a stream, mid-stream failover included)

`Proxy._disaggregated` runs the legs (balancer/proxy.py). A pair member that fails before the
client got anything (refused, reset, 5xx; a prefill answer without kv_transfer_params or with a
4xx) sends the request down the ordinary single-replica path, the failed member excluded, so no
request is lost; `kvfleet_disagg_requests_total{outcome}` counts each way. The pair is the
routing transaction's pair stage (`Router.route(..., split=True)`, balancer/disagg.py's selector,
as in the simulator); the replicas' roles come from their load reports (`kvfleet replica --role`,
`ReplicaState.role`).
"""

from __future__ import annotations

import json

from balancer.router import Prepared

# The routes whose requests go through a pair (vLLM's proxy serves these two).
PATHS = ("/v1/completions", "/v1/chat/completions")


def wanted(path: str, body: dict, prepared: Prepared) -> bool:
    """Whether this request is one for a prefill/decode pair: a completions or chat request of
    one sequence (n = 1, one prompt), at least one full KV block to hand over, and no
    kv_transfer_params of the client's own (a client driving P/D itself is passed on). A LoRA
    adapter's request pairs too: the router's candidate stage narrows both sides to the adapter's
    holders, and the blocks travel under the adapter's chain hashes."""
    req = prepared.request
    return (path in PATHS and req.n == 1 and not req.more_prompts and len(prepared.block_hashes) > 0
            and body.get("kv_transfer_params") is None)


def prefill_payload(body: dict) -> bytes:
    """The prefill leg's body (vLLM's proxy's `send_request_to_service`)."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "min_completion_tokens")}
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                 "remote_block_ids": None, "remote_host": None, "remote_port": None}
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return json.dumps(out).encode()


def decode_payload(body: dict, params: dict, token_ids: bool) -> bytes:
    """The decode leg's body: the client's request with the prefill's kv_transfer_params (and
    `return_token_ids` when the proxy needs the ids for an exact mid-stream failover)."""
    out = {**body, "kv_transfer_params": params}
    if token_ids:
        out["return_token_ids"] = True
    return json.dumps(out).encode()


def params_of(raw: bytes) -> dict | None:
    """The kv_transfer_params of a prefill replica's answer (None: it gave none, so it cannot
    hand over: a replica without a KV connector, or one whose role has no prefill side)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    params = body.get("kv_transfer_params") if isinstance(body, dict) else None
    return params if isinstance(params, dict) and params.get("do_remote_prefill") else None
