"""The replicas that one discovery source put in the registry (a DNS name, an InferencePool).

Each source says, whenever it learns something, the whole set of replicas it sees now; its
`Membership` turns that into adds and removes through the balancer's own `add_replica` /
`remove_replica`, so every source changes the fleet the same way (index, subscribers, metrics).

Invariants: a source removes only replicas it added (a replica given by --replica or the admin
API, or by another source, is never touched); a replica it added that the admin API removed
meanwhile is not added back while the source still lists it; a replica whose spec changed under
the same URL (e.g. its KV-event port) is removed and added again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from balancer.config import ReplicaSpec
from balancer.registry import Registry


class Membership:
    def __init__(self, registry: Registry, add: Callable[[ReplicaSpec], None],
                 remove: Callable[[str], None]) -> None:
        self.registry = registry
        self.add = add
        self.remove = remove
        self._mine: dict[str, ReplicaSpec] = {}

    @property
    def replica_ids(self) -> frozenset[str]:
        return frozenset(self._mine)

    def reconcile(self, specs: Iterable[ReplicaSpec]) -> tuple[list[str], list[str]]:
        """Make this source's replicas equal to `specs`; returns (added, removed) replica ids."""
        want = {s.replica_id: s for s in specs}
        added: list[str] = []
        removed: list[str] = []
        for rid, spec in list(self._mine.items()):
            if rid not in want or (want[rid] != spec and self.registry.get(rid) is not None):
                self.remove(rid)
                del self._mine[rid]
                removed.append(rid)
        for rid, spec in want.items():
            if rid not in self._mine and self.registry.get(rid) is None:
                self.add(spec)
                self._mine[rid] = spec
                added.append(rid)
        return added, removed
