"""The balancer's front door: API keys, per-key limits, admission queue, request caps.

Configured by `GuardConfig` (every feature off unless configured). `Guard.guarded` puts a route's
handler behind the checks that route needs, as plain functions over the request's `Exchange`, so
they are the same whichever HTTP server serves the route table. A generation request (POST
/v1/completions, /v1/chat/completions) goes through `Guard.serve`: these checks, in this order,
cheapest first, each answering with an OpenAI-style error body:

    API key (Bearer)                       ─ missing or wrong ─▶ 401
    per-key rate (token bucket)            ─ empty ─▶ 429, Retry-After: when a token is back
    per-key concurrency                    ─ at the limit ─▶ 429, Retry-After: 1
    body read (within body_timeout_s)      ─ too slow ─▶ 408;  too large ─▶ 413 (client_max_size)
    max_tokens cap                         ─ above ─▶ 400;  absent ─▶ set to the cap
    admission: fleet in-flight < max_inflight_per_replica × usable replicas
                                           ─ else wait in a FIFO queue (at most admission_queue
                                             waiters, at most admission_timeout_s) ─▶ 503,
                                             Retry-After
    ─▶ the proxy

The key of a request is its API key when keys are configured, else the client's address. (On
the front-end the body has arrived before the guard runs, so a slow body holds no limit's slot;
the front-end answers 408 itself when it takes longer than body_timeout_s.)
Other routes: /health, /metrics and /openapi.json are open (probes, scrapers, docs); /admin/*
needs an admin key when `admin_keys` is set (else an API key when `api_keys` is set); every
other route needs an API key when `api_keys` is set.

Keys to the replicas: with `replica_api_key` (BalancerConfig) the balancer's HTTP session sends
that key on every request to a replica, and the client's own Authorization header is never
forwarded; with API keys on the balancer it is not forwarded either (a client's key for the
balancer is not a credential for the replicas). With neither, the client's header passes
through (a fleet whose replicas check the clients' keys themselves).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from balancer.exchange import Exchange, Handler
from protocol.auth import UNAUTHORIZED, KeySet, parse_bearer
from protocol.openai_api import APIError, decode_json_body, error_body

# The generation routes, with the fields that limit a generation's length (the cap fills in the first).
_LENGTH_FIELDS = {"/v1/completions": ("max_tokens",), "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
                  "/v1/responses": ("max_output_tokens",)}
GENERATION_PATHS = frozenset(_LENGTH_FIELDS)
# Routes the balancer forwards to a replica as they are (balancer/proxy.py `forward`): guarded
# like generation (keys, limits, admission), every method, and any /v1/* route it does not serve itself.
# vLLM's own routes outside /v1 (its OpenAI-compatible server: tokenizer, pooling and scoring APIs).
FORWARDED_PATHS = frozenset({"/tokenize", "/detokenize", "/version", "/pooling", "/classify", "/score", "/rerank",
                             "/v2/rerank", "/invocations"})
OWN_V1_PATHS = frozenset({"/v1/models"})


def is_data_path(method: str, path: str) -> bool:
    """True for a request the balancer sends on to a replica (and guards as such)."""
    if path in GENERATION_PATHS:
        return method == "POST"
    return path in FORWARDED_PATHS or (path.startswith("/v1/") and path not in OWN_V1_PATHS)
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})
_MAX_TRACKED_KEYS = 10_000  # idle per-key state is pruned above this many keys
_REPUMP_S = 0.25  # waiters re-check capacity this often


@dataclass(frozen=True)
class GuardConfig:
    api_keys: tuple[str, ...] = ()  # clients must send one as `Authorization: Bearer KEY`
    admin_keys: tuple[str, ...] = ()  # /admin/* needs one of these (default: an API key, if any)
    max_concurrency_per_key: int = 0  # generation requests in flight per key; 0 = no limit
    rate_limit_rps: float = 0.0  # sustained generation requests/s per key; 0 = no limit
    rate_limit_burst: int = 0  # token-bucket size; 0 = max(1, ceil(rate_limit_rps))
    max_inflight_per_replica: int = 0  # admission: fleet capacity per usable replica; 0 = no queue
    admission_queue: int = 100  # requests that may wait for capacity (with max_inflight_per_replica)
    admission_timeout_s: float = 10.0  # longest wait in the admission queue, then 503
    retry_after_s: int = 1  # Retry-After on 503s from the admission queue
    max_tokens_cap: int = 0  # largest max_tokens accepted (absent: set to this); 0 = no cap
    body_timeout_s: float = 0.0  # whole request body within this, else 408 (slow clients); 0 = off

    def __post_init__(self) -> None:
        for name in ("api_keys", "admin_keys"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(k, str) for k in v):
                raise ValueError(f"{name} must be a list of strings")
            object.__setattr__(self, name, tuple(v))
            KeySet(v)  # validates each key
        for name in ("max_concurrency_per_key", "rate_limit_burst", "max_inflight_per_replica", "admission_queue",
                     "max_tokens_cap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("rate_limit_rps", "admission_timeout_s", "body_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, int) or self.retry_after_s < 1:
            raise ValueError("retry_after_s must be a positive integer")

    @property
    def burst(self) -> int:
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_rps))

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))


# ---------------------------------------------------------------------------------- state


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class RateLimiter:
    """A token bucket per key: `rps` tokens/s up to `burst`; a request takes one."""

    def __init__(self, rps: float, burst: int, clock: Callable[[], float]) -> None:
        self.rps, self.burst, self.clock = rps, burst, clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """0.0 if the request may go (a token is taken), else seconds until a token is back."""
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= _MAX_TRACKED_KEYS:
                self._prune(now)
            b = self._buckets[key] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rps)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rps

    def _prune(self, now: float) -> None:
        """Forget full buckets (a key seen again starts full, so nothing changes for it)."""
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rps >= self.burst]
        for k in full:
            del self._buckets[k]


class Overloaded(Exception):
    """No admission: the queue is full (`reason` "queue_full") or the wait timed out ("queue_timeout")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Admission:
    """Admits requests while the fleet's in-flight count is under `capacity()`; the rest wait
    in FIFO order. `pump()` whenever capacity may have grown (a request ended, a replica came
    back); `release()` once per admitted request."""

    def __init__(self, capacity: Callable[[], int], max_waiting: int, timeout_s: float) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.active = 0
        self.waiting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()  # may hold cancelled ones (skipped)

    async def acquire(self) -> None:
        if self.waiting == 0 and self.active < self.capacity():
            self.active += 1
            return
        if self.waiting >= self.max_waiting:
            raise Overloaded("queue_full", f"the admission queue is full ({self.max_waiting} waiting)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        self.waiting += 1
        deadline = loop.time() + self.timeout_s
        try:
            while not fut.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait((fut,), timeout=min(left, _REPUMP_S))
                if not fut.done():
                    self.pump()  # capacity can grow without an event (a breaker's open period ends)
        except BaseException:  # the client went away (cancelled)
            if fut.done() and not fut.cancelled():
                self.release()  # admitted at the last moment, but leaving: hand the slot on
            else:
                fut.cancel()
                self.waiting -= 1
            raise
        if not fut.done():
            fut.cancel()
            self.waiting -= 1
            raise Overloaded("queue_timeout", f"no capacity within {self.timeout_s:g} s")
        # admitted: pump() counted this request in `active` and out of `waiting`

    def release(self) -> None:
        self.active -= 1
        self.pump()

    def pump(self) -> None:
        waiters = self._waiters
        while waiters and self.active < self.capacity():
            fut = waiters.popleft()
            if fut.done():
                continue  # timed out or cancelled: already out of `waiting`
            self.active += 1
            self.waiting -= 1
            fut.set_result(None)
        while waiters and waiters[0].done():
            waiters.popleft()


class Guard:
    """The checks' state for one balancer (limits are per balancer process)."""

    def __init__(self, cfg: GuardConfig, usable_replicas: Callable[[], int], forward_client_auth: bool,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.api_keys = KeySet(cfg.api_keys)
        self.admin_keys = KeySet(cfg.admin_keys) if cfg.admin_keys else self.api_keys
        self.forward_client_auth = forward_client_auth and not cfg.api_keys
        self.rate = RateLimiter(cfg.rate_limit_rps, cfg.burst, clock) if cfg.rate_limit_rps > 0 else None
        self.concurrency: dict[str, int] = {}
        self.admission = None
        if cfg.max_inflight_per_replica > 0:
            self.admission = Admission(lambda: cfg.max_inflight_per_replica * usable_replicas(),
                                       cfg.admission_queue, cfg.admission_timeout_s)
        registry = registry if registry is not None else CollectorRegistry()
        self.rejected = Counter("kvfleet_guard_rejected_requests_total",
                                "Requests refused at the front door, by reason (unauthorized, rate_limited, "
                                "concurrency_limited, body_timeout, max_tokens, queue_full, queue_timeout).",
                                ("reason",), registry=registry)
        self.queue_depth = Gauge("kvfleet_admission_queue_requests", "Requests waiting for admission.",
                                 registry=registry)
        self.queue_depth.set_function(lambda: self.admission.waiting if self.admission else 0)

    @property
    def idle(self) -> bool:
        """Nothing to check or change on any request: no keys, limits, queue, cap or body timeout
        (the balancer's default): `guarded` then hands the routes' handlers back unwrapped."""
        cfg = self.cfg
        return (not cfg.api_keys and not cfg.admin_keys and self.forward_client_auth and self.rate is None
                and not cfg.max_concurrency_per_key and self.admission is None and not cfg.max_tokens_cap
                and not cfg.body_timeout_s)

    @classmethod
    def for_balancer(cls, b) -> "Guard":
        """The guard of balancer `b` (a `balancer.app.Balancer`): capacity from its registry, its
        metrics registry, queue re-checked whenever a replica's state changes."""
        guard = cls(b.cfg.guard, lambda: len(b.registry.usable()), forward_client_auth=b.cfg.replica_api_key is None,
                    registry=b.metrics.registry)
        if guard.admission is not None:
            b.registry.on_change.append(lambda _rid, _what: guard.admission.pump())
        return guard

    # ------------------------------------------------------------------ the checks
    def guarded(self, method: str, path: str, handler: Handler) -> Handler:
        """`handler` behind the checks its route needs (the module docstring's); itself when none."""
        if is_data_path(method, path):
            return handler if self.idle else lambda ex: self.serve(ex, handler)
        keys = self.admin_keys if path.startswith("/admin/") or path == "/admin" else self.api_keys
        if path in OPEN_PATHS or not keys:
            return handler

        async def keyed(ex: Exchange) -> None:
            if not keys.accepts(parse_bearer(ex.header("Authorization"))):
                self.rejected.labels("unauthorized").inc()
                return _refuse(ex, 401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
            await handler(ex)

        return keyed

    async def serve(self, ex: Exchange, handler: Handler) -> None:
        """Run the checks of the module docstring on a generation request, then `handler` on it
        (with its body capped and the client's Authorization hidden where the config says) — or
        answer it with the refusal."""
        cfg = self.cfg
        token = parse_bearer(ex.header("Authorization"))
        if self.api_keys and not self.api_keys.accepts(token):
            self.rejected.labels("unauthorized").inc()
            return _refuse(ex, 401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        key = token if self.api_keys else f"ip:{ex.remote}"
        if self.rate is not None:
            wait = self.rate.take(key)
            if wait > 0:
                self.rejected.labels("rate_limited").inc()
                return _refuse(ex, 429, f"rate limit of {cfg.rate_limit_rps:g} requests/s (burst {cfg.burst}) reached "
                                        f"for this key; retry after the Retry-After header's seconds",
                               {"Retry-After": str(max(1, math.ceil(wait)))})
        limit = cfg.max_concurrency_per_key
        if limit and self.concurrency.get(key, 0) >= limit:
            self.rejected.labels("concurrency_limited").inc()
            return _refuse(ex, 429, f"at most {limit} concurrent requests per key; wait for one to finish",
                           {"Retry-After": "1"})
        self.concurrency[key] = self.concurrency.get(key, 0) + 1
        try:
            body = await self._read_body(ex)
            if body is None:
                return  # refused
            inner = _Guarded(ex, body, hide_auth=not self.forward_client_auth,
                             api_key=token if self.api_keys else None)
            if self.admission is None:
                return await handler(inner)
            try:
                await self.admission.acquire()
            except Overloaded as e:
                self.rejected.labels(e.reason).inc()
                return _refuse(ex, 503, f"every replica is saturated ({e}); retry later",
                               {"Retry-After": str(cfg.retry_after_s)})
            try:
                await handler(inner)
            finally:
                self.admission.release()
        finally:
            n = self.concurrency[key] - 1
            if n:
                self.concurrency[key] = n
            else:
                del self.concurrency[key]

    async def _read_body(self, ex: Exchange) -> bytes | None:
        """The body (read in time), with the max_tokens cap applied; None: refused (answered)."""
        cfg = self.cfg
        try:
            if cfg.body_timeout_s > 0 and not getattr(ex, "body_complete", False):
                # Only a body still arriving needs the timeout (wait_for costs a task and a timer).
                raw = await asyncio.wait_for(ex.read(), cfg.body_timeout_s)
            else:
                raw = await ex.read()
        except asyncio.TimeoutError:
            self.rejected.labels("body_timeout").inc()
            _refuse(ex, 408, f"the request body did not arrive within {cfg.body_timeout_s:g} s",
                    {"Connection": "close"})
            return None
        if not cfg.max_tokens_cap or ex.path not in GENERATION_PATHS:
            return raw
        try:
            body = decode_json_body(raw)
        except APIError:
            return raw  # the proxy answers it with the same 400
        if not isinstance(body, dict):
            return raw
        capped = _cap_max_tokens(body, cfg.max_tokens_cap, _LENGTH_FIELDS[ex.path])
        if isinstance(capped, str):
            self.rejected.labels("max_tokens").inc()
            _refuse(ex, 400, capped, {}, param="max_tokens")
            return None
        return raw if capped is None else json.dumps(capped).encode()


class _Guarded:
    """The Exchange the proxy gets past the guard: the body as the guard read (and capped) it, and
    no Authorization header when the client's is not to be forwarded."""

    __slots__ = ("ex", "body", "hide_auth", "api_key")

    def __init__(self, ex: Exchange, body: bytes, hide_auth: bool, api_key: str | None = None) -> None:
        self.ex, self.body, self.hide_auth = ex, body, hide_auth
        self.api_key = api_key  # the key the guard accepted (request classes read it: balancer/fairness.py)

    method = property(lambda self: self.ex.method)
    path = property(lambda self: self.ex.path)
    remote = property(lambda self: self.ex.remote)
    target = property(lambda self: self.ex.target)

    @property
    def query(self) -> Mapping[str, str]:
        return self.ex.query

    def header(self, name: str) -> str | None:
        if self.hide_auth and name.lower() == "authorization":
            return None
        return self.ex.header(name)

    async def read(self) -> bytes:
        return self.body

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.ex.reply(status, body, headers)

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        await self.ex.open_stream(status, headers)

    async def write(self, data: bytes) -> None:
        await self.ex.write(data)

    async def end(self) -> None:
        await self.ex.end()


def _refuse(ex: Exchange, status: int, message: str, headers: dict[str, str], param: str | None = None) -> None:
    ex.reply(status, json.dumps(error_body(status, message, param) if param else error_body(status, message)).encode(),
             {"Content-Type": "application/json", **headers})


def _cap_max_tokens(body: dict[str, Any], cap: int, names: tuple[str, ...]) -> dict[str, Any] | str | None:
    """An error message if the body asks for more than `cap` tokens; a new body with the cap
    filled in if it names no limit; None to leave it as it is (including bodies the proxy's
    validation will refuse)."""
    present = False
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        present = True
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap:
            return f"'{name}' must be at most {cap} on this server, got {v}"
    if present:
        return None
    return {**body, names[0]: cap}


# ---------------------------------------------------------------------------------- flags


def add_arguments(p) -> None:
    """`kvfleet balancer` flags for this module and for the replica/event-socket credentials."""
    g = p.add_argument_group("security and limits (all off unless given)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept clients that send `Authorization: Bearer KEY` (repeatable; config: api_keys)")
    g.add_argument("--admin-key", action="append", default=[], metavar="KEY",
                   help="the key /admin/* needs (repeatable; default: any --api-key)")
    g.add_argument("--replica-api-key", default=None, metavar="KEY",
                   help="send this key to the replicas (started with `kvfleet replica --api-key KEY`)")
    g.add_argument("--max-concurrency-per-key", type=int, default=None, metavar="N",
                   help="generation requests in flight per API key (per client address without keys); 429 above")
    g.add_argument("--rate-limit", type=float, default=None, metavar="RPS",
                   help="generation requests/s per API key (client address without keys); 429 with Retry-After")
    g.add_argument("--rate-burst", type=int, default=None, metavar="N", help="burst for --rate-limit")
    g.add_argument("--max-inflight-per-replica", type=int, default=None, metavar="N",
                   help="admission control: in-flight requests the fleet takes per usable replica; "
                        "the rest wait in a queue (see --admission-queue, --admission-timeout)")
    g.add_argument("--admission-queue", type=int, default=None, metavar="N",
                   help="requests that may wait for admission (default 100); 503 with Retry-After beyond")
    g.add_argument("--admission-timeout", type=float, default=None, metavar="S",
                   help="longest wait for admission (default 10 s), then 503 with Retry-After")
    g.add_argument("--max-tokens-cap", type=int, default=None, metavar="N",
                   help="refuse max_tokens above N (400); requests that give none get N")
    g.add_argument("--body-timeout", type=float, default=None, metavar="S",
                   help="the whole request body must arrive within S seconds (408 otherwise; slow clients)")
    g.add_argument("--kv-events-curve-server-key", default=None, metavar="KEY|FILE",
                   help="CURVE public key of the replicas' KV-event sockets (Z85, or a key file from "
                        "`kvfleet keys`): events are accepted only from the holder of its secret key")
    g.add_argument("--kv-events-curve-client-key-file", default=None, metavar="FILE",
                   help="this balancer's CURVE secret key file (default with a server key: a fresh keypair)")


def apply_arguments(cfg, args):
    """`cfg` (a BalancerConfig) with the flags of `add_arguments` that were given."""
    g = {}
    if args.api_key:
        g["api_keys"] = cfg.guard.api_keys + tuple(args.api_key)
    if args.admin_key:
        g["admin_keys"] = cfg.guard.admin_keys + tuple(args.admin_key)
    for flag, name in (("max_concurrency_per_key", "max_concurrency_per_key"), ("rate_limit", "rate_limit_rps"),
                       ("rate_burst", "rate_limit_burst"), ("max_inflight_per_replica", "max_inflight_per_replica"),
                       ("admission_queue", "admission_queue"), ("admission_timeout", "admission_timeout_s"),
                       ("max_tokens_cap", "max_tokens_cap"), ("body_timeout", "body_timeout_s")):
        v = getattr(args, flag)
        if v is not None:
            g[name] = v
    top = {}
    if args.replica_api_key is not None:
        top["replica_api_key"] = args.replica_api_key
    if args.kv_events_curve_server_key is not None:
        top["curve_server_key"] = args.kv_events_curve_server_key
    if args.kv_events_curve_client_key_file is not None:
        top["curve_client_key_file"] = args.kv_events_curve_client_key_file
    if g:
        top["guard"] = replace(cfg.guard, **g)
    return replace(cfg, **top) if top else cfg
