"""sglang_cache_aware: SGLang router's cache-aware policy over an approximate character tree.

Source: sgl-project/sglang, sgl-router/src/policies/cache_aware.rs and src/policies/tree.rs
(earlier src/tree.rs); defaults from sgl-router/py_src/sglang_router/router_args.py. Facts
carried over:

- One radix tree over raw prompt *characters* (not tokens) shared by all replicas ("tenants");
  every node records which tenants hold it and when each last touched it. It is built from
  routing history only: the prompt is inserted under the replica it was sent to.
- Load = requests in flight at the router. The fleet is imbalanced when
  `max_load - min_load > balance_abs_threshold` and `max_load > balance_rel_threshold * min_load`;
  then the least-loaded replica gets the request (shortest queue).
- Otherwise: the longest prefix match in the tree; if matched_chars / prompt_chars >
  cache_threshold, the replica holding that match; else the replica with the smallest tree
  (`get_smallest_tenant`: fewest characters, "most available cache capacity").
- Eviction: per tenant, while its character count exceeds max_tree_size, remove its least
  recently used leaves (`evict_tenant_by_size`), every eviction_interval seconds.

Deviations, each for a reason:
- Matches are computed over the candidates only (SGLang matches over every tenant and falls back
  to the first healthy worker when the best one is unusable).
- Ties (several replicas hold the deepest node; equal tree sizes) go to the fewer in flight, then
  are drawn with `request.rng()`; SGLang takes DashMap iteration order.
- Recency is a routing counter instead of wall-clock milliseconds, so two balancers with the same
  history hold the same tree.
- The eviction clock is `request.now`, checked in `on_routed`; there is no background thread.
  eviction_interval_s = 0 means "whenever a tenant is over the bound" (SGLang: no eviction).
  Between cycles a tenant may grow to 2 x max_tree_size before it is trimmed at once, so memory
  stays bounded even when the clock does not move.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from balancer.policies.base import Decision, Policy, ReplicaView, RoutingRequest


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class SglangCacheAwareConfig:
    # router_args.py (sglang_router, the `--cache-threshold` flag): 0.3. The Rust
    # CacheAwareConfig::default() in sgl-router/src/policies/mod.rs says 0.5; the CLI value is what
    # users run.
    cache_threshold: float = 0.3
    # router_args.py `--balance-abs-threshold` 64 (Rust Default: 32).
    balance_abs_threshold: int = 64
    # router_args.py `--balance-rel-threshold` 1.5 (Rust Default: 1.1).
    balance_rel_threshold: float = 1.5
    # router_args.py `--eviction-interval-secs` 120 (Rust Default: 30).
    eviction_interval_s: float = 120.0
    # router_args.py `--max-tree-size` 2**26, characters per tenant (Rust Default: 10000).
    max_tree_size: int = 2**26

    def __post_init__(self) -> None:
        if not _is_number(self.cache_threshold) or not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold!r}")
        if not _is_int(self.balance_abs_threshold) or self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be an integer >= 0, got {self.balance_abs_threshold!r}")
        if not _is_number(self.balance_rel_threshold) or not self.balance_rel_threshold >= 1.0:
            raise ValueError(f"balance_rel_threshold must be a number >= 1.0, got {self.balance_rel_threshold!r}")
        if not _is_number(self.eviction_interval_s) or not self.eviction_interval_s >= 0.0:
            raise ValueError(f"eviction_interval_s must be >= 0, got {self.eviction_interval_s!r}")
        if not _is_int(self.max_tree_size) or self.max_tree_size < 1:
            raise ValueError(f"max_tree_size must be an integer >= 1, got {self.max_tree_size!r}")


def pick_min(keys: dict[str, tuple[int, ...]], rng: random.Random) -> str:
    """The id with the smallest key; an exact tie is drawn with `rng` (from the request's seed)."""
    best = min(keys.values())
    tied = sorted(rid for rid, key in keys.items() if key == best)
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def shared_prefix_len(edge: str, text: str, offset: int) -> int:
    """Length of the common prefix of `edge` and `text[offset:]`, in characters.

    A full match costs one `startswith` (no copy). A partial one is found by bisection over
    slices whose sizes halve, so the characters compared and copied add up to O(len(edge)).
    """
    if text.startswith(edge, offset):
        return len(edge)
    lo, hi = 0, min(len(edge), len(text) - offset)  # edge[:lo] is known to match; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if edge[lo:mid] == text[offset + lo : offset + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    __slots__ = ("text", "children", "parent", "tenants")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text  # edge label: the characters this node adds to its parent's prefix
        self.children: dict[str, _Node] = {}  # first character of the child's text -> child
        self.parent = parent
        self.tenants: dict[str, int] = {}  # tenant -> last access tick


class ApproxTree:
    """A character radix tree shared by tenants (replicas), with per-tenant LRU eviction.

    Invariants (`check_integrity`):
    - a child's text is non-empty and starts with its key in the parent's `children`;
    - prefix closure: a tenant that holds a node holds every ancestor up to the root, so a
      tenant's match is the depth of the deepest node it holds on the text's path;
    - `tenant_chars[t]` is the sum of len(text) over the nodes t holds;
    - every non-root node is held by at least one tenant (eviction detaches emptied leaves).

    Eviction removes a tenant from its least recently used leaves (nodes it holds whose children
    it does not hold), so a tenant's shared head outlives its tails.
    """

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.tenant_chars: dict[str, int] = {}

    def match(self, text: str) -> dict[str, int]:
        """For each tenant with a non-empty match, how many leading characters of `text` it holds.

        Does not modify the tree (SGLang refreshes the matched tenant's timestamps here; the
        routed tenant's path is refreshed by `insert` instead).
        """
        matched: dict[str, int] = {}
        node, pos, end = self.root, 0, len(text)
        while pos < end:
            child = node.children.get(text[pos])
            if child is None:
                break
            k = shared_prefix_len(child.text, text, pos)
            pos += k
            for tenant in child.tenants:  # deeper nodes overwrite: closure makes this the max
                matched[tenant] = pos
            if k < len(child.text):
                break
            node = child
        return matched

    def insert(self, text: str, tenant: str, tick: int) -> None:
        """Record that `tenant` now holds `text`, touching every node on its path at `tick`."""
        chars = self.tenant_chars.get(tenant, 0)
        node, pos, end = self.root, 0, len(text)
        node.tenants[tenant] = tick
        while pos < end:
            first = text[pos]
            child = node.children.get(first)
            if child is None:
                leaf = _Node(text[pos:], node)
                leaf.tenants[tenant] = tick
                node.children[first] = leaf
                chars += end - pos
                break
            k = shared_prefix_len(child.text, text, pos)
            if k < len(child.text):
                # split: node -> head (child.text[:k]) -> child (child.text[k:]); the head is held
                # by whoever held the child, so every tenant's character count is unchanged.
                head = _Node(child.text[:k], node)
                head.tenants = dict(child.tenants)
                child.text = child.text[k:]
                child.parent = head
                head.children[child.text[0]] = child
                node.children[first] = head
                child = head
            if tenant not in child.tenants:
                chars += len(child.text)
            child.tenants[tenant] = tick
            pos += k
            node = child
        self.tenant_chars[tenant] = chars

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @staticmethod
    def _is_leaf_of(node: _Node, tenant: str) -> bool:
        return tenant in node.tenants and not any(tenant in c.tenants for c in node.children.values())

    def _drop(self, node: _Node, tenant: str) -> None:
        """Remove `tenant` from a node that is one of its leaves; detach the node if now empty."""
        del node.tenants[tenant]
        self.tenant_chars[tenant] -= len(node.text)
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[node.text[0]]

    def evict(self, tenant: str, max_chars: int) -> int:
        """Remove `tenant`'s least recently used leaves until it holds <= max_chars characters.

        Returns the characters freed. Evicting from a tenant at or under the bound is a no-op.
        """
        before = self.tenant_chars.get(tenant, 0)
        if before <= max_chars:
            return 0
        heap: list[tuple[int, int, _Node]] = []
        seq = 0  # tie-break for equal ticks (nodes do not compare)
        for node in self._nodes():
            if self._is_leaf_of(node, tenant):
                heap.append((node.tenants[tenant], seq, node))
                seq += 1
        heapq.heapify(heap)
        while heap and self.tenant_chars[tenant] > max_chars:
            _, _, node = heapq.heappop(heap)
            self._drop(node, tenant)
            parent = node.parent
            if parent is not None and parent is not self.root and self._is_leaf_of(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], seq, parent))
                seq += 1
        return before - self.tenant_chars[tenant]

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything `tenant` holds."""
        if tenant not in self.tenant_chars:
            return
        held = [node for node in self._nodes() if tenant in node.tenants]
        for node in reversed(held):  # children before parents (the walk is pre-order)
            self._drop(node, tenant)
        self.root.tenants.pop(tenant, None)
        del self.tenant_chars[tenant]

    def node_count(self) -> int:
        return sum(1 for _ in self._nodes())

    def check_integrity(self) -> None:
        """Raise AssertionError if an invariant in the class docstring does not hold."""
        counted: dict[str, int] = {t: 0 for t in self.tenant_chars}
        for node in self._nodes():
            assert node.text, "empty edge"
            assert node.parent is not None and node.parent.children.get(node.text[0]) is node, "bad parent link"
            assert node.tenants, "node held by no tenant"
            for tenant in node.tenants:
                assert tenant in node.parent.tenants, f"closure broken for {tenant}"
                counted[tenant] = counted.get(tenant, 0) + len(node.text)
        assert counted == self.tenant_chars, f"char counts {self.tenant_chars} != recount {counted}"


class SglangCacheAwarePolicy(Policy):
    name: ClassVar[str] = "sglang_cache_aware"
    needs_text = True
    Config: ClassVar[type] = SglangCacheAwareConfig

    def __init__(self, config: SglangCacheAwareConfig | None = None) -> None:
        self.config = config or SglangCacheAwareConfig()
        self.tree = ApproxTree()
        self._tick = 0  # routing counter: the LRU clock
        self._last_eviction: float | None = None  # request.now of the last eviction cycle

    def select(self, request: RoutingRequest, replicas: Sequence[ReplicaView]) -> Decision:
        cfg = self.config
        loads = {r.replica_id: r.inflight_requests for r in replicas}
        max_load, min_load = max(loads.values()), min(loads.values())
        imbalanced = max_load - min_load > cfg.balance_abs_threshold and max_load > cfg.balance_rel_threshold * min_load

        text = request.prompt_text
        matched_all = self.tree.match(text)
        matched = {rid: matched_all.get(rid, 0) for rid in loads}
        sizes = {rid: self.tree.tenant_chars.get(rid, 0) for rid in loads}
        prompt_chars = len(text)
        rng = request.rng()

        best = pick_min({rid: (-matched[rid], loads[rid]) for rid in loads}, rng)
        match_rate = matched[best] / prompt_chars if prompt_chars else 0.0

        if imbalanced:
            chosen = pick_min({rid: (loads[rid],) for rid in loads}, rng)
            reason = (
                f"imbalanced (max {max_load} - min {min_load} > {cfg.balance_abs_threshold} and "
                f"max > {cfg.balance_rel_threshold} x min): least loaded"
            )
        elif match_rate > cfg.cache_threshold:
            chosen = best
            reason = f"prefix match {matched[best]}/{prompt_chars} chars ({match_rate:.2f} > {cfg.cache_threshold})"
        else:
            chosen = pick_min({rid: (sizes[rid], loads[rid]) for rid in loads}, rng)
            reason = (
                f"best match {match_rate:.2f} <= {cfg.cache_threshold}: smallest tree ({sizes[chosen]} chars)"
            )

        scores = {
            rid: {
                "load": float(loads[rid]),
                "matched_chars": float(matched[rid]),
                "match_rate": matched[rid] / prompt_chars if prompt_chars else 0.0,
                "tree_chars": float(sizes[rid]),
                "imbalanced": 1.0 if imbalanced else 0.0,
            }
            for rid in loads
        }
        return Decision(replica_id=chosen, reason=reason, scores=scores)

    def on_routed(self, request: RoutingRequest, decision: Decision) -> None:
        cfg = self.config
        self._tick += 1
        tenant = decision.replica_id
        self.tree.insert(request.prompt_text, tenant, self._tick)

        if self._last_eviction is None:
            self._last_eviction = request.now
        if request.now - self._last_eviction >= cfg.eviction_interval_s:
            self._last_eviction = request.now
            for t in list(self.tree.tenant_chars):
                self.tree.evict(t, cfg.max_tree_size)
        elif self.tree.tenant_chars[tenant] > 2 * cfg.max_tree_size:
            self.tree.evict(tenant, cfg.max_tree_size)

    def on_replica_removed(self, replica_id: str) -> None:
        self.tree.remove_tenant(replica_id)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **asdict(self.config),
            "tree_chars": dict(self.tree.tenant_chars),
        }
