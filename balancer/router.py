"""From a validated request to a routing decision: tokenize, hash, look up, score.

`Router.prepare` does the per-request work once (render the chat template, tokenize, hash the
full blocks); `Router.decide` looks the chain up in the exact index (replicas that publish KV
events) and the approximate one (replicas that don't), builds the views and asks the policy.
Nothing here does I/O, so `explain` and the simulator call the same code as the proxy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

from balancer.approx_index import ApproxIndex
from balancer.policies.base import Decision, Policy, RoutingRequest
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry, ReplicaState
from protocol.hashing import hash_blocks, root_hash, token_bytes
from protocol.openai_api import APIError, GenerationRequest
from protocol.tokenizer import apply_chat_template


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request as the router sees it; built once, reused across retries."""

    request: GenerationRequest
    token_ids: tuple[int, ...]
    prompt_text: str
    block_hashes: tuple[int, ...]
    first_user_message: str | None
    rng_seed: int


def _first_user_text(messages) -> str | None:
    for m in messages:
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c)
    return None


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
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.tokenizer = tokenizer
        self.index = index
        self.approx = approx
        self.policy = policy
        self.registry = registry
        self.has_events = has_events  # replica id -> True if its KV events feed `index`
        # Only a policy that reads predicted output lengths gets them (and pays for them).
        self.predictor = predictor if policy.uses_predicted_output else None
        self.clock = clock
        self._roots: dict[str | None, int] = {None: root_hash(model)}

    def _root(self, salt: str | None) -> int:
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = root_hash(self.model, salt)
        return root

    def prepare(self, req: GenerationRequest) -> Prepared:
        first_user = None
        if req.kind == "chat":
            try:
                text = apply_chat_template(list(req.messages))
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            tokens = self.tokenizer.encode(text)
            first_user = _first_user_text(req.messages)
        elif req.prompt_token_ids is not None:
            tokens = list(req.prompt_token_ids)
            text = self.tokenizer.decode(tokens)
        else:
            text = req.prompt
            tokens = self.tokenizer.encode(text)
        hashes = hash_blocks(tokens, self.block_size, self._root(req.cache_salt))
        seed = hashes[-1] if hashes else xxhash.xxh3_64_intdigest(token_bytes(tokens))
        return Prepared(req, tuple(tokens), text, tuple(hashes), first_user, seed)

    def routing_request(self, p: Prepared, request_id: str) -> RoutingRequest:
        matched = self.index.match(p.block_hashes)
        approx = self.approx.match(p.block_hashes, self.clock())
        for rid, n in approx.items():
            if not self.has_events(rid):
                matched[rid] = max(n, matched.get(rid, 0))
        predicted = None
        if self.predictor is not None:
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
        )

    def decide(self, rr: RoutingRequest, candidates: Sequence[ReplicaState]) -> Decision:
        return self.policy.select(rr, self.registry.views(candidates, self._cached_blocks))

    def _cached_blocks(self, replica_id: str) -> int:
        return self.index.num_blocks(replica_id) if self.has_events(replica_id) else 0

    def finished(self, rr: RoutingRequest, output_tokens: int | None) -> None:
        """A request ended having generated output_tokens (None: unknown): predictors learn."""
        if self.predictor is not None and output_tokens is not None:
            self.predictor.observe_done(rr, output_tokens)

    def routed(self, rr: RoutingRequest, decision: Decision) -> None:
        """The request is being sent: let the policy and the approximate index learn."""
        self.policy.on_routed(rr, decision)
        if not self.has_events(decision.replica_id):
            self.approx.record(decision.replica_id, rr.block_hashes, self.clock())
