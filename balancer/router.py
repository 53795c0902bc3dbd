"""From a validated request to a booked replica: tokenize, hash, look up, score, record.

`Router.prepare` does the per-request work once (render the chat template, tokenize, hash the
full blocks). `Router.route` is the routing transaction, the one way a request is placed:

    route(prepared, request_id, exclude, split) ─▶ usable replicas (Registry.usable) ─▶ match
        (exact index for replicas that publish KV events, their cache digest for those routed
        from digests, approximate index for the rest) ─▶ predict output ─▶ candidates
        (narrowings: a LoRA adapter's holders)
        ─▶ pairs (only with `split`, a pair selector and a fleet with prefill/decode roles:
           balancer/disagg.py's prefill side, then its decode side — through the session rule
           for a request in a session; no pair possible: on to the policy, same views)
        ─▶ policy.select
        (a request with a session key: `Sessions.decide`, which keeps it on its home or moves it,
        asking the policy only where it places one: balancer/sessions.py)
        ─▶ record: registry in-flight work, policy.on_routed, session home, approximate-index insert
        ─▶ Booking (a split pair: `PairBooking`, one booking per side)
    Booking.finish(output_tokens) / Booking.fail(): in-flight work released, policy.on_complete,
        the output-length predictor learns (finish with a known length)

The proxy (first attempt, retries, mid-stream failover, the prefill/decode legs) and the
simulator call only `route` and the booking's `finish` / `fail`, so the same request stream
makes the same bookings in both (tests/test_booking.py). `Router.choose` is the decision alone,
recording nothing (`explain`). Nothing here does I/O.

Several uncoordinated instances (`consistent`, BalancerConfig.consistent_routing): the views
the policy scores hold only what every instance fed by the same KV events and load reports sees
alike (Registry.views' `shared_only`), and the policy is told to read none of its own routing
history (RoutingRequest.consistent) and no learned output-length prediction (each instance's
predictor learns from the requests it served), so any instance picks the same replica for the
same request; this instance's sends are still booked, but counted only once a report holds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import xxhash

from balancer.approx_index import ApproxIndex
from balancer.digest_index import DigestIndex
from balancer.disagg import PairDecision, PairSelector
from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest, adapter_candidates
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry, ReplicaState
from balancer.sessions import SessionDecision, Sessions
from protocol.hashing import hash_blocks, root_hash, token_bytes
from protocol.openai_api import GenerationRequest
from protocol.roles import BOTH, can_decode
from protocol.tokenizer import CHAT_ROLES, apply_chat_template


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request as the router sees it; built once, reused across retries."""

    request: GenerationRequest
    token_ids: tuple[int, ...]
    prompt_text: str
    block_hashes: tuple[int, ...]
    first_user_message: str | None
    rng_seed: int
    extra_prompt_tokens: int = 0  # a batched prompt's prompts after the first (routed by the first)
    lora_name: str | None = None  # the request's `model` when a replica lists it as a LoRA adapter
    session: str | None = None  # the session key (balancer/sessions.py); None: not in a session


def _routing_text(messages) -> str:
    """The chat template applied to `messages` for hashing. The balancer does not judge a chat
    body (its replica does): messages this template cannot render (an unknown role, image
    parts) are rendered from their text alone, so the request still routes by load and by
    whatever prefix the text shares."""
    try:
        return apply_chat_template(list(messages))
    except ValueError:
        pass
    plain = []
    for m in messages:
        role = m.get("role")
        c = m.get("content")
        if isinstance(c, list):
            c = "".join(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        plain.append({"role": role if role in CHAT_ROLES else "user", "content": c if isinstance(c, str) else ""})
    return apply_chat_template(plain)


def _first_user_text(messages) -> str | None:
    for m in messages:
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c)
    return None


@dataclass(slots=True, eq=False)
class Booking:
    """One request placed on one replica, and the work recorded for it until it ends.

    `tokens` is the in-flight work the registry counts (prompt + the client's max_tokens: the
    same estimate live and simulated; the true output length is never known in advance) and
    `uncached_tokens` the prompt tokens the index says the replica must compute. End it exactly
    once, with `finish` (the replica served it) or `fail` (it did not); later calls do nothing.
    """

    router: "Router"
    rr: RoutingRequest
    decision: Decision
    replica: ReplicaState
    tokens: int
    matched_tokens: int
    open: bool = field(default=True)
    by_policy: bool = True  # False: placed by load alone (`Router.route_by_load`), unknown to the policy
    # The warm-up the decision asked for (Decision.warm), booked beside this request: the caller
    # sends `warm.prepared` as a prefill-only request (max_tokens 1) to `warm.booking`'s replica
    # and ends that booking when it returns. None: none.
    warm: "WarmUp | None" = None

    @property
    def replica_id(self) -> str:
        return self.replica.replica_id

    @property
    def uncached_tokens(self) -> int:
        return max(0, self.rr.prompt_tokens - self.matched_tokens) + self.rr.extra_prefill_tokens

    def finish(self, output_tokens: int | None = None, ok: bool = True) -> None:
        """The request ended on its replica, having generated `output_tokens` (None: unknown).
        `ok=False`: it ended without a usable answer (the client left, the stream broke)."""
        if not self.open:
            return
        self.open = False
        router = self.router
        router.registry.on_done(self.replica, self.tokens)
        if not self.by_policy:
            return
        router.policy.on_complete(self.rr, self.replica.replica_id, ok)
        if ok and output_tokens is not None and router.predictor is not None and not self.rr.warmup:
            router.predictor.observe_done(self.rr, output_tokens)

    def fail(self) -> None:
        """The replica did not serve the request (refused, reset, 5xx before any byte)."""
        self.finish(None, ok=False)


@dataclass(frozen=True, slots=True)
class WarmUp:
    """A prefill-only request the router booked to compute a prompt prefix on another replica:
    `prepared` is the prefix (its request asks for one token), `booking` its place."""

    booking: Booking
    prepared: Prepared


class DecodeBooking(Booking):
    """The decode side of a split pair: ending it with a known length teaches the router's
    output-length predictor, as a routed request's booking does (a split request is never shown
    to the policy, but its output length is the same evidence)."""

    def finish(self, output_tokens: int | None = None, ok: bool = True) -> None:
        was_open = self.open
        super().finish(output_tokens, ok)
        predictor = self.router.predictor
        if was_open and ok and output_tokens is not None and predictor is not None:
            predictor.observe_done(self.rr, output_tokens)


class PairBooking(NamedTuple):
    """A request placed by the pair stage: one `Booking` per side (the same booking twice when
    unified: booked as any routed request). End `prefill` when the prefill replica handed over
    (or failed), `decode` when the request ends; each ends once."""

    decision: PairDecision
    prefill: Booking
    decode: Booking

    @property
    def unified(self) -> bool:
        return self.prefill is self.decode


class Router:
    def __init__(
        self,
        model: str,
        block_size: int,
        tokenizer,
        index: PrefixIndex,
        approx: ApproxIndex,
        policy: Policy,
        registry: Registry,
        has_events: Callable[[str], bool],
        predictor=None,
        clock: Callable[[], float] = time.monotonic,
        lora_slack: int = 8,
        digests: DigestIndex | None = None,
        uses_digest: Callable[[str], bool] = lambda rid: False,
        sessions: Sessions | None = None,
        consistent: bool = False,
        pairs: PairSelector | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.tokenizer = tokenizer
        self.index = index
        self.approx = approx
        self.policy = policy
        self.registry = registry
        self.has_events = has_events  # replica id -> True if its KV events (or digests) feed the index
        # Replicas whose cached prefix comes from their latest cache digest instead of `index`
        # (balancer/digest_index.py; BalancerConfig.index_source): uses_digest(replica id).
        self.digests = digests
        self.uses_digest = uses_digest
        # Only a policy that reads predicted output lengths gets them (and pays for them). With
        # `consistent` none does: a predictor learns from the requests this instance served, so
        # two instances predict the same request differently (by 2-8x on the Mooncake trace,
        # docs/benchmarks.md); the policy then reads the client's max_tokens or its default.
        self.predictor = predictor if policy.uses_predicted_output and not consistent else None
        # Several uncoordinated instances (BalancerConfig.consistent_routing): decisions from the
        # shared reports and events alone (`views`, RoutingRequest.consistent); the bookkeeping
        # of this instance's sends is still kept (metrics, drain, route_by_load) but not read.
        self.consistent = consistent
        self.clock = clock
        self.sessions = sessions  # sticky sessions: requests with a session key keep to their replica
        # Prefill/decode pairs (balancer/disagg.py) for the requests routed with `split`, once the
        # registry knows replicas of a single role; None: every request is routed whole.
        self.pairs = pairs
        # A request for a LoRA adapter goes to a replica holding it unless those are this many
        # requests in flight busier than one that is not (`adapter_candidates`).
        self.lora_slack = lora_slack
        # The candidate stage (`candidates`): narrowings of the usable replicas' views, in order,
        # each pure, (rr, views) -> views, returning `views` itself when it keeps them all. Fixed
        # here from what the policy prices itself, so `decide` has no special case for them.
        self._narrowings: tuple[Callable[[RoutingRequest, Sequence[ReplicaView]], Sequence[ReplicaView]], ...] = (
            () if policy.prices_adapter_load else (self._adapter_holders,))
        self._roots: dict[tuple[str | None, str | None], int] = {(None, None): root_hash(model)}

    def _root(self, salt: str | None, lora_name: str | None = None) -> int:
        root = self._roots.get((salt, lora_name))
        if root is None:
            if len(self._roots) > 4096:  # salts are the clients': bounded
                self._roots.clear()
            root = self._roots[(salt, lora_name)] = root_hash(self.model, salt, lora_name)
        return root

    def prepare(self, req: GenerationRequest, session: str | None = None) -> Prepared:
        first_user = None
        if req.kind == "chat":
            text = _routing_text(req.messages)
            tokens = self.tokenizer.encode(text)
            first_user = _first_user_text(req.messages)
        elif req.prompt_token_ids is not None:
            tokens = list(req.prompt_token_ids)
            text = self.tokenizer.decode(tokens)
        else:
            text = req.prompt
            tokens = self.tokenizer.encode(text)
        return self.prepare_tokens(req, tokens, text, first_user_message=first_user, session=session)

    def prepare_tokens(self, req: GenerationRequest, tokens: Sequence[int], text: str,
                       hashes: Sequence[int] | None = None, first_user_message: str | None = None,
                       session: str | None = None) -> Prepared:
        """`prepare` for a prompt already tokenized (and maybe hashed: the simulator hashes
        each trace prompt once for all its runs)."""
        lora = req.model if self.registry.is_adapter(req.model) else None
        if hashes is None:
            hashes = hash_blocks(tokens, self.block_size, self._root(req.cache_salt, lora))
        seed = hashes[-1] if hashes else xxhash.xxh3_64_intdigest(token_bytes(list(tokens)))
        extra = sum(len(p) if isinstance(p, tuple) else len(self.tokenizer.encode(p)) for p in req.more_prompts)
        return Prepared(req, tuple(tokens), text, tuple(hashes), first_user_message, seed, extra, lora, session)

    def routing_request(self, p: Prepared, request_id: str,
                        predicted_output_tokens: float | None = None) -> RoutingRequest:
        """What the policy sees of `p`: the cached prefix per replica and the predicted output
        length (`predicted_output_tokens` overrides the predictor: the simulator's oracle mode)."""
        matched = self.index.match(p.block_hashes)
        offloaded = self.index.match_offloaded(p.block_hashes, matched)  # {} without lower tiers
        if self.digests is not None:
            self.digests.overlay(matched, p.block_hashes, self.uses_digest)
            for rid in [rid for rid in offloaded if self.uses_digest(rid)]:
                del offloaded[rid]  # a digest describes one tier: its replicas' index entries are unused
        on_disk = self.index.match_disk(p.block_hashes, matched, offloaded)  # {} without a disk tier
        approx = self.approx.match(p.block_hashes, self.clock())
        for rid, n in approx.items():
            if not self.has_events(rid):
                matched[rid] = max(n, matched.get(rid, 0))
        predicted = predicted_output_tokens
        if predicted is None and self.predictor is not None:
            predicted = self.predictor.predict_point(p)
        return RoutingRequest(
            request_id=request_id,
            prompt_text=p.prompt_text,
            prompt_tokens=len(p.token_ids),
            block_hashes=p.block_hashes,
            block_size=self.block_size,
            matched_blocks=matched,
            max_tokens=p.request.max_tokens,
            predicted_output_tokens=predicted,
            first_user_message=p.first_user_message,
            now=self.clock(),
            rng_seed=p.rng_seed,
            sequences=p.request.n * (1 + len(p.request.more_prompts)),
            extra_prefill_tokens=p.extra_prompt_tokens,
            lora_name=p.lora_name,
            offloaded_blocks=offloaded,
            offloaded_disk_blocks=on_disk,
            consistent=self.consistent,
        )

    def candidates(self, rr: RoutingRequest, usable: Sequence[ReplicaState]) -> Sequence[ReplicaView]:
        """The views of the `usable` replicas (Registry.usable: healthy, serving the model, not
        excluded) that `rr` may go to: every narrowing applied (a request for a LoRA adapter:
        the replicas holding it, within `lora_slack`, unless the policy prices the load itself)."""
        views: Sequence[ReplicaView] = self.views(usable)
        for narrow in self._narrowings:
            views = narrow(rr, views)
        return views

    def views(self, usable: Sequence[ReplicaState]) -> list[ReplicaView]:
        """The policy's views of `usable` (only shared state with `consistent`: Registry.views)."""
        return self.registry.views(usable, self._cached_blocks, self.consistent)

    def _adapter_holders(self, rr: RoutingRequest, views: Sequence[ReplicaView]) -> Sequence[ReplicaView]:
        return views if rr.lora_name is None else adapter_candidates(rr, views, self.lora_slack)

    def decide(self, rr: RoutingRequest, candidates: Sequence[ReplicaState], session: str | None = None,
               split: bool = False) -> Decision:
        """The policy's choice among `self.candidates(rr, candidates)`; for a request in a session,
        the session rule's (balancer/sessions.py), which asks the policy where it places one.
        With `split` on a fleet of prefill/decode roles, first the pair stage's (`_pair`): a
        `PairDecision`."""
        views = self.candidates(rr, candidates)
        if split and self.pairs is not None and self.registry.disaggregated:
            d = self._pair(rr, views, self.registry.roles(), session)
            if d is not None:
                return d
        if session is not None and self.sessions is not None:
            return self.sessions.decide(session, rr, views, self.policy.select)
        return self.policy.select(rr, views)

    def _pair(self, rr: RoutingRequest, views: Sequence[ReplicaView], roles, session: str | None) -> Decision | None:
        """The pair stage: the prefill side by prefix hit and queue, then the decode side among
        the views that can decode — for a request in a session by `Sessions.decide`, the pair
        selector's decode choice being its policy, so the conversation keeps to its decode
        replica, which holds its whole KV. None when no pair can be formed."""
        pairs = self.pairs
        prefill = pairs.prefill_side(rr, views, roles)
        dec = [v for v in views if can_decode(roles.get(v.replica_id, BOTH))]
        if prefill is None or not dec:
            return None

        def decode_side(rr: RoutingRequest, views: Sequence[ReplicaView]) -> Decision:
            return pairs.decode_side(rr, views, prefill)

        if session is not None and self.sessions is not None:
            decode = self.sessions.decide(session, rr, dec, decode_side)
        else:
            decode = decode_side(rr, dec)
        return PairDecision(prefill, decode)

    def _cached_blocks(self, replica_id: str) -> int:
        if not self.has_events(replica_id):
            return 0
        if self.digests is not None and self.uses_digest(replica_id) and self.digests.fresh(replica_id):
            return self.digests.num_blocks(replica_id)
        return self.index.num_blocks(replica_id)

    def choose(self, p: Prepared, request_id: str, exclude: frozenset[str] = frozenset(),
               predicted_output_tokens: float | None = None, split: bool = False
               ) -> tuple[RoutingRequest | None, list[ReplicaState], Decision | None]:
        """The decision for `p` among the usable replicas not in `exclude`, recording nothing:
        (routing request, candidates, decision); (None, [], None) when no replica is usable.
        `split`: the request may go through a prefill/decode pair (`decide`)."""
        candidates = self.registry.usable(exclude, p.request.model)
        if not candidates:
            return None, candidates, None
        rr = self.routing_request(p, request_id, predicted_output_tokens)
        return rr, candidates, self.decide(rr, candidates, p.session, split)

    def route(self, p: Prepared, request_id: str, exclude: frozenset[str] = frozenset(),
              predicted_output_tokens: float | None = None, split: bool = False, warmups: bool = False
              ) -> Booking | PairBooking | None:
        """Choose a replica for `p` and record the choice (see the module docstring); None when
        no replica is usable. The caller sends the request and ends the booking. With `split`
        (a request a prefill/decode pair can serve: balancer/handover.py's `wanted`) the answer
        is a `PairBooking` when the pair stage placed it (split, or kept whole: `unified`), a
        `Booking` when no pair could be formed (routed by the policy, in the same transaction).
        `warmups`: the caller sends the warm-up a decision may ask for (`Booking.warm`); False:
        none is booked."""
        rr, _, decision = self.choose(p, request_id, exclude, predicted_output_tokens, split)
        return None if decision is None else self.book(p, rr, decision, warmups)

    def book(self, p: Prepared, rr: RoutingRequest, decision: Decision, warmups: bool = False
             ) -> Booking | PairBooking:
        """Record `decision` (made by `choose` for `p`): the second half of `route`."""
        if isinstance(decision, PairDecision):
            if decision.unified:  # booked as the request routed whole that it is (policy, session)
                booking = self.book(p, rr, decision.decode_side, warmups)
                return PairBooking(decision, booking, booking)
            return self._book_pair(p, rr, decision)
        replica = self.registry.get(decision.replica_id)
        matched = rr.matched_blocks.get(decision.replica_id, 0) * rr.block_size
        work = rr.prompt_tokens + rr.extra_prefill_tokens + (p.request.max_tokens or 0) * rr.sequences
        booking = Booking(self, rr, decision, replica, work, matched)
        self.registry.on_sent(replica, booking.tokens, booking.uncached_tokens)
        # The policy and the approximate index learn of it now: the next decision, maybe for a
        # request already waiting in this loop turn, must see it.
        self.policy.on_routed(rr, decision)
        if isinstance(decision, SessionDecision):
            self.sessions.record(decision, rr.now)
        if not self.has_events(decision.replica_id):
            self.approx.record(decision.replica_id, rr.block_hashes, self.clock())
        if warmups and decision.warm is not None:
            booking.warm = self._book_warm(p, rr, *decision.warm)
        return booking

    def _book_warm(self, p: Prepared, rr: RoutingRequest, replica_id: str, n: int) -> WarmUp | None:
        """Book the warm-up of `p`'s first n blocks on `replica_id` (Decision.warm) like any request."""
        if self.registry.get(replica_id) is None or n < 1:
            return None
        tokens = p.token_ids[:n * self.block_size]
        prefix = replace(p, request=replace(p.request, max_tokens=1, n=1, more_prompts=()), token_ids=tokens,
                         block_hashes=p.block_hashes[:n], extra_prompt_tokens=0, session=None)
        warm_rr = RoutingRequest(request_id=f"{rr.request_id}/warm", prompt_text="", prompt_tokens=len(tokens),
                                 block_hashes=prefix.block_hashes, block_size=self.block_size,
                                 matched_blocks={replica_id: min(rr.matched_blocks.get(replica_id, 0), n)},
                                 max_tokens=1, predicted_output_tokens=1.0, now=rr.now, rng_seed=rr.rng_seed,
                                 lora_name=rr.lora_name, warmup=True)
        return WarmUp(self.book(prefix, warm_rr, Decision(replica_id, "warm-up")), prefix)

    def _book_pair(self, p: Prepared, rr: RoutingRequest, d: PairDecision) -> PairBooking:
        """Book a split pair: the prefill side with the prompt as its work and its uncached tokens
        as its queued prefill, the decode side with prompt + max_tokens as its work and no
        prefill (its KV arrives), but the prompt's blocks taken: counted as sent tokens, which
        the decode side reads as memory spoken for. Neither is shown to the policy (it chose
        neither: `by_policy=False`); the session (if any) lives on the decode side from now."""
        registry = self.registry
        pstate, dstate = registry.get(d.prefill), registry.get(d.decode)
        prompt = rr.prompt_tokens + rr.extra_prefill_tokens
        matched = rr.matched_blocks.get(pstate.replica_id, 0) * rr.block_size
        pre = Booking(self, rr, d.prefill_side, pstate, prompt, matched, by_policy=False)
        registry.on_sent(pstate, pre.tokens, pre.uncached_tokens)
        work = prompt + (p.request.max_tokens or 0) * rr.sequences
        dec = DecodeBooking(self, rr, d, dstate, work, rr.prompt_tokens, by_policy=False)
        registry.on_sent(dstate, dec.tokens, prompt)
        if isinstance(d.decode_side, SessionDecision):
            self.sessions.record(d.decode_side, rr.now)
        now = self.clock()
        for rid in (pstate.replica_id, dstate.replica_id):  # both will hold the prompt's blocks
            if not self.has_events(rid):
                self.approx.record(rid, rr.block_hashes, now)
        return PairBooking(d, pre, dec)

    def route_by_load(self, model: str | None, request_id: str, exclude: frozenset[str] = frozenset()
                      ) -> Booking | None:
        """A request that is not a generation from a prompt (embeddings, tokenize, a route the
        balancer does not know): the usable replica serving `model` with the fewest requests in
        flight from here, the least used on a tie (so an idle fleet takes turns). Booked like any
        other, so it counts while in flight; the policy neither sees nor learns from it."""
        candidates = self.registry.usable(exclude, model)
        if not candidates:
            return None
        replica = min(candidates, key=lambda r: (r.inflight_requests, r.requests_total, r.replica_id))
        rr = RoutingRequest(request_id=request_id, prompt_text="", prompt_tokens=0, block_hashes=(),
                            block_size=self.block_size, matched_blocks={}, now=self.clock())
        booking = Booking(self, rr, Decision(replica.replica_id, "fewest requests in flight"), replica, 0, 0,
                          by_policy=False)
        self.registry.on_sent(replica, 0, 0)
        return booking
