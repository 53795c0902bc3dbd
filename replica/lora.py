"""LoRA adapters a replica serves, and which of them are resident (no torch here).

A replica is started with `--lora-modules name=path ...` (vLLM's flag) and serves each adapter
under its name: a request whose `model` is `name` runs the base model with that adapter's
low-rank update, and `/v1/models` lists it with `parent` = the base model, as vLLM does.

At most `max_loras` adapters are resident at once (vLLM's `--max-loras`: the adapters one
batch may use). `AdapterSlots` keeps them in LRU order: a step whose batch needs an adapter
that is not resident loads it, evicting the least recently used one the batch does not need;
the scheduler admits no request that would need more than `max_loras` adapters in one batch.
The first `max_loras` modules are loaded at start (vLLM loads its `--lora-modules` at start too).

Each load is timed (the torch engine reads the file; the simulated executor's load takes a
modelled time instead) and the mean goes out in the load report, so a balancer can price the
load on a replica that does not hold an adapter.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


class LoraTag(NamedTuple):
    """What the KV cache knows of a request's adapter: its name and id (tagged on the block
    events, as vLLM's `lora_name` / `lora_id`) and its chain's root hash
    (`protocol.hashing.root_hash(model, salt, name)`: adapters never share blocks)."""

    name: str
    lora_id: int
    root: int


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One `--lora-modules` entry. `lora_id` is its integer id in KV events (vLLM numbers its
    adapters from 1 in the order it registers them; 0 / nil means no adapter)."""

    name: str
    path: str
    lora_id: int

    def __post_init__(self) -> None:
        if not self.name or not self.name.isprintable():  # no control characters: root_hash's separators
            raise ValueError(f"LoRA adapter name {self.name!r} must be non-empty and printable")
        if not self.path:
            raise ValueError(f"LoRA adapter {self.name!r} needs a path (name=path.safetensors)")
        if self.lora_id < 1:
            raise ValueError("lora_id must be >= 1")


def parse_lora_modules(items: Iterable[str], base_model: str) -> tuple[LoraModule, ...]:
    """`name=path` entries (vLLM's `--lora-modules` form) into numbered modules."""
    out: list[LoraModule] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules takes name=path.safetensors, got {item!r}")
        if name == base_model or any(m.name == name for m in out):
            raise ValueError(f"LoRA adapter name {name!r} is used twice (or is the base model's name); give each its own")
        out.append(LoraModule(name, path, len(out) + 1))
    return tuple(out)


class AdapterSlots:
    """The resident adapters, at most `max_loras`, least recently used first.

    `load(module)` makes an adapter's weights (the torch engine reads the file; the simulated
    executor returns None). A load's duration is measured around `load`, or is
    `modelled_load_s` when given (the simulated executor adds that time to its step).
    """

    def __init__(self, modules: Sequence[LoraModule], max_loras: int, load: Callable[[LoraModule], Any],
                 modelled_load_s: float | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        self.modules = {m.name: m for m in modules}
        self.max_loras = max_loras
        self._load = load
        self._modelled = modelled_load_s
        self._clock = clock
        self._resident: OrderedDict[str, Any] = OrderedDict()
        self.loads_total = 0
        self.load_seconds_total = 0.0
        self.evictions_total = 0

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    @property
    def resident(self) -> tuple[str, ...]:
        """Resident adapter names, least recently used first."""
        return tuple(self._resident)

    @property
    def mean_load_s(self) -> float:
        return self.load_seconds_total / self.loads_total if self.loads_total else 0.0

    def lora_id(self, name: str | None) -> int | None:
        return None if name is None else self.modules[name].lora_id

    def get(self, name: str) -> Any:
        """A resident adapter's weights (KeyError if it is not resident)."""
        return self._resident[name]

    def preload(self) -> None:
        """Load the first `max_loras` modules (at start, as vLLM loads its --lora-modules)."""
        self.activate([m for m in self.modules][: self.max_loras])

    def activate(self, names: Iterable[str]) -> float:
        """Make every adapter in `names` resident and most recently used; returns the seconds
        spent loading (0 when all were resident). Evicts the least recently used adapters not
        in `names`. Raises ValueError for an unknown name or more than `max_loras` names."""
        want = list(dict.fromkeys(names))
        if len(want) > self.max_loras:
            raise ValueError(f"a batch needs {len(want)} adapters but max_loras is {self.max_loras}")
        spent = 0.0
        for name in want:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            module = self.modules.get(name)
            if module is None:
                raise ValueError(f"unknown LoRA adapter {name!r}")
            while len(self._resident) >= self.max_loras:
                victim = next(n for n in self._resident if n not in want)
                del self._resident[victim]
                self.evictions_total += 1
            t0 = self._clock()
            weights = self._load(module)
            took = self._modelled if self._modelled is not None else self._clock() - t0
            self._resident[name] = weights
            self.loads_total += 1
            self.load_seconds_total += took
            spent += took
        return spent
