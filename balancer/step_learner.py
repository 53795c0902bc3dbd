"""Online step-time models learned from replicas' load reports (recursive least squares).

Each load report carries the replica's recent steps (duration, prefill tokens, decode
sequences, sequences, context tokens). `StepLearner` fits

    duration ≈ θ0 + θ1·prefill_tokens + θ2·decode_seqs + θ3·decode_context + θ4·prefill_context

(prefill_context: the tokens before the step's prefill chunks, i.e. cached prefix and earlier
chunks, which the chunks attend to)

per replica with exponentially forgotten RLS (a fleet-wide model serves a replica until it has
enough samples of its own), so the balancer knows what a prefill token and a decode step cost
on each replica without anyone setting it.

A replica with a KV offload tier also reports, per step, the prompt tokens whose KV it loaded
from host memory (or disk) instead of computing them. They join the model as a sixth feature,
fitted jointly with the others, so that a load's time is not read as prefill work: the model
gains it when the first step that loaded arrives (its coefficient starts at LOAD_PRIOR,
independent of the others, which is what an RLS with that prior would have held until then,
since the feature was 0), and from then on every step is fitted on six features (the C step
takes five, six, or any number up to nine, balancer/_rls.c). A fleet that never loads keeps
the five-feature model, exactly as before. One sample is ~1 µs in C, ~8 µs in its Python oracle.

That sixth coefficient keeps the load time out of the other five, but it is not the load time:
a loaded token is also context that the step's prefill chunk attends to, and the attention
cost (new × context, the step model's quadratic term) is not among the five features, so θpctx
stands in for it at the average chunk size. On Mooncake a load comes with a short uncached tail
(little attention per context token) while later chunks of long prompts are full (much), so
θpctx overprices a loading step's context and the sixth coefficient went to 0: a host hit
priced as free. The load time (`load_cost`) is therefore read off a second fit, the tier model,
started with the first step that loads: the five features plus the two the step model has and
they lack — the prefill chunks' attention, Σ new × (context + new / 2)
(`StepSample.prefill_attention`), and the prefill sequences (per-sequence overhead) — and one
load feature per medium, host memory and (from the first disk load) disk, each token priced
by its own tier's link. With the step model's own features the fit is exact for a simulated
replica and θload is identified. The policy's prefill estimates keep the five coefficients of
the first fit, whose θpctx is what they are built on (balancer/policies/predictive.py).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.events import MEDIUM_CPU, MEDIUM_DISK, canonical_medium

# Before any sample: a deliberately generic GPU-ish prior (seconds). Only the ratios between
# replicas matter while all use it; it is forgotten as soon as steps are observed.
PRIOR = np.array([0.010, 1.0e-4, 2.0e-4, 1.0e-7, 1.0e-7])
_P_MAX = 1e4  # cap on trace(P) in scaled units (the prior starts at 5 / prior_strength = 500)
# Seconds per token loaded from a lower KV tier, before any load was seen: as generic as PRIOR,
# a tenth of its prefill token (copying a token's KV over PCIe costs about that fraction of
# computing it: Llama-3-8B holds 128 KiB per token, ~2.6 µs at ~50 GB/s, against ~30 µs of
# compute on an H100).
LOAD_PRIOR = 1.0e-5
# Per token loaded from a local disk tier, before any disk load was seen: LOAD_PRIOR × 9, the
# ratio of PCIe Gen5's ~51 GB/s to an NVMe SSD's ~5.6 GB/s (replica/step_model.py's _PCIE and
# _NVME figures).
DISK_LOAD_PRIOR = 9.0e-5
MEDIA = (MEDIUM_CPU, MEDIUM_DISK)  # the tier model's load features, in order (protocol.events' media)


@dataclass(frozen=True)
class LearnerConfig:
    # Per sample. The memory (1 / (1 - forgetting) = 10,000 steps, ~2 minutes of a busy replica)
    # must span many prefill steps, which can be 1 in several hundred on a decode-heavy replica:
    # with 0.999 the prefill-token cost was forgotten between them and drifted to 0.
    forgetting: float = 0.9999
    # A replica's own model is used only for heterogeneous fleets; fitted on its own it is
    # noisier (fewer, collinear samples), so by default every replica uses the fleet's.
    per_replica: bool = False
    min_samples: int = 500  # before a replica's own model is trusted over the fleet's
    prior_strength: float = 1e-2

    def __post_init__(self) -> None:
        if not 0.9 <= self.forgetting <= 1.0:
            raise ValueError("forgetting must be in [0.9, 1]")
        if self.min_samples < 1 or self.prior_strength <= 0:
            raise ValueError("min_samples must be >= 1 and prior_strength > 0")


_SCALE = (1.0, 1e-3, 1e-2, 1e-5, 1e-5, 1e-3)  # the sixth: loaded tokens (scaled as prefill ones)
# The tier model (module docstring): the five features, prefill attention (token × context
# pairs), prefill sequences, tokens loaded from host memory, then from disk.
_TIER_SCALE = (*_SCALE[:5], 1e-8, 1e-2, 1e-3, 1e-3)
_TIER_PRIOR = (*PRIOR, 1.0e-9, 0.0, LOAD_PRIOR)  # the disk feature joins later (DISK_LOAD_PRIOR)
_TIER_COMPUTE = 7  # features before the load ones

try:  # the C step (balancer/_rls.c); the Python one below is its oracle and the fallback
    from balancer import _rls
    from balancer._rls import update as _update_native

    NATIVE = True
    _update6_native = getattr(_rls, "update6", None)  # None: an extension built before the load feature
    _update_any_native = getattr(_rls, "update_n", None)  # None: built before the tier model
except ImportError:  # pragma: no cover - built on install where a C compiler exists
    _update_native = _update6_native = _update_any_native = None
    NATIVE = False


def _update_py(theta: array, p: array, x0: float, x1: float, x2: float, x3: float, x4: float, y: float,
               lam: float, p_max: float) -> bool:
    """One RLS step on `theta` (5) and `p` (5×5, row-major) in place, x already scaled; False (and
    nothing changed) if it would leave either non-finite. The arithmetic of balancer/_rls.c."""
    return _update_n(theta, p, (x0, x1, x2, x3, x4), y, lam, p_max)


def _update_n(theta: array, p: array, x: Sequence[float], y: float, lam: float, p_max: float) -> bool:
    """`_update_py` for any number n = len(theta) of features (`p` n×n)."""
    n = len(theta)
    px = [sum(p[n * i + j] * x[j] for j in range(n)) for i in range(n)]
    den = lam + sum(a * b for a, b in zip(x, px))
    err = y - sum(a * b for a, b in zip(x, theta))
    k = [v / den for v in px]
    th = [t + ki * err for t, ki in zip(theta, k)]
    q = [(p[n * i + j] - k[i] * px[j]) / lam for i in range(n) for j in range(n)]
    tr = sum(q[(n + 1) * i] for i in range(n))
    if tr > p_max:
        q = [v * (p_max / tr) for v in q]
    if not all(math.isfinite(v) for v in th + q):
        return False
    theta[:] = array("d", th)
    p[:] = array("d", q)
    return True


class _RLS:
    __slots__ = ("theta", "p", "n", "lam", "update_fn", "scale", "any_n", "_x")

    def __init__(self, prior: Sequence[float], strength: float, lam: float, native: bool = NATIVE,
                 scale: Sequence[float] = _SCALE) -> None:
        # Features differ by orders of magnitude (1 vs thousands of tokens): scale them so P
        # starts well conditioned. State as flat float arrays: one sample is a handful of
        # multiply-adds, which numpy's per-call overhead would multiply by ten.
        self.any_n = scale is not _SCALE  # the tier model: the C step for any n
        self.scale = tuple(scale)
        self.theta = array("d", (float(v) / s for v, s in zip(prior, self.scale)))
        self.p = array("d", (np.eye(len(prior)) / strength).ravel())
        self.n = 0
        self.lam = lam
        self.update_fn = _update_native if native and _update_native is not None else _update_py
        self._x = array("d", bytes(8 * len(self.theta)))  # the scaled sample, for the C step of any n

    def update(self, x: Sequence[float], y: float) -> None:
        # Anti-windup (in the step): with forgetting, directions the data never excites (e.g.
        # only decode steps for a while) make P grow by 1/λ per sample without bound; its trace
        # is capped at _P_MAX.
        if self.any_n:
            if self.update_fn is _update_native and _update_any_native is not None:
                xs = self._x
                for i, (v, sc) in enumerate(zip(x, self.scale)):
                    xs[i] = v * sc
                _update_any_native(self.theta, self.p, xs, float(y), self.lam, _P_MAX)
            else:
                _update_n(self.theta, self.p, [v * sc for v, sc in zip(x, self.scale)], float(y), self.lam, _P_MAX)
        elif len(self.theta) == 5:
            self.update_fn(self.theta, self.p, x[0] * _SCALE[0], x[1] * _SCALE[1], x[2] * _SCALE[2],
                           x[3] * _SCALE[3], x[4] * _SCALE[4], float(y), self.lam, _P_MAX)
        elif self.update_fn is _update_native and _update6_native is not None:
            _update6_native(self.theta, self.p, x[0] * _SCALE[0], x[1] * _SCALE[1], x[2] * _SCALE[2],
                            x[3] * _SCALE[3], x[4] * _SCALE[4], x[5] * _SCALE[5], float(y), self.lam, _P_MAX)
        else:
            _update_n(self.theta, self.p, [v * sc for v, sc in zip(x, _SCALE)], float(y), self.lam, _P_MAX)
        self.n += 1

    def add_load_feature(self, strength: float, prior: float = LOAD_PRIOR) -> None:
        """Add a load feature (prior `prior`, uncorrelated with the rest: P gains a diagonal entry)."""
        n = len(self.theta)
        p = array("d", [0.0]) * ((n + 1) * (n + 1))
        for i in range(n):
            p[(n + 1) * i : (n + 1) * i + n] = self.p[n * i : n * i + n]
        p[(n + 1) * n + n] = 1.0 / strength
        self.p = p
        self.theta.append(prior / self.scale[n])
        self._x.append(0.0)

    def coef(self) -> np.ndarray:
        return np.maximum(np.frombuffer(self.theta, dtype=float) * np.asarray(self.scale[: len(self.theta)]), 0.0)

    def load_coef(self, medium: str = MEDIA[0]) -> float:
        """The tier model's seconds per token loaded from `medium` (its prior before that
        medium's feature joined; any spelling protocol.events.canonical_medium reads)."""
        medium = canonical_medium(medium)
        i = _TIER_COMPUTE + MEDIA.index(medium)
        if len(self.theta) > i:
            return max(self.theta[i] * self.scale[i], 0.0)
        return DISK_LOAD_PRIOR if medium == MEDIUM_DISK else LOAD_PRIOR


class StepLearner:
    def __init__(self, config: LearnerConfig = LearnerConfig()) -> None:
        self.config = config
        self._fleet = _RLS(PRIOR, config.prior_strength, config.forgetting)
        self._replicas: dict[str, _RLS] = {}
        # The tier models (module docstring), from the first step that loads: fleet-wide, and a
        # replica's own with per_replica.
        self._fleet_tier: _RLS | None = None
        self._replica_tiers: dict[str, _RLS] = {}
        self._last_start: dict[str, float] = {}
        self.max_step_tokens: dict[str, int] = {}  # largest step seen per replica (a lower bound on its budget)
        self._fleet_max_step = 0  # largest step seen on any replica
        self._last_step: dict[str, tuple[float, float]] = {}  # (end, duration) of the newest step, engine clock
        self._theta: dict[str | None, tuple[float, ...]] = {}  # coefficients as floats, until the next sample

    def observe(self, replica_id: str, steps: Iterable) -> int:
        """Feed a report's step samples (objects with start, duration, prefill_tokens,
        decode_tokens, num_seqs, context_tokens); samples already seen are skipped."""
        last = self._last_start.get(replica_id, float("-inf"))
        r = None  # a replica's own model is fitted only when it may be used (per_replica)
        if self.config.per_replica:
            r = self._replicas.get(replica_id)
            if r is None:
                r = self._replicas[replica_id] = _RLS(PRIOR, self.config.prior_strength, self.config.forgetting)
        fleet = self._fleet
        n = 0
        for s in steps:
            if s.start <= last:
                continue
            last = s.start
            dctx = getattr(s, "decode_context_tokens", 0)
            # context_tokens counts every sequence's computed + new tokens: what is left after
            # the decodes' context and all new tokens is the context before the prefill chunks
            # (cached prefix, chunks already done). Leaving the new tokens in would make this
            # feature a copy of the decode count on decode-only steps and of the prefill count
            # on cold prefills — collinear, and with forgetting the prefill-token coefficient
            # drifted to 0 over long decode-only stretches.
            pctx = max(0, s.context_tokens - dctx - s.prefill_tokens - s.decode_tokens)
            loaded = getattr(s, "loaded_tokens", 0)
            if loaded and len(fleet.theta) == 5:  # the first load seen: θload joins the model
                fleet.add_load_feature(self.config.prior_strength)
            if len(fleet.theta) == 5:
                x: tuple = (1.0, s.prefill_tokens, s.decode_tokens, dctx, pctx)
            else:
                x = (1.0, s.prefill_tokens, s.decode_tokens, dctx, pctx, loaded)
            if r is not None:
                if len(r.theta) < len(x):
                    r.add_load_feature(self.config.prior_strength)
                r.update(x, s.duration)
            s_end, s_dur = s.start + s.duration, s.duration
            fleet.update(x, s.duration)
            if loaded or self._fleet_tier is not None:
                self._observe_tier(replica_id, s, x, loaded)
            tokens = s.prefill_tokens + s.decode_tokens
            if tokens > self.max_step_tokens.get(replica_id, 0):
                self.max_step_tokens[replica_id] = tokens
                if tokens > self._fleet_max_step:
                    self._fleet_max_step = tokens
            n += 1
        self._last_start[replica_id] = last
        if n:
            self._last_step[replica_id] = (s_end, s_dur)
            self._theta.clear()
        return n

    def _observe_tier(self, replica_id: str, s, x: tuple, loaded: int) -> None:
        """One step into the tier models: `x`'s five compute features, the prefill attention
        and sequences, the tokens loaded per medium."""
        disk = getattr(s, "loaded_disk_tokens", 0)
        attention = getattr(s, "prefill_attention", 0.0)
        if not attention and s.prefill_tokens:  # not reported: exact for one prefill chunk
            attention = s.prefill_tokens * (x[4] + s.prefill_tokens / 2)
        xt = (*x[:5], attention, max(s.num_seqs - s.decode_tokens, 0), loaded - disk, disk)
        cfg = self.config
        models = [self._fleet_tier]
        if models[0] is None:
            models[0] = self._fleet_tier = _RLS(_TIER_PRIOR, cfg.prior_strength, cfg.forgetting, scale=_TIER_SCALE)
        if cfg.per_replica:
            own = self._replica_tiers.get(replica_id)
            if own is None:
                own = self._replica_tiers[replica_id] = _RLS(_TIER_PRIOR, cfg.prior_strength, cfg.forgetting,
                                                             scale=_TIER_SCALE)
            models.append(own)
        for m in models:
            if disk and len(m.theta) < len(xt):  # the first disk load: its feature joins
                m.add_load_feature(cfg.prior_strength, DISK_LOAD_PRIOR)
            m.update(xt[: len(m.theta)], s.duration)

    def _model(self, replica_id: str) -> _RLS:
        r = self._replicas.get(replica_id)
        if self.config.per_replica and r is not None and r.n >= self.config.min_samples:
            return r
        return self._fleet

    def coefficients(self, replica_id: str) -> np.ndarray:
        """[per step, per prefill token, per decode sequence, per decode-context token,
        per prefill-context token] in seconds."""
        return self._model(replica_id).coef()[:5]

    def theta(self, replica_id: str) -> tuple[float, ...]:
        """`coefficients` as a tuple of floats, cached between samples (the routing hot path)."""
        r = self._replicas.get(replica_id)
        key = replica_id if self.config.per_replica and r is not None and r.n >= self.config.min_samples else None
        t = self._theta.get(key)
        if t is None:
            t = self._theta[key] = tuple(float(v) for v in self.coefficients(replica_id))
        return t

    def load_cost(self, replica_id: str, medium: str = MEDIA[0]) -> float:
        """θload: seconds per prompt token the replica loads from its `medium` KV tier ("CPU":
        host memory, "STORAGE") instead of computing it, from the tier model (module docstring;
        LOAD_PRIOR, DISK_LOAD_PRIOR for the disk, until a step that loaded from it was seen),
        fleet-wide or the replica's own as for `coefficients`."""
        own = self._replica_tiers.get(replica_id)
        if self.config.per_replica and own is not None and own.n >= self.config.min_samples:
            return own.load_coef(medium)
        if self._fleet_tier is None:
            return DISK_LOAD_PRIOR if canonical_medium(medium) == MEDIUM_DISK else LOAD_PRIOR
        return self._fleet_tier.load_coef(medium)

    def step_budget(self, replica_id: str, default: int) -> int:
        """A replica's per-step token budget: the largest step seen, `default` before any.

        The largest step only bounds the budget from below, and a replica that has served only
        short prompts never shows its budget: taken per replica, that made a fleet of equal
        replicas look unequal (a replica with 2k-token steps priced a 30k-token prefill at 15
        steps, not 4), so short requests kept it and long ones avoided it (issue #15's Mooncake
        loss on 32 replicas). With a fleet-wide model (the default) the largest step seen on any
        replica stands for all; with per-replica models, the replica's own, never below `default`."""
        if self.config.per_replica:
            return max(self.max_step_tokens.get(replica_id, 0), default)
        return self._fleet_max_step or default

    def busy_for(self, replica_id: str, now: float) -> float:
        """Seconds until the replica's newest reported step ends (0 if it has ended).

        Replicas report after a step ends (live and simulated), so this is 0 unless a report
        describes a step still in flight by the balancer's clock; a request sent now would join
        only the step after it. The engine's clock is compared with `now`, both monotonic;
        clamped to the step's own duration, so a clock offset between hosts costs at most one
        step, never more.
        """
        last = self._last_step.get(replica_id)
        if last is None:
            return 0.0
        end, duration = last
        return min(max(end - now, 0.0), duration)

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self._replica_tiers.pop(replica_id, None)
        self._last_start.pop(replica_id, None)
        self.max_step_tokens.pop(replica_id, None)
        self._last_step.pop(replica_id, None)
        self._theta.clear()
