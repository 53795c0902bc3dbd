"""Load-aware sticky sessions: a conversation stays on its replica while that replica is not
overloaded, and moves (remembered at its new home) when it is overloaded or gone.

A request carries a session key in a header (`SessionConfig.header`, default `X-Session-Id`)
or, failing that, in the OpenAI `user` field. `Router.choose` hands such a request to
`Sessions.decide` instead of straight to the policy; whatever policy runs, the session logic
sits at that one seam (live and in the simulator alike):

    home = table[key] (fresh: used within ttl_s)
    home usable and not overloaded ─▶ stuck            (unless "followed", below)
    home overloaded                ─▶ moved_overloaded ─▶ place among the others
    home not usable (removed, unhealthy, draining, breaker open, failed this request)
                                   ─▶ moved_gone       ─▶ place among the others
    no home                        ─▶ new              ─▶ place
    place: the eligible replica (usable, not overloaded) that alone holds the most leading
           blocks of the prompt, at least `evidence_share` of them (the session's own earlier
           turns, by the KV events) ─▶ there; else the policy's choice among the eligible
    Booking made ─▶ table[key] = that replica (its TTL restarts)

Several balancers, no coordination: each derives the same home from shared state. The index
is fed by the replicas' own KV events, so a turn served through balancer A leaves its blocks
where every balancer sees them; a balancer that does not know the session (it never routed it,
restarted, its entry expired) finds the home as the replica holding the session's latest
prefix, and a balancer whose remembered home is stale (the session moved elsewhere) sees
another eligible replica holding strictly more of the prompt than its home and follows it
(`followed`). The table is a cache any instance rebuilds from events. Overload is judged from
the replicas' load reports (the same for every balancer) plus this balancer's sends since the
last report (a few ms of its own traffic), so balancers agree up to that.

Overloaded (`Sessions.overloaded`), each against the mean over the usable replicas:
- requests: reported running + waiting + sent since the report > overload_factor × mean, and
  at least overload_min_requests (a replica without load reports: this balancer's in-flight);
- queued prefill: reported queued prefill tokens + uncached tokens sent since the report >
  overload_factor × mean, and at least overload_min_queued_tokens (the wait a new turn faces);
- memory: reported KV usage (blocks held by running requests) >= overload_kv_usage.

TTL without a task per session: the table is ordered by last use, so the expired entries are
at its front; every lookup drops them first (amortised O(1)). `max_sessions` bounds it (the
least recently used goes). `release` forgets a session at once (`DELETE /admin/sessions`, or a
request whose `release_header` is true: its last turn, routed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from balancer.policies.base import Decision, ReplicaView, RoutingRequest
from protocol.openai_api import APIError, GenerationRequest

OUTCOMES = ("new", "stuck", "followed", "moved_overloaded", "moved_gone")
ENDINGS = ("expired", "released", "evicted")
_INF = float("inf")


@dataclass(frozen=True)
class SessionConfig:
    """Sticky sessions (balancer/sessions.py). Off by default: on, a request with a session key
    keeps to its replica."""

    enabled: bool = False
    header: str = "X-Session-Id"  # the session key's header
    release_header: str = "X-Session-Release"  # `true` on a request: forget its session once it is routed
    user_field: bool = True  # the OpenAI `user` field is the key when the header is absent
    ttl_s: float = 1800.0  # a session unused this long is forgotten
    max_sessions: int = 100_000  # beyond this, the least recently used session is forgotten
    max_key_length: int = 256  # a longer header is refused (400); a longer `user` is no key
    overload_factor: float = 2.0  # overloaded: above this multiple of the fleet mean ...
    overload_min_requests: int = 4  # ... and at least this many requests running + waiting
    overload_min_queued_tokens: int = 4096  # ... or at least this many queued prefill tokens
    overload_kv_usage: float = 0.95  # or KV blocks in use at least this share
    # A replica is the session's home by evidence when it alone holds the most leading blocks
    # of the prompt and they are at least this share of the prompt's blocks (a later turn
    # carries the earlier ones; a shared system prompt alone seldom reaches it).
    evidence_share: float = 0.5

    def __post_init__(self) -> None:
        for name in (self.header, self.release_header):
            if not isinstance(name, str) or not name or any(c in name for c in " :\r\n"):
                raise ValueError(f"sessions.header and release_header must be HTTP header names, got {name!r}")
        if not self.ttl_s > 0:
            raise ValueError(f"sessions.ttl_s must be positive (seconds), got {self.ttl_s}")
        if self.max_sessions < 1 or self.max_key_length < 1:
            raise ValueError("sessions.max_sessions and sessions.max_key_length must be at least 1")
        if not self.overload_factor >= 1:
            raise ValueError(f"sessions.overload_factor must be >= 1 (a multiple of the fleet mean), got "
                             f"{self.overload_factor}")
        if self.overload_min_requests < 1 or self.overload_min_queued_tokens < 1:
            raise ValueError("sessions.overload_min_requests and overload_min_queued_tokens must be at least 1")
        if not 0 < self.overload_kv_usage <= 1 or not 0 < self.evidence_share <= 1:
            raise ValueError("sessions.overload_kv_usage and evidence_share must be in (0, 1]")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass(slots=True)
class Home:
    """Where a session lives now."""

    replica_id: str
    since: float  # clock time it was placed there
    used_at: float  # clock time of its last routed request
    routed: int = 0  # requests routed for it (all homes)


class SessionDecision(Decision):
    """A decision made for a session: the replica, and what `Router.book` records for it."""

    __slots__ = ("key", "outcome", "previous")

    def __init__(self, replica_id: str, key: str, outcome: str, previous: str | None, reason, scores=None,
                 warm: tuple[str, int] | None = None) -> None:
        super().__init__(replica_id, reason, scores, warm)
        self.key, self.outcome, self.previous = key, outcome, previous


class Sessions:
    """The session table and the session decision. No I/O, no clock of its own (`now` is given)."""

    def __init__(self, cfg: SessionConfig) -> None:
        self.cfg = cfg
        self._homes: OrderedDict[str, Home] = OrderedDict()  # least recently used first
        self.routed = dict.fromkeys(OUTCOMES, 0)
        self.ended = dict.fromkeys(ENDINGS, 0)

    # ------------------------------------------------------------------ the key
    def key_of(self, header: Callable[[str], str | None], req: GenerationRequest) -> str | None:
        """The request's session key: the header, else the `user` field; None when sessions
        are off or the request has none. A header longer than max_key_length is refused."""
        if not self.cfg.enabled:
            return None
        key = header(self.cfg.header)
        if key:
            if len(key) > self.cfg.max_key_length:
                raise APIError(400, f"the {self.cfg.header} header is {len(key)} characters long; send a session "
                                    f"key of at most {self.cfg.max_key_length}", self.cfg.header)
            return key
        user = req.user if self.cfg.user_field else None
        return user if user and len(user) <= self.cfg.max_key_length else None

    def releases(self, header: Callable[[str], str | None]) -> bool:
        """Whether the request asks to end its session (the release header is true)."""
        value = header(self.cfg.release_header)
        if value is None or value.strip().lower() in ("0", "false", "no", ""):
            return False
        if value.strip().lower() in ("1", "true", "yes"):
            return True
        raise APIError(400, f"the {self.cfg.release_header} header must be true or false, got {value[:40]!r}",
                       self.cfg.release_header)

    # ------------------------------------------------------------------ the table
    def __len__(self) -> int:
        return len(self._homes)

    def active(self, now: float) -> int:
        self.expire(now)
        return len(self._homes)

    def expire(self, now: float) -> None:
        """Forget the sessions unused for ttl_s (the oldest are first)."""
        homes, cutoff = self._homes, now - self.cfg.ttl_s
        while homes:
            key, home = next(iter(homes.items()))
            if home.used_at > cutoff:
                return
            del homes[key]
            self.ended["expired"] += 1

    def get(self, key: str, now: float) -> Home | None:
        self.expire(now)
        return self._homes.get(key)

    def release(self, key: str) -> Home | None:
        """Forget session `key` now (its next request is a new session)."""
        home = self._homes.pop(key, None)
        if home is not None:
            self.ended["released"] += 1
        return home

    def homes(self, now: float, limit: int) -> list[tuple[str, Home]]:
        """The `limit` most recently used sessions, newest first."""
        self.expire(now)
        out = []
        for key in reversed(self._homes):
            if len(out) >= limit:
                break
            out.append((key, self._homes[key]))
        return out

    def record(self, d: SessionDecision, now: float) -> None:
        """Request routed by `d` was booked: its session lives on d.replica_id from now."""
        self.routed[d.outcome] += 1
        homes = self._homes
        home = homes.get(d.key)
        if home is None:
            home = homes[d.key] = Home(d.replica_id, now, now)
            while len(homes) > self.cfg.max_sessions:
                homes.popitem(last=False)
                self.ended["evicted"] += 1
        else:
            homes.move_to_end(d.key)
            if home.replica_id != d.replica_id:
                home.replica_id, home.since = d.replica_id, now
            home.used_at = now
        home.routed += 1

    # ------------------------------------------------------------------ the decision
    def overloaded(self, views: Sequence[ReplicaView]) -> set[str]:
        """The replicas among `views` (the usable ones) that are overloaded (module docstring)."""
        cfg = self.cfg
        n = len(views)
        requests = [_requests(v) for v in views]
        queued = [v.load.queued_prefill_tokens + v.sent_tokens_since_report for v in views]
        req_bar = cfg.overload_factor * sum(requests) / n
        queue_bar = cfg.overload_factor * sum(queued) / n
        return {v.replica_id for v, r, q in zip(views, requests, queued)
                if (r > req_bar and r >= cfg.overload_min_requests)
                or (q > queue_bar and q >= cfg.overload_min_queued_tokens)
                or (v.load.age_s != _INF and v.load.kv_usage >= cfg.overload_kv_usage)}

    def holder(self, rr: RoutingRequest, views: Sequence[ReplicaView]) -> str | None:
        """The replica among `views` that alone holds the most leading blocks of the prompt,
        if they are at least evidence_share of its blocks; None otherwise."""
        matched = rr.matched_blocks
        if not matched or not rr.block_hashes:
            return None
        best, who, tied = 0, None, False
        for v in views:
            m = matched.get(v.replica_id, 0)
            if m > best:
                best, who, tied = m, v.replica_id, False
            elif m == best and m:
                tied = True
        if who is None or tied or best < self.cfg.evidence_share * len(rr.block_hashes):
            return None
        return who

    def decide(self, key: str, rr: RoutingRequest, views: Sequence[ReplicaView],
               select: Callable[[RoutingRequest, Sequence[ReplicaView]], Decision]) -> SessionDecision:
        """The replica for a request of session `key` among `views` (usable, non-empty); records
        nothing (`record` does, once booked). `select` is the policy's choice."""
        home = self.get(key, rr.now)
        over = self.overloaded(views)
        eligible = [v for v in views if v.replica_id not in over]
        outcome, previous = "new", None
        if home is not None:
            previous = home.replica_id
            here = next((v for v in views if v.replica_id == previous), None)
            others = [v for v in eligible if v.replica_id != previous]
            if here is not None and (previous not in over or not others):
                holder = self.holder(rr, eligible or views)
                if holder is not None and holder != previous:
                    return SessionDecision(holder, key, "followed", previous,
                                           lambda: f"session {key!r}: {holder} holds more of its prompt than "
                                                   f"{previous} (moved by another balancer)")
                why = "overloaded, but no other replica is usable and not overloaded" if previous in over \
                    else "not overloaded"
                return SessionDecision(previous, key, "stuck", previous,
                                       lambda: f"session {key!r}: its home {previous} is {why}")
            outcome = "moved_gone" if here is None else "moved_overloaded"
            eligible = others
        eligible = eligible or views  # every usable replica is overloaded: place among them all
        holder = self.holder(rr, eligible)
        def where() -> str:
            return "" if previous is None else \
                f" (was on {previous}: {'gone' if outcome == 'moved_gone' else 'overloaded'})"

        if holder is not None:
            return SessionDecision(holder, key, outcome, previous,
                                   lambda: f"session {key!r}{where()}: {holder} holds {rr.matched_blocks[holder]} "
                                           f"of its {len(rr.block_hashes)} prompt blocks")
        d = select(rr, eligible)  # the policy's placement, with the warm-up it may ask for (`replicate`)
        return SessionDecision(d.replica_id, key, outcome, previous,
                               lambda: f"session {key!r}{where()}: policy: {d.reason}", lambda: d.scores, d.warm)


def _requests(v: ReplicaView) -> int:
    """Requests on replica v: its report's running + waiting and this balancer's sends since;
    this balancer's in-flight count while it has never reported."""
    if v.load.age_s == _INF:
        return v.inflight_requests
    return v.load.num_running + v.load.num_waiting + v.sent_since_report


# ---------------------------------------------------------------------------------------- CLI
_FLAG_HELP = {  # field -> help; each is --session-<field> (the config file's [sessions] table has the same keys)
    "header": "the header carrying the session key",
    "release_header": "a request with this header set to true ends its session once routed (as DELETE "
                      "/admin/sessions?key=... does)",
    "ttl_s": "forget a session unused this many seconds",
    "max_sessions": "sessions remembered at most (the least recently used is forgotten)",
    "max_key_length": "longest session key; a longer header is refused with 400, a longer `user` is no key",
    "overload_factor": "a session's home is overloaded above this multiple of the fleet mean (requests running + "
                       "waiting, or queued prefill tokens); the session then moves",
    "overload_min_requests": "... and only with at least this many requests running + waiting",
    "overload_min_queued_tokens": "... or at least this many queued prefill tokens",
    "overload_kv_usage": "a home whose KV blocks in use reach this share is overloaded too",
    "evidence_share": "a replica is a session's home by its KV events when it alone holds the most leading blocks "
                      "of the prompt, at least this share of them",
}


def add_arguments(p) -> None:
    d = SessionConfig()
    g = p.add_argument_group("sticky sessions (balancer/sessions.py)")
    g.add_argument("--sessions", action="store_true", default=None,
                   help=f"keep a conversation on its replica while that replica is not overloaded: the session key "
                        f"is the {d.header} header (--session-header), else the request's OpenAI `user` field; "
                        "GET/DELETE /admin/sessions list and release sessions")
    g.add_argument("--no-session-user-field", action="store_true",
                   help="do not take the OpenAI `user` field as the session key (the header only)")
    for name, text in _FLAG_HELP.items():
        default = getattr(d, name)
        g.add_argument("--session-" + name.replace("_", "-"), dest="session_" + name, type=type(default),
                       default=None, metavar={str: "NAME", int: "N", float: "X"}[type(default)],
                       help=f"{text} (default {default})")


def apply_arguments(cfg, args):
    """`cfg` (a BalancerConfig) with the session flags given in `args` applied over it."""
    from dataclasses import replace

    given = {name: getattr(args, "session_" + name) for name in _FLAG_HELP
             if getattr(args, "session_" + name, None) is not None}
    if getattr(args, "sessions", None):
        given["enabled"] = True
    if getattr(args, "no_session_user_field", False):
        given["user_field"] = False
    return replace(cfg, sessions=replace(cfg.sessions, **given)) if given else cfg
