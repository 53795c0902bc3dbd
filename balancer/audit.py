"""Decision accounting: what the balancer predicted against what the replica delivered.

For every routed request the proxy hands `DecisionAudit.record` the booking (the chosen
replica, the cached prefix the index predicted there, the best prefix any usable replica
offered, the policy's decision with its scores) and the cached tokens the replica reported
(`usage.prompt_tokens_details.cached_tokens`, which kvfleet replicas and vLLM report).

    predicted vs delivered ─▶ histograms and totals per replica (balancer/metrics.py)
    index said hit (>= min_tokens) and the engine delivered < ratio of it ─▶ a mismatch:
        a counter, and a warning naming the request id (at most one per replica per
        `warn_every_s`) — the silent failure of a router and an engine that hash differently
        (cache salt, chat template, tokenizer, prefix caching off)
    the engine delivered a prefix the index did not predict (< ratio of it) ─▶ "unseen": its
        counter and the same warning — the index is blind to that replica (its events skipped,
        e.g. another block size, or lost)
    the last `keep` decisions ─▶ GET /admin/decisions?limit=N

Evictions between routing and serving also make mismatches, so a few are normal; a replica
whose share stays high is misconfigured against the balancer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from balancer.config import AuditConfig
from balancer.metrics import BalancerMetrics
from balancer.router import Booking

log = logging.getLogger("kvfleet.balancer.audit")


@dataclass(frozen=True, slots=True)
class Audited:
    """One routed request as the audit keeps it."""

    at: float  # unix time
    request_id: str
    path: str
    booking: Booking
    status: int
    delivered: int | None  # cached tokens the replica reported (None: it reported none)
    mismatch: bool

    def to_json(self) -> dict:
        b = self.booking
        rr = b.rr
        best_id, best_blocks = max(rr.matched_blocks.items(), key=lambda kv: kv[1], default=(None, 0))
        return {
            "request_id": self.request_id, "time": round(self.at, 3), "path": self.path, "status": self.status,
            "replica": b.replica_id, "prompt_tokens": rr.prompt_tokens,
            "predicted_cached_tokens": b.matched_tokens,
            "best_offered": {"replica": best_id, "cached_tokens": min(best_blocks * rr.block_size, rr.prompt_tokens)},
            "delivered_cached_tokens": self.delivered, "mismatch": self.mismatch,
            "reason": b.decision.reason, "scores": b.decision.scores,
        }


class DecisionAudit:
    def __init__(self, cfg: AuditConfig, metrics: BalancerMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.recent: deque[Audited] = deque(maxlen=cfg.keep)
        self._warned: dict[str, float] = {}  # replica -> monotonic time of its last warning

    def record(self, request_id: str, path: str, booking: Booking, status: int, delivered: int | None) -> None:
        cfg, m = self.cfg, self.metrics
        predicted = booking.matched_tokens
        rid = booking.replica_id
        mismatch = False
        if delivered is not None:
            m.series(m.predicted_cached_hist, rid).observe(predicted)
            m.series(m.delivered_cached_hist, rid).observe(delivered)
            m.series(m.cache_accounted, rid).inc()
            mismatch = predicted >= cfg.mismatch_min_tokens and delivered < cfg.mismatch_ratio * predicted
            unseen = delivered >= cfg.mismatch_min_tokens and predicted < cfg.mismatch_ratio * delivered
            if mismatch:
                m.series(m.cache_mismatch, rid).inc()
                self._warn(rid, request_id, predicted, delivered,
                           "the balancer and the replica hash differently, or the replica does not cache")
            elif unseen:  # the engine had it, the index did not know: its events do not reach the index
                m.series(m.cache_unseen, rid).inc()
                self._warn(rid, request_id, predicted, delivered,
                           "the index does not see what the replica caches (its KV events are skipped or lost: "
                           "`kvfleet_kv_events_total`, GET /admin/index)")
        if self.recent.maxlen:
            self.recent.append(Audited(time.time(), request_id, path, booking, status, delivered, mismatch))

    def _warn(self, rid: str, request_id: str, predicted: int, delivered: int, likely: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(rid, -1e18) < self.cfg.warn_every_s:
            return
        self._warned[rid] = now
        log.warning("cache mismatch on %s: request %s was routed there for %d cached prompt tokens, the replica "
                    "reported %d; if this repeats, %s: check --block-size, the tokenizer, cache_salt and the "
                    "replica's prefix caching; GET /admin/decisions shows the latest decisions", rid, request_id,
                    predicted, delivered, likely,
                    extra={"fields": {"request_id": request_id, "replica": rid, "predicted_cached_tokens": predicted,
                                      "delivered_cached_tokens": delivered}})

    def latest(self, limit: int) -> list[dict]:
        """The newest `limit` decisions, newest first."""
        out = []
        for d in reversed(self.recent):
            if len(out) >= limit:
                break
            out.append(d.to_json())
        return out

    def forget_replica(self, replica_id: str) -> None:
        self._warned.pop(replica_id, None)
