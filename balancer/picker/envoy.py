"""An Envoy bootstrap that puts a picker in front of a fleet: what the tests run, and what
`kvfleet picker --print-envoy-config` prints for a user to start from.

    client ─▶ listener ─▶ header_mutation (drops a client's own x-gateway-destination-endpoint)
                       ─▶ ext_proc (the picker) ─▶ router
    route 1: the header is present (the picker set it) ─▶ cluster `picked`: ORIGINAL_DST, the
             address taken from the header (`original_dst_lb_config.use_http_header`); or, with
             lb="override_host", Envoy's override_host policy over the replicas, which takes the
             picker's list (`--fallback-endpoints`) and retries down it on a refused connection
    route 2: no header (the picker is down and `failure_mode_allow` let the request through):
             fail-open ─▶ cluster `fallback`, round robin over the replicas;
             fail-closed ─▶ 503 (and ext_proc's own `status_on_error` is 503 too)

The picker's answer sets `clear_route_cache`, so Envoy picks the route again after the header
is set. Failing closed, the processing mode is the one llm-d's and the Inference Extension's
manifests use (headers SEND, bodies FULL_DUPLEX_STREAMED, trailers SEND). Failing open, the
request body is BUFFERED and the response body STREAMED: Envoy keeps its copy of the bodies, so
it can go on without the picker at any point (in full-duplex mode it can do so only until the
first body chunk has reached the picker: envoyproxy/envoy#41276); and `allow_mode_override`
lets the picker skip the body of a response whose headers carry its usage (kvfleet replicas').
`served_by_header` adds Envoy's own record of the upstream address to each response
(`%UPSTREAM_REMOTE_ADDRESS%`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from balancer.picker.config import DESTINATION_HEADER, ENVOY_FLAGS_HEADER, SERVED_HEADER

_T = "type.googleapis.com/envoy."


def _http2_to_picker(keepalive_s: float) -> dict:
    """HTTP/2 to the picker, with PINGs: a picker that is stopped but whose socket is open (hung,
    SIGSTOP, a lost peer) fails its streams within ~2 × keepalive_s. Needed in full-duplex mode,
    where Envoy enforces no message_timeout; without it such a request waits for the route timeout."""
    ping = {"interval": f"{keepalive_s}s", "timeout": f"{keepalive_s}s"}
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {"connection_keepalive": ping}}}}


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _policy(name: str, config: dict) -> dict:
    """A cluster `load_balancing_policy` of one typed extension, e.g. ("round_robin", {})."""
    camel = "".join(w.capitalize() for w in name.split("_"))
    return {"policies": [{"typed_extension_config": {
        "name": f"envoy.load_balancing_policies.{name}",
        "typed_config": {"@type": _T + f"extensions.load_balancing_policies.{name}.v3.{camel}", **config}}}]}


def _static_cluster(name: str, endpoints: Sequence[str], connect_timeout_s: float, **extra) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": f"{connect_timeout_s}s", "lb_policy": "ROUND_ROBIN",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _address(*_split(e))}} for e in endpoints]}]}, **extra}


FULL_DUPLEX_MODE = {"request_header_mode": "SEND", "response_header_mode": "SEND",
                    "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
                    "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}
# Envoy keeps the bodies, so a picker lost at any point fails open (balancer/picker/ext_proc.py).
BUFFERED_MODE = {**FULL_DUPLEX_MODE, "request_body_mode": "BUFFERED", "response_body_mode": "STREAMED"}


def bootstrap(listen: str, picker: str | None, replicas: Sequence[str], fail_open: bool = True,
              admin: str | None = None, header: str = DESTINATION_HEADER, message_timeout_s: float = 10.0,
              route_timeout_s: float = 600.0, served_by_header: str | None = SERVED_HEADER,
              body_mode: str | None = None, max_body_bytes: int = 16 * 1024 * 1024,
              picker_keepalive_s: float = 1.0, lb: str = "original_dst") -> dict:
    """The bootstrap (as a dict; `json.dumps` it for `envoy -c`). `listen`, `picker`, `admin` and
    each of `replicas` are `host:port`; `replicas` serve the fail-open fallback. `body_mode`:
    "full_duplex" (the protocol's streaming mode) or "buffered" (request body buffered, response
    streamed chunk by chunk); default: buffered when failing open (Envoy fails open in full-duplex
    mode only until the first body chunk reached the picker), full duplex when failing closed.
    `max_body_bytes` is Envoy's buffer per connection (what a buffered request body may reach).
    `picker=None`: no picker at all, round robin over `replicas` (Envoy alone, for comparison).
    `lb`: how the `picked` cluster reads the pick. "original_dst": any `ip:port` the header names
    (one address). "override_host": Envoy's override_host policy over `replicas`, which takes the
    protocol's list `ip:port,ip:port,...` and, with the route's retry policy (a refused or reset
    connection), tries the next endpoint of the list (the picker's `fallback_endpoints`)."""
    if lb not in ("original_dst", "override_host"):
        raise ValueError(f"lb must be original_dst or override_host, got {lb!r}")
    if lb == "override_host" and not replicas:
        raise ValueError("override_host needs the replicas' host:port list (its cluster's hosts)")
    if picker is None:
        fail_open = True
    if fail_open and not replicas:
        raise ValueError("fail-open needs the replicas' host:port list for its round-robin fallback")
    body_mode = body_mode or ("buffered" if fail_open else "full_duplex")
    if body_mode not in ("buffered", "full_duplex"):
        raise ValueError(f"body_mode must be buffered or full_duplex, got {body_mode!r}")
    served = [{"header": {"key": served_by_header, "value": "%UPSTREAM_REMOTE_ADDRESS%"},
               "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}] if served_by_header else []
    # Envoy's response flags (e.g. UF: the picked replica refused the connection), for the picker
    # to read in the response phase (ext_proc.ENVOY_FLAGS_HEADER) and to drop before the client.
    flags = [{"header": {"key": ENVOY_FLAGS_HEADER, "value": "%RESPONSE_FLAGS%"},
              "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    timeout = f"{route_timeout_s}s"
    # A unary completion sends no byte until it is done: the idle timeout (HCM default 5 min) is
    # the route's whole timeout too.
    picked_route = {"cluster": "picked", "timeout": timeout, "idle_timeout": timeout}
    if lb == "override_host":  # down the picker's list when the endpoint refuses or resets the connection
        picked_route["retry_policy"] = {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2}
    routes = [{"match": {"prefix": "/", "headers": [{"name": header, "present_match": True}]},
               "route": picked_route, "response_headers_to_add": served + flags}]
    if fail_open:
        routes.append({"match": {"prefix": "/"}, "route": {"cluster": "fallback", "timeout": timeout,
                                                           "idle_timeout": timeout},
                       "response_headers_to_add": served})
    else:
        body = {"error": {"message": "the endpoint picker did not answer and this gateway fails closed; check "
                                     "`kvfleet picker` (its /health and logs)", "type": "ServiceUnavailableError",
                          "param": None, "code": 503}}
        routes.append({"match": {"prefix": "/"},
                       "direct_response": {"status": 503, "body": {"inline_string": json.dumps(body)}}})
    filters = [
        {"name": "envoy.filters.http.header_mutation", "typed_config": {
            "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": header}]}}},
        {"name": "envoy.filters.http.ext_proc", "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}},
            "failure_mode_allow": fail_open,
            "status_on_error": {"code": 503},
            "message_timeout": f"{message_timeout_s}s",
            "processing_mode": BUFFERED_MODE if body_mode == "buffered" else FULL_DUPLEX_MODE,
            # The picker may answer a response's headers with "no body, no trailers" (a replica
            # that put the usage in a header: balancer/picker/ext_proc.py); Envoy ignores such
            # an override in full-duplex mode.
            "allow_mode_override": body_mode == "buffered"}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"}},
    ]
    if picker is None:
        filters, routes = filters[-1:], routes[-1:]
    listener = {"name": "inference", "address": _address(*_split(listen)),
                "per_connection_buffer_limit_bytes": max_body_bytes, "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inference", "http_filters": filters,
            "route_config": {"name": "inference", "virtual_hosts": [{"name": "fleet", "domains": ["*"],
                                                                     "routes": routes}]}}}]}]}
    if lb == "override_host":
        picked = _static_cluster("picked", replicas, 2.0, load_balancing_policy=_policy(
            "override_host", {"override_host_sources": [{"header": header}],
                              "fallback_policy": _policy("round_robin", {})}))
        del picked["lb_policy"]
    else:
        picked = {"name": "picked", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s",
                  "original_dst_lb_config": {"use_http_header": True, "http_header_name": header}}
    clusters = [] if picker is None else [
        _static_cluster("picker", [picker], 1.0, typed_extension_protocol_options=_http2_to_picker(picker_keepalive_s)),
        picked,
    ]
    if fail_open:
        clusters.append(_static_cluster("fallback", replicas, 2.0))
    out = {"static_resources": {"listeners": [listener], "clusters": clusters}}
    if admin is not None:
        out["admin"] = {"address": _address(*_split(admin))}
    return out
