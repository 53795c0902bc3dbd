"""Synthetic workloads: length distributions, shared prefixes, sessions, over the gamma arrival
process of `vllm bench serve` (arrivals.py).

Prefix structure is expressed with hash ids (one id per `block_tokens` tokens, equal id = equal
content), the same way Mooncake traces do, so prompts.py materializes synthetic and trace
workloads alike and the simulator sees the same structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import count

import numpy as np

from loadgen.arrivals import gamma_arrivals
from loadgen.traces import TraceRequest


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `fixed:N`, `uniform:LO:HI` (inclusive) or
    `lognormal:MEAN:STD` (the mean and std of the lengths themselves, not of their log)."""

    kind: str = "fixed"
    a: float = 128
    b: float = 0
    minimum: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"length distribution must be fixed, uniform or lognormal, got {self.kind!r}")
        if self.kind == "fixed" and self.a < self.minimum:
            raise ValueError(f"fixed length must be >= {self.minimum}, got {self.a}")
        if self.kind == "uniform" and not self.minimum <= self.a <= self.b:
            raise ValueError(f"uniform:LO:HI needs {self.minimum} <= LO <= HI, got {self.a}:{self.b}")
        if self.kind == "lognormal" and not (self.a > 0 and self.b >= 0):
            raise ValueError(f"lognormal:MEAN:STD needs MEAN > 0 and STD >= 0, got {self.a}:{self.b}")

    @classmethod
    def parse(cls, spec: str | int, minimum: int = 1) -> LengthDist:
        """`128` or `fixed:128`, `uniform:64:256`, `lognormal:200:100`."""
        s = str(spec).strip()
        parts = s.split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", float(int(parts[0])), 0, minimum)
            kind, nums = parts[0], [float(x) for x in parts[1:]]
        except ValueError:
            raise ValueError(f"cannot read length {spec!r}; write 128, fixed:128, uniform:64:256 or "
                             "lognormal:200:100") from None
        want = {"fixed": 1, "uniform": 2, "lognormal": 2}.get(kind)
        if want is None or len(nums) != want:
            raise ValueError(f"cannot read length {spec!r}; write 128, fixed:128, uniform:64:256 or lognormal:200:100")
        return cls(kind, nums[0], nums[1] if want == 2 else 0, minimum)

    @property
    def mean(self) -> float:
        return {"fixed": self.a, "uniform": (self.a + self.b) / 2, "lognormal": self.a}[self.kind]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, size=n)
        else:  # moments of the lognormal from the mean and std of the lengths
            sigma2 = math.log(1 + (self.b / self.a) ** 2)
            x = rng.lognormal(math.log(self.a) - sigma2 / 2, math.sqrt(sigma2), size=n)
        return np.maximum(self.minimum, np.rint(x)).astype(np.int64)


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic workload.

    prefix_groups / prefix_len: N shared system prompts of L tokens; each request (or session)
        picks one with Zipf-like popularity p(k) ~ 1/(k+1)**zipf_s; 0 groups = no shared prefix.
    sessions: 0 = independent requests. Otherwise the requests form this many multi-turn
        sessions (turns per session from `turns`): each turn's prompt is the previous prompt +
        the previous answer + new user text (input_len tokens), and it arrives `think_time_s`
        (exponential mean) after the previous turn's arrival; sessions start at the arrival
        process's times.
    """

    num_requests: int = 100
    rate: float = 1.0
    burstiness: float = 1.0
    input_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist = LengthDist("fixed", 64)
    prefix_groups: int = 0
    prefix_len: int = 0
    zipf_s: float = 1.0
    sessions: int = 0
    turns: LengthDist = LengthDist("uniform", 2, 6)
    think_time_s: float = 5.0
    block_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")
        if self.prefix_groups < 0 or self.prefix_len < 0:
            raise ValueError("prefix_groups and prefix_len must not be negative")
        if self.prefix_groups and not self.prefix_len:
            raise ValueError("prefix_groups needs prefix_len > 0 (tokens per shared system prompt)")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must not be negative, got {self.zipf_s}")
        if self.sessions < 0:
            raise ValueError(f"sessions must not be negative, got {self.sessions}")
        if self.think_time_s < 0:
            raise ValueError(f"think_time_s must not be negative, got {self.think_time_s}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


class BlockIds:
    """Hands out fresh hash ids and builds block lists for prompts made of segments."""

    def __init__(self, start: int = 0) -> None:
        self._next = count(start)

    def fresh(self, n: int) -> tuple[int, ...]:
        return tuple(next(self._next) for _ in range(n))

    def extend(self, prefix_ids: tuple[int, ...], prefix_tokens: int, new_tokens: int, bt: int) -> tuple[int, ...]:
        """Blocks of a prompt = a prefix of `prefix_tokens` tokens (whose blocks are
        `prefix_ids`) followed by `new_tokens` new tokens: the prefix's full blocks are kept, the
        block where the new content starts and everything after get fresh ids."""
        full = prefix_tokens // bt
        total = math.ceil((prefix_tokens + new_tokens) / bt)
        return prefix_ids[:full] + self.fresh(total - full)


def synthesize(cfg: SyntheticConfig) -> list[TraceRequest]:
    """The workload as TraceRequests sorted by arrival."""
    rng = np.random.default_rng(cfg.seed)
    bt = cfg.block_tokens
    ids = BlockIds()
    groups = [ids.fresh(math.ceil(cfg.prefix_len / bt)) for _ in range(cfg.prefix_groups)]
    weights = zipf_weights(cfg.prefix_groups, cfg.zipf_s) if cfg.prefix_groups else None

    def pick_group() -> tuple[str | None, tuple[int, ...], int]:
        if not groups:
            return None, (), 0
        g = int(rng.choice(len(groups), p=weights))
        return f"group{g}", groups[g], cfg.prefix_len

    out: list[TraceRequest] = []
    if cfg.sessions == 0:
        arrivals = gamma_arrivals(cfg.num_requests, cfg.rate, cfg.burstiness, rng)
        ins = cfg.input_len.sample(rng, cfg.num_requests)
        outs = cfg.output_len.sample(rng, cfg.num_requests)
        for t, n_in, n_out in zip(arrivals, ins, outs):
            tenant, pre_ids, pre_len = pick_group()
            out.append(TraceRequest(arrival_s=float(t), input_length=pre_len + int(n_in), output_length=int(n_out),
                                    hash_ids=ids.extend(pre_ids, pre_len, int(n_in), bt), hash_block_tokens=bt,
                                    tenant=tenant))
        return out
    # sessions: split num_requests into turns, then lay the turns out in time
    turns = cfg.turns.sample(rng, cfg.sessions)
    total = int(turns.sum())
    if total < cfg.num_requests:  # stretch the last sessions until the count is reached
        turns[-1] += cfg.num_requests - total
    starts = gamma_arrivals(cfg.sessions, cfg.rate * cfg.sessions / cfg.num_requests, cfg.burstiness, rng)
    made = 0
    for s, (t0, n_turns) in enumerate(zip(starts, turns)):
        tenant, pre_ids, pre_len = pick_group()
        hids, length, t = pre_ids, pre_len, float(t0)
        prev_out = 0
        for k in range(int(n_turns)):
            if made == cfg.num_requests:
                break
            n_user = int(cfg.input_len.sample(rng, 1)[0])
            n_out = int(cfg.output_len.sample(rng, 1)[0])
            hids = ids.extend(hids, length, prev_out + n_user, bt)
            length += prev_out + n_user
            out.append(TraceRequest(arrival_s=t, input_length=length, output_length=n_out, hash_ids=hids,
                                    hash_block_tokens=bt, session_id=f"s{s}", turn=k, tenant=tenant))
            made += 1
            prev_out = n_out
            t += float(rng.exponential(cfg.think_time_s)) if cfg.think_time_s else 0.0
    out.sort(key=lambda r: r.arrival_s)
    return out


def retime(requests: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """Scale a workload's arrival times so its mean rate becomes `rate` req/s (for rate sweeps
    over a trace): the shape of the arrival process is kept."""
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if len(requests) < 2:
        return list(requests)
    span = requests[-1].arrival_s - requests[0].arrival_s
    if span <= 0:
        return list(requests)
    factor = (len(requests) / rate) / span
    t0 = requests[0].arrival_s
    return [replace(r, arrival_s=(r.arrival_s - t0) * factor) for r in requests]


def parse_class_mix(spec: str) -> dict[str, float]:
    """`"interactive=0.2,batch=0.8"` -> {"interactive": 0.2, "batch": 0.8} (shares, any scale)."""
    out: dict[str, float] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, share = item.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not sep or not name or not value > 0 or not math.isfinite(value):
            raise ValueError(f"bad class mix item {item!r}: write NAME=SHARE with a positive share, e.g. "
                             "--class-mix interactive=0.2,batch=0.8")
        out[name] = value
    if not out:
        raise ValueError("an empty --class-mix: give NAME=SHARE pairs, e.g. interactive=0.2,batch=0.8")
    return out


def assign_classes(requests: list[TraceRequest], mix: dict[str, float], seed: int = 0) -> list[TraceRequest]:
    """Each request's `tenant` (its request class) drawn from `mix`'s shares, seeded; a session
    keeps one class (its first request's)."""
    names = list(mix)
    p = np.asarray([mix[n] for n in names], dtype=float)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(names), size=len(requests), p=p / p.sum())
    by_session: dict[str, str] = {}
    out = []
    for r, k in zip(requests, drawn):
        name = names[int(k)]
        if r.session_id is not None:
            name = by_session.setdefault(r.session_id, name)
        out.append(replace(r, tenant=name))
    return out
