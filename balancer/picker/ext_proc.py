"""One HTTP request as Envoy's external processor sees it, from its headers to its response's end.

Envoy opens one bidirectional `ExternalProcessor.Process` stream per request and, in the
endpoint-picker protocol's streaming mode (FULL_DUPLEX_STREAMED bodies, trailers SEND), sends
every phase without waiting for answers. The picker answers each phase in order (a phase's
answer before the next phase's):

    request_headers ─▶ (held)                  a request without a body: picked by load now
    request_body × n ─▶ (buffered until end_of_stream, at most max_body_bytes: else 413)
      end of body ─▶ the pick, exactly as `kvfleet balancer` makes it (Router.prepare + route,
        or route_by_load for a route that is not a generation)
        ─▶ HeadersResponse: set `x-gateway-destination-endpoint: ip:port`, clear_route_cache,
           dynamic metadata {"envoy.lb": {"x-gateway-destination-endpoint": "ip:port"}}
        ─▶ BodyResponse × k: the body as it came, in chunks of at most 62,000 bytes
      or ─▶ ImmediateResponse: 400 (not JSON), 404 (model not served), 413, 503 (no replica,
           or none in the subset hint), with an OpenAI-style error body
    response_headers ─▶ status, content type; the answer adds `X-Kvfleet-Replica`
    response_body × n ─▶ passed back as they came (a JSON answer in full duplex: one chunk
        behind, its last chunk with the one before); the tail kept for `usage`
      end of stream ─▶ the booking ends: usage (cached and completion tokens), the decision
        audited, Booking.finish; a 5xx counts against the replica and ends it as failed (Envoy's
        response flags, `x-kvfleet-envoy-flags` from kvfleet's bootstraps, say whether the replica
        refused the connection: then the breaker opens at once; the header is removed)
    or, a non-streamed response whose headers carry its usage (`X-Kvfleet-Usage`, from kvfleet
      replicas) ─▶ the booking ends at its headers, and (body modes other than full duplex) the
        answer's `mode_override` asks Envoy for no response body or trailers: one message less
        each way (the bootstraps of envoy.py set `allow_mode_override`; an Envoy without it sends
        the body anyway, and it is acknowledged as before)
    the gRPC stream closes before that (client gone, upstream reset) ─▶ Booking.finish(ok=False)

Body modes. Envoy says its modes in the stream's first message (`protocol_config`; absent, the
protocol's streaming mode is assumed). FULL_DUPLEX_STREAMED (above) is the protocol's; Envoy then
holds no copy of the body, so it cannot fail open once a chunk has reached a picker that then
fails (envoyproxy/envoy#41276: fail-open only up to the first body chunk). For a gateway that
must fail open the picker also takes the older EPP configuration: request body BUFFERED (or
BUFFERED_PARTIAL: Envoy keeps the body; the headers are answered at once, the pick rides on the
body's answer: header mutation, clear_route_cache, metadata) and response body STREAMED or
BUFFERED (each chunk acknowledged, Envoy keeps it). A request body in STREAMED mode cannot be
picked from (its headers go upstream before the body comes): refused with a 500 saying so.
NONE: picked by load from the headers.

Facts from the Gateway API Inference Extension (docs/proposals/004-endpoint-picker-protocol
and its reference EPP, pkg/epp/handlers): the header and metadata names, 503 when no endpoint
is ready or none of the subset hint's is, the subset hint in the request's filter metadata
(`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`), and the 62,000-byte chunk
limit (a margin under some Envoys' 64 KiB per streamed message).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import time
import uuid
import zlib
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlparse

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from prometheus_client import Counter, Gauge

from balancer.access_log import AccessLog
from balancer.metrics import NO_REPLICA
from balancer.proxy import attempt_metrics, count_usage, json_model, note_usage
from balancer.registry import ReplicaState
from balancer.relay import REPLICA_HEADER
from balancer.router import Booking
from protocol.openai_api import (USAGE_HEADER, APIError, GenerationRequest, decode_json_body, error_body,
                                 parse_for_routing, parse_usage_header)

from balancer.picker.config import ENVOY_FLAGS_HEADER, SERVED_HEADER, SUBSET_KEY, SUBSET_NAMESPACE, PickerConfig

log = logging.getLogger(__name__)
ACCESS_LOGGER = "kvfleet.picker.access"

BODY_CHUNK_LIMIT = 62_000
_TAIL_BYTES = 4096  # of a response kept for its `usage` object (balancer.proxy.tail_usage reads 2 KiB)
GENERATION_KINDS = {"/v1/completions": "completion", "/v1/chat/completions": "chat", "/v1/responses": "responses"}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODE = processing_mode_pb2.ProcessingMode
FULL_DUPLEX, BUFFERED, BUFFERED_PARTIAL, STREAMED, NONE = (_MODE.FULL_DUPLEX_STREAMED, _MODE.BUFFERED,
                                                           _MODE.BUFFERED_PARTIAL, _MODE.STREAMED, _MODE.NONE)
_USAGE = USAGE_HEADER.lower()
# Answers without content, the same for every stream (a message is not changed once built).
_REQUEST_HEADERS_ACK = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_REQUEST_TRAILERS_ACK = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_RESPONSE_BODY_ACK = pb.ProcessingResponse(response_body=pb.BodyResponse())
_RESPONSE_TRAILERS_ACK = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


class PickerMetrics:
    """The picker's own series, on the balancer's registry beside the balancer's metrics."""

    def __init__(self, registry) -> None:
        self.picks = Counter("kvfleet_picker_picks_total",
                             "ext_proc requests answered, by outcome: `policy` (a generation routed by the policy), "
                             "`load` (another route, by load), or the refusal sent instead of a pick "
                             "(`bad_request`, `not_found`, `too_large`, `no_replica`, `misconfigured`).", ("outcome",),
                             registry=registry)
        self.streams = Gauge("kvfleet_picker_streams", "ext_proc streams open (one per HTTP request in Envoy).",
                             registry=registry)
        self.aborted = Counter("kvfleet_picker_aborted_total",
                               "Picked requests whose ext_proc stream closed before the response ended "
                               "(client gone, upstream reset, Envoy timeout).", registry=registry)


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    outcome: str
    body: dict


def endpoint_address(url: str) -> str:
    """A replica URL as `ip:port`, what Envoy's ORIGINAL_DST cluster takes: an IP literal as it is
    (IPv6 bracketed), a host name resolved once (original_dst resolves nothing)."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    host = u.hostname or ""
    try:
        ip = ip_address(host)
    except ValueError:
        ip = ip_address(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class Picking:
    """What every stream of one picker shares: the balancer's objects, the protocol's names,
    the replicas' addresses and the metrics. Built by balancer/picker/server.py."""

    def __init__(self, cfg: PickerConfig, balancer, metrics: PickerMetrics) -> None:
        self.cfg = cfg
        self.b = balancer  # a started balancer.app.Balancer: router, registry, proxy (check_model), audit
        self.metrics = metrics
        self.access = AccessLog(ACCESS_LOGGER)  # one line per request (balancer/access_log.py); the server starts it
        self._addresses: dict[str, str] = {}
        self._id_prefix = f"kvp-{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count()

    def address(self, replica: ReplicaState) -> str:
        addr = self._addresses.get(replica.url)
        if addr is None:
            addr = self._addresses[replica.url] = endpoint_address(replica.url)
        return addr

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"


def _headers(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    """Envoy's header map (lower-case keys; `raw_value` in recent Envoys, `value` in older)."""
    return {h.key: (h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in header_map.headers}


def _set_headers(*pairs: tuple[str, str]) -> pb.HeaderMutation:
    return pb.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode("latin-1")),
                                   append_action=_OVERWRITE) for k, v in pairs])


def _body_chunks(body: bytes, end: bool, request: bool) -> list[pb.ProcessingResponse]:
    """`body` back to Envoy as streamed body answers, each at most BODY_CHUNK_LIMIT bytes; the
    last one carries `end` (end of stream)."""
    pieces = [body[i:i + BODY_CHUNK_LIMIT] for i in range(0, len(body), BODY_CHUNK_LIMIT)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        common = pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=piece, end_of_stream=end and i == len(pieces) - 1)))
        out.append(pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)) if request
                   else pb.ProcessingResponse(response_body=pb.BodyResponse(response=common)))
    return out


class RequestStream:
    """The state of one ext_proc stream; `handle` answers each message, `close` ends it."""

    def __init__(self, picking: Picking) -> None:
        self.p = picking
        self.arrival = time.perf_counter()
        self.headers: dict[str, str] = {}
        self.path = ""
        self.method = ""
        self.request_id = ""
        self.body = bytearray()
        self.subset: frozenset[str] | None = None  # endpoints (ip:port) the data plane allows, if it says
        self.booking: Booking | None = None
        self.endpoint: str | None = None
        self.req: GenerationRequest | None = None
        self.prepared = None  # the request as the router saw it (a policy pick), for a rebooking
        self.alternates: list = []  # the policy's next choices (Decisions), listed after the pick
        self.prompt_tokens = 0
        self.status = 0
        self.sse = False
        self.refused = False  # the picked replica refused Envoy's connection (its 503 is Envoy's)
        self.tail = bytearray()
        self.held = b""  # full duplex, not SSE: the last response chunk, sent on with the next one
        self.events = 0  # SSE data events relayed, [DONE] included
        self.ttft_s: float | None = None
        self.finished = False  # the stream needs no more answers (refused, or its response ended)
        self.request_mode = FULL_DUPLEX  # body modes, from the first message's protocol_config
        self.partial = False  # BUFFERED_PARTIAL sent the body's start only (it was over Envoy's buffer)
        self.response_mode = FULL_DUPLEX

    # ------------------------------------------------------------------ messages
    def handle(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        phase = msg.WhichOneof("request")
        if msg.HasField("protocol_config"):
            self.request_mode = msg.protocol_config.request_body_mode
            self.response_mode = msg.protocol_config.response_body_mode
        if msg.HasField("metadata_context") and self.subset is None:
            self._read_subset(msg.metadata_context)
        if phase == "request_headers":
            self.headers = _headers(msg.request_headers.headers)
            self.path = self.headers.get(":path", "").split("?", 1)[0]
            self.method = self.headers.get(":method", "")
            self.request_id = self.headers.get("x-request-id") or self.p.new_request_id()
            if msg.request_headers.end_of_stream or self.request_mode == NONE:
                return self._pick(body=False)
            if self.request_mode in (BUFFERED, BUFFERED_PARTIAL):  # the body follows once answered
                return [_REQUEST_HEADERS_ACK]
            if self.request_mode != FULL_DUPLEX:
                return self._refuse(_Refusal(500, "misconfigured", error_body(
                    500, "the endpoint picker cannot pick from a request body in STREAMED mode (the headers go "
                         "upstream first): set the gateway's ext_proc request_body_mode to FULL_DUPLEX_STREAMED "
                         "or BUFFERED")))
            return []
        if phase == "request_body":
            self.body += msg.request_body.body
            if len(self.body) > self.p.b.cfg.max_body_bytes:
                return self._refuse(_Refusal(413, "too_large", error_body(
                    413, f"request body too large (over {self.p.b.cfg.max_body_bytes} bytes); send a smaller body")))
            if self.request_mode in (BUFFERED, BUFFERED_PARTIAL):  # the whole body (or all Envoy buffers)
                self.partial = self.request_mode == BUFFERED_PARTIAL and not msg.request_body.end_of_stream
                return self._pick()
            return self._pick() if msg.request_body.end_of_stream else []
        if phase == "request_trailers":
            out = self._pick(trailers=True) if self.endpoint is None and not self.finished else []
            return out if self.finished else out + [_REQUEST_TRAILERS_ACK]
        if phase == "response_headers":
            return self._response_headers(msg.response_headers)
        if phase == "response_body":
            return self._response_body(msg.response_body)
        if phase == "response_trailers":
            self._finish()
            held, self.held = self.held, b""
            return [*(_body_chunks(held, end=False, request=False) if held else []), _RESPONSE_TRAILERS_ACK]
        return []

    def _read_subset(self, md: base_pb2.Metadata) -> None:
        hint = md.filter_metadata.get(SUBSET_NAMESPACE)
        if hint is None or SUBSET_KEY not in hint.fields:
            return
        v = hint.fields[SUBSET_KEY]
        items = [x.string_value for x in v.list_value.values] if v.HasField("list_value") else \
            [s.strip() for s in v.string_value.split(",")]
        self.subset = frozenset(x for x in items if x)

    # ------------------------------------------------------------------ the pick
    def _pick(self, body: bool = True, trailers: bool = False) -> list[pb.ProcessingResponse]:
        """Book a replica and answer the request phases held so far: the headers, then (`body`)
        the body, ended unless `trailers` follow; or the refusal."""
        started = time.perf_counter()
        try:
            booking, outcome = self._book()
        except APIError as e:
            outcome = {400: "bad_request", 404: "not_found", 413: "too_large", 503: "no_replica"}.get(e.status,
                                                                                                     "bad_request")
            return self._refuse(_Refusal(e.status, outcome, e.body()))
        self.booking = booking
        self.endpoint = addr = self.p.address(booking.replica)
        m = self.p.b.metrics
        self.p.metrics.picks.labels(outcome).inc()
        m.series(m.inflight, booking.replica_id).set(booking.replica.inflight_requests)
        if booking.by_policy:
            attempt_metrics(m, booking.replica_id, booking.matched_tokens, booking.rr.prompt_tokens,
                            time.perf_counter() - started)
        header = self.p.cfg.destination_header
        # The pick, then its fallbacks: `ip:port,ip:port` (the protocol's list), the same in both forms.
        value = ",".join([addr, *(self.p.address(r) for r in self._alternate_replicas())])
        metadata = struct_pb2.Struct()
        metadata.update({self.p.cfg.metadata_namespace: {header: value}})
        route = pb.CommonResponse(header_mutation=_set_headers((header, value)), clear_route_cache=True)
        if not body:
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=route),
                                          dynamic_metadata=metadata)]
        if self.request_mode != FULL_DUPLEX:  # buffered: the headers were answered; Envoy keeps the body
            self.body = bytearray()
            return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=route), dynamic_metadata=metadata)]
        # Full duplex: Envoy sends the body upstream chunked (Transfer-Encoding), whatever the
        # client sent; a Content-Length set here is not applied (Envoy 1.40).
        headers = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=route), dynamic_metadata=metadata)
        out = [headers, *_body_chunks(bytes(self.body), end=not trailers, request=True)]
        self.body = bytearray()  # not needed again: a long stream does not hold its prompt
        return out

    def _book(self) -> tuple[Booking, str]:
        """The booking for this request, as the balancer would make it; APIError for a refusal."""
        b = self.p.b
        exclude = frozenset()
        if self.subset is not None:
            exclude = frozenset(r.replica_id for r in b.registry if self.p.address(r) not in self.subset)
        # A body cut at Envoy's buffer limit cannot be parsed: placed by load.
        kind = GENERATION_KINDS.get(self.path) if self.method == "POST" and not self.partial else None
        raw = bytes(self.body)
        encoding = self.headers.get("content-encoding", "").strip().lower()
        if raw and encoding in ("gzip", "deflate", "x-gzip"):
            try:
                raw = zlib.decompress(raw, 47)  # 47: gzip or zlib header, detected
            except zlib.error as e:
                raise APIError(400, f"the request body could not be decompressed ({encoding}): {e}") from None
        model = None
        if kind is not None:
            body = decode_json_body(raw)
            try:
                self.req = parse_for_routing(body, kind, b.cfg.retry.failover_max_stop)
            except APIError:
                self.req = None  # nothing to hash: placed by load, the replica says what is wrong
            if self.req is not None:
                b.proxy.check_model(self.req)
                prepared = b.router.prepare(self.req)
                self.prompt_tokens = len(prepared.token_ids)
                booking = b.router.route(prepared, self.request_id, exclude)
                if booking is None:
                    raise self._no_replica(self.req.model)
                self.prepared = prepared
                tried = set(exclude) | {booking.replica_id}
                for _ in range(self.p.cfg.fallback_endpoints):  # decisions only: booked if Envoy uses one
                    _, _, alt = b.router.choose(prepared, self.request_id, frozenset(tried))
                    if alt is None:
                        break
                    tried.add(alt.replica_id)
                    self.alternates.append(alt)
                return booking, "policy"
            model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        elif not self.partial:
            model = json_model(raw, self.headers.get("content-type"))
        if model is not None:
            b.proxy.check_model(GenerationRequest(kind="other", model=model))
        booking = b.router.route_by_load(model, self.request_id, exclude)
        if booking is None:
            raise self._no_replica(model)
        return booking, "load"

    def _alternate_replicas(self) -> list[ReplicaState]:
        reg = self.p.b.registry
        return [r for r in (reg.get(d.replica_id) for d in self.alternates) if r is not None]

    def _moved(self, served: str) -> None:
        """Envoy went down the answer's list (the pick refused or reset its connection, and the
        route retried): book the endpoint that served, release the pick as failed."""
        d = next((d for d, r in zip(self.alternates, self._alternate_replicas()) if self.p.address(r) == served), None)
        if d is None or self.prepared is None:
            return
        b = self.p.b
        old = self.booking
        # Envoy retried it for a connect failure or a reset before any response: as the balancer
        # treats a refused attempt (the breaker opens at once; health polls confirm).
        b.registry.record_failure(old.replica, refused=True)
        old.fail()
        m = b.metrics
        m.series(m.inflight, old.replica_id).set(old.replica.inflight_requests)
        m.retries.labels(old.replica_id).inc()
        self.booking = b.router.book(self.prepared, old.rr, d)
        self.endpoint = served

    def _no_replica(self, model: str | None) -> APIError:
        self.p.b.metrics.no_replica.inc()
        where = " among the endpoints the gateway allowed (x-gateway-destination-endpoint-subset)" \
            if self.subset is not None else ""
        return APIError(503, "no healthy replica is available" + (f" for model `{model}`" if model else "")
                        + where + "; check the picker's `GET /admin/replicas` and the replicas' health")

    def _refuse(self, r: _Refusal) -> list[pb.ProcessingResponse]:
        self.finished = True
        self.status = r.status
        self.p.metrics.picks.labels(r.outcome).inc()
        m = self.p.b.metrics
        m.series(m.requests, NO_REPLICA, self.p.b.policy.name, f"{r.status // 100}xx").inc()
        self._log_access()
        return [pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=r.status), body=json.dumps(r.body).encode(),
            headers=_set_headers(("content-type", "application/json")),
            details=f"kvfleet_picker_{r.outcome}"))]

    # ------------------------------------------------------------------ the response
    def _response_headers(self, msg: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        headers = _headers(msg.headers)
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        self.sse = headers.get("content-type", "").startswith("text/event-stream")
        self.refused = "UF" in headers.get(ENVOY_FLAGS_HEADER, "").split(",")
        served = headers.get(SERVED_HEADER)
        if self.alternates and self.booking is not None and served and served != self.endpoint:
            self._moved(served)
        mutation = _set_headers((REPLICA_HEADER.lower(), self.booking.replica_id)) if self.booking else None
        if mutation is not None:
            mutation.remove_headers.extend((ENVOY_FLAGS_HEADER, _USAGE))
        answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation)))
        # A non-streamed answer is complete before its headers leave the replica: with its usage
        # in them, the body has nothing left to tell.
        usage = None if self.sse or msg.end_of_stream else parse_usage_header(headers.get(_USAGE))
        if usage is not None:
            self.ttft_s = time.perf_counter() - self.arrival
            if FULL_DUPLEX not in (self.request_mode, self.response_mode):  # Envoy ignores it in full duplex
                answer.mode_override.CopyFrom(_MODE(
                    request_body_mode=self.request_mode, response_header_mode=_MODE.SEND, response_body_mode=NONE,
                    request_trailer_mode=_MODE.SKIP, response_trailer_mode=_MODE.SKIP))
            self._finish(usage)
        elif msg.end_of_stream or self.response_mode == NONE:  # NONE: no body phase follows
            self._finish()
        return [answer]

    def _response_body(self, msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        data = msg.body
        if data:
            if self.ttft_s is None:
                self.ttft_s = time.perf_counter() - self.arrival
            if self.sse:  # an event's "data:" may straddle two chunks: count across the seam
                self.events += (bytes(self.tail[-4:]) + data).count(b"data:")
            self.tail += data
            if len(self.tail) > _TAIL_BYTES:
                del self.tail[:-_TAIL_BYTES]
        if self.response_mode == FULL_DUPLEX and self.sse:
            out = _body_chunks(data, end=msg.end_of_stream, request=False)
        elif self.response_mode == FULL_DUPLEX:
            # A JSON answer is of use only whole: one chunk behind, so that its last (often empty,
            # end-of-stream) chunk goes back with the one before it: one message less.
            held, self.held = self.held, data
            if msg.end_of_stream:
                out, self.held = _body_chunks(held + data, end=True, request=False), b""
            else:
                out = _body_chunks(held, end=False, request=False) if held else []
        else:  # STREAMED or BUFFERED: acknowledged unchanged, Envoy sends its own copy on
            out = [_RESPONSE_BODY_ACK]
        if msg.end_of_stream:
            self._finish()
        return out

    def _finish(self, usage: dict | None = None) -> None:
        """The response ended (its last body chunk, its trailers, or headers alone); `usage`: its
        usage object when its headers said it, else it is read from the body's tail."""
        if self.finished:
            return
        self.finished = True
        booking = self.booking
        if booking is None:
            return
        b = self.p.b
        m = b.metrics
        replica = booking.replica
        cached, output = count_usage(m, replica.replica_id, usage) if usage is not None \
            else note_usage(m, replica.replica_id, self.tail)
        if output is None and self.sse and self.status == 200 and self.events > 1:
            # No usage chunk (the client did not ask for one): the SSE events relayed less [DONE].
            # vLLM and kvfleet replicas send one event per decoded token, so this is the output
            # length but for tokens a stop string held back; the predictor learns from it.
            output = self.events - 1
        if self.status >= 500:  # refused (Envoy's UF flag): the breaker opens at once, as in the balancer
            b.registry.record_failure(replica, refused=self.refused)
            booking.fail()
        else:
            b.registry.record_success(replica)
            if booking.by_policy:  # as the balancer: routes placed by load are not routing decisions
                b.audit.record(self.request_id, self.path, booking, self.status, cached)
            booking.finish(output)
        m.series(m.requests, replica.replica_id, b.policy.name, f"{self.status // 100}xx").inc()
        m.e2e.observe(time.perf_counter() - self.arrival)
        if self.ttft_s is not None:
            m.ttft.observe(self.ttft_s)
        m.series(m.inflight, replica.replica_id).set(replica.inflight_requests)
        self._log_access(cached)

    def close(self) -> None:
        """The gRPC stream is over. A booking whose response never ended is released as failed."""
        if self.booking is not None and self.booking.open:
            self.p.metrics.aborted.inc()
            self.booking.finish(None, ok=False)
            m = self.p.b.metrics
            m.series(m.inflight, self.booking.replica_id).set(self.booking.replica.inflight_requests)
            self.status = self.status or 499
            self._log_access()

    def _log_access(self, cached: int | None = None) -> None:
        access = self.p.access
        if not access.enabled:
            return
        replica = self.booking.replica_id if self.booking else NO_REPLICA
        e2e = time.perf_counter() - self.arrival
        access.write(f"{self.method} {self.path} replica={replica} endpoint={self.endpoint or '-'} "
                     f"status={self.status:d} e2e={e2e:.4f}s",
                     {"request_id": self.request_id, "path": self.path, "replica": replica, "endpoint": self.endpoint,
                      "status": self.status, "e2e_s": round(e2e, 6), "prompt_tokens": self.prompt_tokens,
                      "predicted_cached_tokens": self.booking.matched_tokens if self.booking else 0,
                      "reported_cached_tokens": cached})


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """Envoy's `envoy.service.ext_proc.v3.ExternalProcessor` on grpc.aio: one `RequestStream`
    per call, closed however the call ends (cancelled by Envoy, broken, or done)."""

    def __init__(self, picking: Picking) -> None:
        self.picking = picking

    async def Process(self, request_iterator, context):  # noqa: N802 - the gRPC method's name
        stream = RequestStream(self.picking)
        gauge = self.picking.metrics.streams
        gauge.inc()
        try:
            async for msg in request_iterator:
                for answer in stream.handle(msg):
                    yield answer
                if stream.finished and stream.booking is None:
                    return  # refused: Envoy sends the immediate response and ends the stream
        finally:
            gauge.dec()
            stream.close()
