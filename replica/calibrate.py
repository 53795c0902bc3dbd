"""Fit the step-time model to the torch engine on this machine (`kvfleet calibrate`).

A `TimingExecutor` wraps the model runner and records, for every step, the features the
step-time model reads and the measured duration of `execute` (the part the simulated executor
replaces; scheduling and detokenisation run for real in a sim replica too). A seeded mix of
requests — prompts of 8 to 1,500 tokens, 1 to 64 output tokens, arriving over time, chunked
prefill — covers prefill-only, decode-only and mixed steps; it runs three times and each step
keeps its fastest time. 80 % of the steps fit the model (non-negative least squares), 20 %
measure its error.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from replica.config import EngineConfig
from replica.engine import build_engine
from replica.request import SamplingParams
from replica.scheduler import SchedulerOutput
from replica.step_model import SimPreset, StepFeatures, StepTimeModel, features_of


class TimingExecutor:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.rows: list[StepFeatures] = []
        self.durations: list[float] = []

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        f = features_of(out.scheduled)
        t = time.perf_counter()
        result = self.inner.execute(out)
        self.durations.append(time.perf_counter() - t)
        self.rows.append(f)
        return result


def measure(cfg: EngineConfig, num_requests: int = 120, seed: int = 0, repeats: int = 3) -> TimingExecutor:
    """Run the seeded workload `repeats` times; the schedule is identical each time, so step i
    has the same features in every run and its duration is the fastest of the runs (noise from
    other processes only ever adds time)."""
    runs = [_measure_once(cfg, num_requests, seed) for _ in range(repeats)]
    best = runs[0]
    for other in runs[1:]:
        if other.rows != best.rows:
            raise RuntimeError("the calibration workload scheduled differently between runs; report this as a bug")
        best.durations = [min(a, b) for a, b in zip(best.durations, other.durations)]
    return best


def _measure_once(cfg: EngineConfig, num_requests: int, seed: int) -> TimingExecutor:
    engine = build_engine(cfg)
    timer = TimingExecutor(engine.executor)
    engine.executor = timer
    rng = random.Random(seed)
    pending = []
    for i in range(num_requests):
        n = rng.choice([rng.randint(8, 64), rng.randint(64, 400), rng.randint(400, 1500)])
        pending.append((f"c{i}", [rng.randrange(256) for _ in range(n)],
                        SamplingParams(max_tokens=rng.randint(1, 64), temperature=0, ignore_eos=True)))
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
            if pending:
                engine.add_request(*pending.pop())
        engine.step()
        step += 1
    # The first steps pay one-off costs (allocator warm-up): drop them.
    timer.rows, timer.durations = timer.rows[5:], timer.durations[5:]
    return timer


def calibrate(cfg: EngineConfig, num_requests: int = 120, seed: int = 0,
              repeats: int = 3) -> tuple[StepTimeModel, dict]:
    timer = measure(cfg, num_requests, seed, repeats)
    rng = random.Random(seed + 1)
    idx = list(range(len(timer.rows)))
    rng.shuffle(idx)
    cut = int(0.8 * len(idx))
    fit_rows = [timer.rows[i] for i in idx[:cut]]
    fit_y = [timer.durations[i] for i in idx[:cut]]
    test_rows = [timer.rows[i] for i in idx[cut:]]
    test_y = [timer.durations[i] for i in idx[cut:]]
    model = StepTimeModel.fit(fit_rows, fit_y, source=f"kvfleet calibrate: {cfg.model}, threads={cfg.threads}")
    report = {"steps": len(timer.rows), "fit": model.error(fit_rows, fit_y), "holdout": model.error(test_rows, test_y)}
    return model, report


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
