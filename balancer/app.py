"""Assembles the balancer: registry, index, subscribers, policy, router, proxy, watchers, routes.

`Balancer` owns the runtime state; `create_app` builds its one route table (every route an
`Exchange` handler behind the guard's checks: balancer/exchange.py) and an aiohttp application
with one cleanup context that starts every long-lived task (health polls, DNS, KV-event
InferencePool, subscribers, stats export) and cancels and awaits them on shutdown, with one `ClientSession` for
the app's lifetime. balancer/serving.py serves the table with the lean front-end, or registers
it on the aiohttp application with `fast_path = false`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from balancer import index_state, openapi
from balancer.access_log import AccessLog
from balancer.approx_index import ApproxIndex
from balancer.audit import DecisionAudit
from balancer.config import BalancerConfig, ReplicaSpec
from balancer.digest_feed import DigestFeed, DigestFeedConfig
from balancer.disagg import PairSelector
from balancer.digest_index import DigestIndex
from balancer.exchange import RouteTable, web_handler
from balancer.fairness import FairQueue
from balancer.guard import FORWARDED_PATHS, Guard
from balancer.health import DnsWatcher, HealthChecker, note_role
from balancer.kv_subscriber import ReplicaEventSubscriber, SubscriberConfig
from balancer.membership import Membership
from balancer.memtrim import trim_periodically
from balancer.metrics import BalancerMetrics, SessionCollector
from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad
from balancer.prefix_index import PrefixIndex
from balancer.proxy import Proxy
from balancer.registry import Registry
from balancer.router import Router
from balancer.sessions import Sessions
from balancer.upstream import UpstreamConfig, UpstreamPool
from protocol import curve
from protocol.load import LoadReport
from protocol.openai_api import APIError, error_body
from protocol.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
BALANCER = web.AppKey("balancer", "Balancer")
ROUTES = web.AppKey("routes", RouteTable)  # every route of the balancer, guard included
GUARD = web.AppKey("guard", Guard)


class Balancer:
    def __init__(self, cfg: BalancerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.metrics = BalancerMetrics()
        self.audit = DecisionAudit(cfg.audit, self.metrics)
        self.access = AccessLog()  # the access lines (balancer/access_log.py), written in batches
        self.sessions = Sessions(cfg.sessions)  # sticky sessions' table (empty while they are off)
        self.metrics.registry.register(SessionCollector(self.sessions, clock))
        self.registry = Registry(cfg.breaker, cfg.health, clock, in_transit_s=cfg.report_transit_s)
        # The fair admission queue (balancer/fairness.py), None while fairness is off.
        self.fairness: FairQueue | None = None
        if cfg.fairness.enabled:
            per = cfg.fairness.max_inflight_per_replica
            self.fairness = FairQueue(cfg.fairness, lambda: per * len(self.registry.usable()),
                                      registry=self.metrics.registry, clock=clock)
            self.registry.on_change.append(lambda _rid, _what: self.fairness.pump())
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.policy = make_policy(cfg.policy, dict(cfg.policy_options))
        # Prefill/decode pairs (balancer/disagg.py), priced with the predictive policy's step
        # coefficients when that is the policy, else with a learner of the selector's own.
        shared = getattr(self.policy, "learner", None)
        self.pairs = PairSelector(learner=shared)
        self._pairs_learn = shared is None
        self.model: str | None = cfg.model
        self.subscribers: dict[str, ReplicaEventSubscriber] = {}
        # Cache digests (cfg.index_source "digests" or "both"): one feed per replica that publishes.
        self.digest_feeds: dict[str, DigestFeed] = {}
        self.digests = DigestIndex(cfg.block_size, cfg.digest_max_age_s, clock)
        self.index: PrefixIndex | None = None
        self.approx = ApproxIndex(capacity_per_replica=cfg.approx_capacity_blocks, ttl_s=cfg.approx_ttl_s, clock=clock)
        self.router: Router | None = None
        self.proxy: Proxy | None = None
        self._session: aiohttp.ClientSession | None = None  # health polls, model discovery
        self._upstream: UpstreamPool | None = None  # the data path: requests to the replicas
        self._tasks: list[asyncio.Task] = []
        self._pool_watcher = None  # balancer.inference_pool.InferencePoolWatcher, with cfg.inference_pool
        self._stopping: list[asyncio.Task] = []
        self._curve_keypair = curve.client_keypair(cfg.curve_client_key_file)  # for CURVE event sockets

    # ------------------------------------------------------------------ lifecycle
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "balancer not started"
        return self._session

    def upstream(self) -> UpstreamPool:
        assert self._upstream is not None, "balancer not started"
        return self._upstream

    async def start(self) -> None:
        r = self.cfg.retry
        timeout = aiohttp.ClientTimeout(total=None, connect=r.connect_timeout_s, sock_read=r.read_timeout_s)
        # No cookie jar: a proxy must not keep a replica's cookies and send them along with other
        # clients' requests (and skipping the jar saves its work on every request).
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"Authorization": f"Bearer {self.cfg.replica_api_key}"} if self.cfg.replica_api_key else None)
        self._upstream = UpstreamPool(UpstreamConfig(
            connect_timeout_s=r.connect_timeout_s, read_timeout_s=r.read_timeout_s,
            headers=(("Authorization", f"Bearer {self.cfg.replica_api_key}"),) if self.cfg.replica_api_key else ()))
        pool = None
        discovered: list[ReplicaSpec] = []
        if self.cfg.inference_pool is not None:  # its pods now, before the model is asked from them
            from balancer.inference_pool import InferencePoolWatcher

            pool = self._pool_watcher = InferencePoolWatcher(
                self.cfg.inference_pool, Membership(self.registry, self.add_replica, self.remove_replica))
            try:
                discovered = await pool.start()
            except BaseException:
                await self.stop()  # closes the sessions opened above
                raise
        if self.model is None:
            self.model = await self._discover_model([*self.cfg.replicas, *discovered])
        self.index = PrefixIndex(self.cfg.block_size, self.model)
        from predictors.adapter import balancer_predictor

        predictor = balancer_predictor(self.cfg.predictor, self.model)
        self.router = Router(self.model, self.cfg.block_size, self.tokenizer, self.index, self.approx, self.policy,
                             self.registry, has_events=self._has_feed, predictor=predictor,
                             clock=self.clock, lora_slack=self.cfg.lora_slack,
                             digests=self.digests if self.cfg.index_source != "events" else None,
                             uses_digest=self.uses_digest, sessions=self.sessions,
                             consistent=self.cfg.consistent_routing, pairs=self.pairs)
        self.proxy = Proxy(self.registry, self.router, self.metrics, self.upstream, self.cfg.retry, self.policy.name,
                           self.served_models, self.audit, self.fairness, self.access)
        self.access.start()
        for spec in self.cfg.replicas:
            self.add_replica(spec)
        if pool is not None:
            pool.membership.reconcile(discovered)  # in the registry before the app serves
        checker = HealthChecker(self.registry, self.session, self.metrics, self._has_feed,
                                self.cfg.load_poll_s)
        self._tasks.append(asyncio.create_task(checker.run(), name="health"))
        for dns in self.cfg.dns:
            watcher = DnsWatcher(dns, Membership(self.registry, self.add_replica, self.remove_replica))
            self._tasks.append(asyncio.create_task(watcher.run(), name=f"dns:{dns.name}"))
        if pool is not None:
            self._tasks.append(asyncio.create_task(pool.run(), name=f"inference-pool:{pool.cfg.ref}"))
        self._tasks.append(asyncio.create_task(self._export_stats(), name="stats"))
        if self.cfg.memory_trim_s > 0:
            self._tasks.append(asyncio.create_task(trim_periodically(self.cfg.memory_trim_s), name="memtrim"))

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._pool_watcher is not None:
            await self._pool_watcher.close()
        await asyncio.gather(*(s.stop() for s in self.subscribers.values()),
                             *(f.stop() for f in self.digest_feeds.values()), *self._stopping,
                             return_exceptions=True)
        self.subscribers.clear()
        self.digest_feeds.clear()
        if self._session is not None:
            await self._session.close()
        if self._upstream is not None:
            await self._upstream.close()
        await self.access.stop()  # every buffered line written; later ones are written at once

    def served_models(self) -> list[str]:
        """The models the fleet serves: every healthy replica's `/v1/models`, or the configured
        (or first discovered) model while no replica has listed its own."""
        return self.registry.served_models() or ([self.model] if self.model else [])

    async def _discover_model(self, replicas: list[ReplicaSpec], attempts: int = 20) -> str:
        for _ in range(attempts):
            for spec in replicas:
                try:
                    async with self.session().get(spec.url + "/v1/models",
                                                  timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        data = await resp.json()
                        return data["data"][0]["id"]
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError):
                    continue
            await asyncio.sleep(0.5)
        raise RuntimeError("could not learn the model name from any replica's /v1/models; pass --model NAME")

    # ------------------------------------------------------------------ membership
    def add_replica(self, spec: ReplicaSpec) -> None:
        self.registry.add(spec)
        self.metrics.add_replica(spec.replica_id)
        source = self.cfg.index_source
        if spec.events and source != "digests":
            sub = ReplicaEventSubscriber(
                SubscriberConfig(replica_id=spec.replica_id, endpoint=spec.events, replay_endpoint=spec.replay,
                                 topic=spec.topic.encode(),
                                 curve=curve.client_keys(spec.curve_server_key or self.cfg.curve_server_key,
                                                         self._curve_keypair)),
                self.index,
                on_load=lambda report, rid=spec.replica_id: self._on_load(rid, report),
            )
            self.subscribers[spec.replica_id] = sub
            sub.start()
        if spec.events and source != "events":
            feed = DigestFeed(
                DigestFeedConfig(replica_id=spec.replica_id, endpoint=spec.events, replay_endpoint=spec.replay,
                                 # with "both" the event subscriber reads the load reports
                                 **({"load_topic": None} if source == "both" else {}),
                                 max_age_s=self.cfg.digest_max_age_s,
                                 request_timeout_s=self.cfg.digest_request_timeout_s,
                                 curve=curve.client_keys(spec.curve_server_key or self.cfg.curve_server_key,
                                                         self._curve_keypair)),
                self.digests,
                on_load=lambda report, rid=spec.replica_id: self._on_load(rid, report),
                clock=self.clock,
            )
            self.digest_feeds[spec.replica_id] = feed
            feed.start()

    def _has_feed(self, replica_id: str) -> bool:
        """The replica tells what it caches (KV events or digests) and sends load reports."""
        return replica_id in self.subscribers or replica_id in self.digest_feeds

    def uses_digest(self, replica_id: str) -> bool:
        """Prefix matching for the replica reads its digest: always with index_source "digests";
        with "both" until its event index is exact (a balancer that joined late)."""
        if replica_id not in self.digest_feeds:
            return False
        sub = self.subscribers.get(replica_id)
        return sub is None or not sub.exact

    def digest_in_use(self, replica_id: str) -> bool:
        """Routing reads the replica's digest now: it should, and holds a fresh one."""
        return self.uses_digest(replica_id) and self.digests.fresh(replica_id)

    def remove_replica(self, replica_id: str) -> bool:
        if self.registry.remove(replica_id) is None:
            return False
        for feed in (self.subscribers.pop(replica_id, None), self.digest_feeds.pop(replica_id, None)):
            if feed is not None:
                task = asyncio.create_task(feed.stop())
                self._stopping.append(task)
                task.add_done_callback(self._stopping.remove)
        self.index.remove_replica(replica_id)
        self.digests.remove_replica(replica_id)
        self.approx.remove_replica(replica_id)
        self.policy.on_replica_removed(replica_id)
        self.pairs.on_replica_removed(replica_id)
        self.audit.forget_replica(replica_id)
        self.metrics.forget_replica(replica_id)
        return True

    def _on_load(self, replica_id: str, report: LoadReport) -> None:
        if report.steps:
            self.policy.observe_steps(replica_id, report.steps)
            if self._pairs_learn:
                self.pairs.observe_steps(replica_id, report.steps)
        self.registry.on_load(
            replica_id,
            ReplicaLoad(num_running=report.num_running, num_waiting=report.num_waiting,
                        queued_prefill_tokens=report.queued_prefill_tokens,
                        running_decode_tokens=report.running_decode_tokens, free_blocks=report.free_blocks,
                        total_blocks=report.total_blocks, kv_usage=report.kv_usage, age_s=0.0),
            # made when its ts says (unix seconds); a clock skew or a missing ts counts as fresh
            age_s=min(max(time.time() - report.ts, 0.0), 1.0) if report.ts else 0.0,
        )
        self.registry.set_loras(replica_id, frozenset(report.loras), report.lora_load_s)
        self.metrics.series(self.metrics.replica_loras, replica_id).set(len(report.loras))
        note_role(self.registry, self.metrics, replica_id, report.role)

    async def _export_stats(self) -> None:
        exported: dict[tuple[str, str], int] = {}
        events: dict[str, int] = {}
        digests: dict[str, int] = {}
        while True:
            for rid, sub in list(self.subscribers.items()):
                for reason, n in sub.stats.resyncs.items():
                    key = (rid, reason)
                    self.metrics.resyncs.labels(rid, reason).inc(n - exported.get(key, 0))
                    exported[key] = n
                self.metrics.kv_events.labels(rid).inc(sub.stats.events - events.get(rid, 0))
                events[rid] = sub.stats.events
                self.metrics.indexed_blocks.labels(rid).set(self.index.num_blocks(rid))
            for r in self.registry:
                self.metrics.breaker_state.labels(r.replica_id).set(r.breaker.value)
            for rid, feed in list(self.digest_feeds.items()):
                self._export_digest(rid, feed, digests)
            await asyncio.sleep(1.0)


    def _export_digest(self, rid: str, feed: DigestFeed, exported: dict[str, int]) -> None:
        m, d = self.metrics, self.digests
        m.digests_received.labels(rid).inc(feed.stats.received - exported.get(rid, 0))
        exported[rid] = feed.stats.received
        age = d.age_s(rid)
        m.digest_age.labels(rid).set(-1.0 if age is None else age)
        latest = d.latest(rid)
        m.digest_bytes.labels(rid).set(d.wire_bytes(rid))
        m.digest_blocks.labels(rid).set(0 if latest is None else latest.num_blocks)
        m.digest_in_use.labels(rid).set(1 if self.digest_in_use(rid) else 0)


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPRequestEntityTooLarge as e:
        return web.json_response(error_body(413, f"request body too large ({e.text}); send a smaller body"),
                                 status=413)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return web.json_response(error_body(e.status, e.reason or "error"), status=e.status)
        raise
    except web.RequestPayloadError as e:  # a body that cannot be read: bad gzip, broken chunking
        return web.json_response(error_body(400, f"the request body could not be read: {e}"), status=400)


def routes(b: Balancer, guard: Guard) -> RouteTable:
    """Every route of balancer `b`, each behind the checks of `guard` that it needs."""
    from balancer import admin

    def forward(ex):
        return b.proxy.forward(ex)

    table = {
        # b.proxy exists once the app has started: bound at call time
        "/v1/completions": {"POST": lambda ex: b.proxy.completions(ex)},
        "/v1/chat/completions": {"POST": lambda ex: b.proxy.chat(ex)},
        # What else a vLLM server serves, forwarded by load (`Proxy.forward`);
        # /v1/models is the fleet's own answer (admin.py).
        "/v1/responses": {"POST": lambda ex: b.proxy.responses(ex)},
        **{path: {"POST": forward} for path in ("/v1/embeddings", *sorted(FORWARDED_PATHS - {"/version"}))},
        "/version": {"GET": forward},
        **admin.routes(b), **index_state.routes(b), **openapi.routes(),
    }
    return RouteTable(table, guard.guarded, fallback=("/v1/", forward))


def create_app(cfg: BalancerConfig, balancer: Balancer | None = None) -> web.Application:
    b = balancer or Balancer(cfg)
    guard = Guard.for_balancer(b)
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[_errors])
    app[BALANCER] = b
    app[GUARD] = guard
    app[ROUTES] = table = routes(b, guard)
    if not cfg.fast_path:  # aiohttp serves the same table, resolved as the front-end does (404, 405, HEAD)
        app.router.add_route("*", "/{path:.*}", web_handler(lambda ex: table.resolve(ex.method, ex.path)(ex)))

    async def lifecycle(app: web.Application):
        await b.start()
        yield
        await b.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
