"""Fit the step-time model to the torch engine on this machine (`kvfleet calibrate`).

What a live sim replica reproduces (`sim_executor.Pacer`) is the wall time from one engine step
to the next while the replica is busy, so that is what is measured, in one of two ways.

`--mode served` (the default; the driver is replica/calibrate_served.py): a torch replica
started with `--step-log N` serves streaming requests over HTTP and logs every step with its
features (`StepRecord`); each busy step's period, its start to the next step's start
(`served_periods`), is fitted (`fit_served`). The period holds what the replica's server does
meanwhile: its SSE writes and request parsing run on the event loop while the step runs on the
worker thread, and on a machine of few cores they compete for the GIL and the cores, which
slows the step (on the project's 2-core machine a streamed token cost ~0.8 ms, ~25 %, more
than the in-process model said). A sim replica's server does the same work inside the Pacer's sleep, so only
the model can carry it. Single served steps are noisy (measured: one in ten takes over 1.5x
the fitted time, one in fifty over 2x), so the fit minimises absolute, not squared, relative
errors (`StepTimeModel.fit(robust=True)`): it follows the typical step. The workload is served
in passes (five by default), and a pass that disagrees with the model fitted to the others
(`check_passes`: the machine was taken by other work for a while) is served again, a bounded
number of times, and left out if it still disagrees (`passes_to_keep`).

`--mode engine`, in this process, no server:

1. Every `LLMEngine.step()` — schedule, execute, post-process, detokenize — timed whole, with
   the features the step-time model reads. A seeded mix of requests (prompts of 8 to 1,500
   tokens, 1 to 64 output tokens, arriving over time, chunked prefill) covers prefill-only,
   decode-only and mixed steps; it runs three times and each step keeps its median time.
2. The live loop's turnaround between two steps (`EngineService`: the worker thread hands the
   step back, outputs are dispatched, the next step is handed over), measured on the same
   engine under a short concurrent load, and added to the fitted `base` — a real replica pays it
   on every step, and a sim replica's own turnaround comes out of the modelled step instead.

Either way 80 % of the steps fit the model (non-negative least squares on relative errors) and
20 % measure its error (`fit_with_holdout`). The per-request HTTP path (request parsing before
the engine, the last chunk's way back) is paid by a sim replica as by a torch one (it is the
same server), so it is not part of the step model; the offline simulator adds it per request
(`simulator.fleet.FleetConfig.request_latency_s`).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from replica.config import EngineConfig
from replica.engine import build_engine
from replica.request import SamplingParams
from replica.scheduler import SchedulerOutput
from replica.step_model import FEATURES, SimPreset, StepFeatures, StepRecord, StepTimeModel, features_of


class TimingExecutor:
    """Wraps the model runner; records each step's features and `execute` time."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rows: list[StepFeatures] = []
        self.execute_s: list[float] = []
        self.durations: list[float] = []  # whole engine steps, filled by the driver

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        f = features_of(out.scheduled)
        t = time.perf_counter()
        result = self.inner.execute(out)
        self.execute_s.append(time.perf_counter() - t)
        self.rows.append(f)
        return result


def measure(cfg: EngineConfig, num_requests: int = 120, seed: int = 0, repeats: int = 3) -> TimingExecutor:
    """Run the seeded workload `repeats` times; the schedule is identical each time, so step i
    has the same features in every run, and its duration is the median of the runs: what a
    replica on this machine, as loaded as it is, typically takes. (The fastest run, used before,
    predicted live torch replicas' prefill steps ~30 % short on a shared machine.)"""
    runs = [_measure_once(cfg, num_requests, seed) for _ in range(repeats)]
    first = runs[0]
    for other in runs[1:]:
        if other.rows != first.rows:
            raise RuntimeError("the calibration workload scheduled differently between runs; report this as a bug")
    first.durations = [statistics.median(d) for d in zip(*(r.durations for r in runs))]
    first.execute_s = [statistics.median(d) for d in zip(*(r.execute_s for r in runs))]
    return first


def prompt_length(rng: random.Random) -> int:
    """A calibration prompt's length: short, medium or long (8-1,500 tokens), equally often."""
    return rng.choice([rng.randint(8, 64), rng.randint(64, 400), rng.randint(400, 1500)])


def output_length(rng: random.Random) -> int:
    """A calibration request's output length, 1-64 tokens."""
    return rng.randint(1, 64)


def _workload(num_requests: int, rng: random.Random) -> list:
    pending = []
    for i in range(num_requests):
        n = prompt_length(rng)
        pending.append((f"c{i}", [rng.randrange(256) for _ in range(n)],
                        SamplingParams(max_tokens=output_length(rng), temperature=0, ignore_eos=True)))
    return pending


def _measure_once(cfg: EngineConfig, num_requests: int, seed: int) -> TimingExecutor:
    engine = build_engine(cfg)
    timer = TimingExecutor(engine.executor)
    engine.executor = timer
    rng = random.Random(seed)
    pending = _workload(num_requests, rng)
    perf = time.perf_counter
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
            if pending:
                engine.add_request(*pending.pop())
        n = len(timer.rows)
        t = perf()
        engine.step()
        if len(timer.rows) > n:
            timer.durations.append(perf() - t)
    # The first steps pay one-off costs (allocator warm-up): drop them.
    timer.rows, timer.durations, timer.execute_s = timer.rows[5:], timer.durations[5:], timer.execute_s[5:]
    return timer


def measure_loop_turnaround(cfg: EngineConfig, num_requests: int = 24, seed: int = 0) -> float:
    """Median wall time between the end of one engine step and the start of the next while the
    engine is busy, in the replica's own loop (`EngineService`, worker thread, dispatch)."""
    from replica.metrics import ReplicaMetrics
    from replica.service import EngineService

    engine = build_engine(cfg)
    marks: list[tuple[float, float]] = []
    step = engine.step

    def timed_step():
        t = time.perf_counter()
        out = step()
        marks.append((t, time.perf_counter()))
        return out

    engine.step = timed_step  # type: ignore[method-assign]
    work = _workload(num_requests, random.Random(seed))

    async def drive() -> None:
        service = EngineService(engine, ReplicaMetrics(cfg.model_name))
        await service.start()

        async def one(rid, ids, params) -> None:
            async for _ in service.generate(rid, ids, params):
                pass

        try:
            await asyncio.gather(*(one(*w) for w in work))
        finally:
            await service.stop()

    asyncio.run(drive())
    gaps = [b[0] - a[1] for a, b in zip(marks[5:], marks[6:])]
    return statistics.median(gaps) if gaps else 0.0


def fit_with_holdout(rows: list[StepFeatures], durations: list[float], seed: int = 0,
                     source: str = "fitted", robust: bool = False) -> tuple[StepTimeModel, dict]:
    """Fit the model to a seeded 80 % of the steps and measure its error on the other 20 %
    (`robust`: see `StepTimeModel.fit`)."""
    if len(rows) != len(durations):
        raise ValueError("one duration per step, please")
    if len(rows) < 5 * len(FEATURES):
        raise ValueError(f"{len(rows)} steps are too few to fit {len(FEATURES)} coefficients "
                         f"(need {5 * len(FEATURES)}); measure a longer workload")
    idx = list(range(len(rows)))
    random.Random(seed + 1).shuffle(idx)
    cut = int(0.8 * len(idx))
    fit_rows = [rows[i] for i in idx[:cut]]
    fit_y = [durations[i] for i in idx[:cut]]
    test_rows = [rows[i] for i in idx[cut:]]
    test_y = [durations[i] for i in idx[cut:]]
    model = StepTimeModel.fit(fit_rows, fit_y, source=source, robust=robust)
    return model, {"steps": len(rows), "fit": model.error(fit_rows, fit_y), "holdout": model.error(test_rows, test_y),
                   "median_step_s": statistics.median(durations)}


def calibrate(cfg: EngineConfig, num_requests: int = 120, seed: int = 0,
              repeats: int = 3) -> tuple[StepTimeModel, dict]:
    """Offline calibration: engine steps in this process, no server (see the module docstring)."""
    timer = measure(cfg, num_requests, seed, repeats)
    model, report = fit_with_holdout(timer.rows, timer.durations, seed,
                                     source=f"kvfleet calibrate --mode engine: {cfg.model}, threads={cfg.threads}")
    report["mode"] = "engine"
    report["median_outside_execute_s"] = statistics.median(d - e for d, e in zip(timer.durations, timer.execute_s))
    turnaround = measure_loop_turnaround(cfg, seed=seed)
    report["loop_turnaround_s"] = turnaround
    model = replace(model, base=model.base + turnaround)
    return model, report


def served_periods(records: Iterable[StepRecord]) -> tuple[list[StepFeatures], list[float]]:
    """What a serving replica spends per step: for every logged step that left work behind
    (`busy_after`) and whose successor was logged too, the time from its start to the next
    step's start — the step itself plus the loop's turnaround and whatever the server did
    meanwhile (SSE writes, HTTP parsing, all competing for the GIL and the cores). A live sim
    replica's `Pacer` starts its steps back to back on the modelled timeline, so this is the
    duration its model must give. Steps after which the replica went idle have no such period
    and are left out."""
    by_seq = sorted(records, key=lambda r: r.seq)
    rows, periods = [], []
    for a, b in zip(by_seq, by_seq[1:]):
        if a.busy_after and b.seq == a.seq + 1:
            rows.append(a.features)
            periods.append(b.start - a.start)
    return rows, periods


def fit_served(records: Iterable[StepRecord], seed: int = 0, source: str = "fitted to served steps"
               ) -> tuple[StepTimeModel, dict]:
    """Fit the model to a serving replica's step log (`served_periods`), with a holdout error."""
    rows, periods = served_periods(records)
    # Robust: each period is one sample, and on a shared machine a few are several times typical.
    model, report = fit_with_holdout(rows, periods, seed, source, robust=True)
    report["mode"] = "served"
    return model, report


# A pass of the served calibration is disturbed (something else took the machine's cores for a
# while) when the steps it logged disagree with a model fitted to the other passes: their median
# relative error above NOISY_ERROR (`kvfleet calibrate`'s warning threshold for the holdout
# error), or their median period off the others' prediction by more than MAX_PASS_BIAS (the
# machine slowed or sped up as a whole). On the project's shared 2-core machine (2026-11-25,
# 48-request passes of the tiny model) undisturbed passes gave errors of 6-14 % and
# biases within ±9 %; disturbed ones errors of 13-30 % or biases from -16 % to +42 %.
NOISY_ERROR = 0.15
MAX_PASS_BIAS = 0.10


@dataclass(frozen=True)
class PassCheck:
    """How one pass's steps agree with the model fitted to the other passes' steps."""

    index: int
    steps: int
    error: float  # median |predicted - measured| / measured over the pass's periods
    bias: float  # median measured / predicted - 1: > 0, the pass ran slower than the others
    disturbed: bool

    def describe(self) -> str:
        return (f"{self.steps} steps, median error {100 * self.error:.1f} %, "
                f"{'slower' if self.bias >= 0 else 'faster'} than the others by {100 * abs(self.bias):.1f} %")


def check_passes(passes: list[tuple[list[StepFeatures], list[float]]], noisy_error: float = NOISY_ERROR,
                 max_bias: float = MAX_PASS_BIAS) -> list[PassCheck]:
    """Leave one pass out: fit the model (robustly) to the other passes' steps and measure how the
    left-out pass's steps agree with it. A single pass has nothing to compare with: never
    disturbed by this test (its holdout error still says how noisy it was)."""
    checks = []
    for i, (rows, y) in enumerate(passes):
        others_rows = [r for j, (rs, _) in enumerate(passes) if j != i for r in rs]
        others_y = [d for j, (_, ys) in enumerate(passes) if j != i for d in ys]
        if not rows or len(others_rows) < 5 * len(FEATURES):
            checks.append(PassCheck(i, len(rows), 0.0, 0.0, False))
            continue
        model = StepTimeModel.fit(others_rows, others_y, robust=True)
        pred = np.array([model.duration(r) for r in rows])
        meas = np.asarray(y, dtype=float)
        error = float(np.median(np.abs(pred - meas) / np.maximum(meas, 1e-9)))
        bias = float(np.median(meas / np.maximum(pred, 1e-9)) - 1.0)
        checks.append(PassCheck(i, len(rows), error, bias, error > noisy_error or abs(bias) > max_bias))
    return checks


def passes_to_keep(checks: list[PassCheck]) -> list[int]:
    """The passes to fit: the undisturbed ones, but never fewer than half of all (rounded up):
    when most passes look disturbed, the machine was busy throughout, not in one pass, and the
    least disturbed half is the best there is."""
    keep = [c.index for c in checks if not c.disturbed]
    need = -(-len(checks) // 2)
    if len(keep) < need:
        keep = sorted(c.index for c in sorted(checks, key=lambda c: (c.error + abs(c.bias)))[:need])
    return keep


def save(path: str | Path, model: StepTimeModel, cfg: EngineConfig, report: dict) -> None:
    preset = {"model": asdict(model), "kv_blocks": cfg.num_blocks or 0, "block_size": cfg.block_size,
              "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
              "description": f"calibrated {cfg.model} on this machine", "report": report}
    Path(path).write_text(json.dumps(preset, indent=2))


def load_preset_file(path: str | Path) -> SimPreset:
    """A `SimPreset` from a file `kvfleet calibrate --out` wrote."""
    try:
        raw = json.loads(Path(path).read_text())
        return SimPreset(StepTimeModel(**raw["model"]), kv_blocks=raw["kv_blocks"] or 512,
                         block_size=raw["block_size"], max_num_seqs=raw["max_num_seqs"],
                         max_num_batched_tokens=raw["max_num_batched_tokens"], description=raw["description"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read step-time preset {path}: {e}; write one with `kvfleet calibrate --out`") from None
