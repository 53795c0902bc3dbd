"""`kvfleet calibrate --mode served`: fit the step-time model to a torch replica while it serves.

A live replica spends more per step than its engine does alone: between two steps its event
loop dispatches the outputs, writes one SSE chunk per streamed token and parses new requests,
and that Python work competes with the next step for the GIL and the cores (on the project's
2-core machine a streamed token cost ~0.8 ms, ~25 %, more than the in-process model said). So
this mode measures what a sim replica must reproduce:

1. start `kvfleet replica --step-log N` (a real subprocess, the flags of the config given);
2. send it a seeded workload over HTTP, streaming, as a client would: prompts of 8 to 1,500
   tokens, 1 to 64 output tokens, arrivals at mixed rates, so steps run alone and in batches of
   several sequences, prefill, decode and mixed;
3. read the steps the replica logged (`GET /step_log`: each step's features, start, and whether
   work was left for the next one) and fit the model to each busy step's period, start to next
   start (`replica.calibrate.served_periods`), with a seeded 80/20 holdout as the offline mode.

The workload is served in passes (`--passes`, 5 by default, each with its own seed). On a
shared machine one pass can be disturbed — another process takes a core for a minute — and a
single fit over everything then leans towards it. So each pass is checked against the model
fitted to the other passes (`replica.calibrate.check_passes`: its steps' median relative error
and its median bias); the most disturbed pass is served again while one is disturbed, at most
`--retries` times in all, and a pass still disturbed after that is left out of the fit (but never
more than half of them: `passes_to_keep`). The report lists each pass and what was done.

The first requests (warm-up, not fitted) pay a fresh process's one-off costs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict

from kvfleet import procs
from kvfleet.cmd_replica import engine_flags
from loadgen.client import LoadConfig, run_load
from loadgen.prompts import PromptConfig
from loadgen.traces import TraceRequest
from replica.calibrate import (PassCheck, check_passes, fit_served, output_length, passes_to_keep, prompt_length,
                               served_periods)
from replica.config import EngineConfig
from replica.step_model import StepRecord, StepTimeModel

# Mean gaps between arrivals, seconds, one drawn per request: mostly-alone requests, a few at a
# time, and bursts that batch many sequences (a tiny-model request alone takes ~0.1 s here).
ARRIVAL_GAPS_S = (0.3, 0.1, 0.03)
STEP_LOG_SIZE = 200_000  # steps the replica keeps: far more than a calibration run makes
# Before the first repeat of a disturbed pass; doubled before each further one.
RETRY_WAIT_S = 10.0


def served_workload(num_requests: int, seed: int = 0) -> list[TraceRequest]:
    """The seeded calibration workload: prompt lengths and output lengths as the offline mode's,
    Poisson arrivals whose rate changes from request to request."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(TraceRequest(arrival_s=t, input_length=prompt_length(rng), output_length=output_length(rng)))
        t += rng.expovariate(1.0 / rng.choice(ARRIVAL_GAPS_S))
    return out


def replica_args(cfg: EngineConfig, sim_preset: str | None = None) -> list[str]:
    """`kvfleet replica` flags for a torch replica with this engine config, logging its steps;
    with `sim_preset`, a sim replica of that preset instead (to check the method: it should
    calibrate back to about the preset)."""
    engine = ["--engine", "sim", "--preset", sim_preset] if sim_preset else ["--engine", "torch"]
    return ["replica", *engine, *engine_flags(cfg), "--port", "0", "--step-log", str(STEP_LOG_SIZE),
            "--log-level", "warning"]


def read_step_log(url: str, since: int = 0) -> tuple[int, list[StepRecord]]:
    """(next seq, the logged steps with seq >= since) from a replica's `GET /step_log`."""
    with urllib.request.urlopen(f"{url}/step_log?since={since}", timeout=60) as resp:
        body = json.load(resp)
    return body["next_seq"], [StepRecord.from_wire(raw) for raw in body["steps"]]


def _send(url: str, trace: list[TraceRequest], model: str, prompt_seed: int) -> None:
    # Token ids in every chunk, so every sampled token is streamed (the seeded tiny model's ids
    # often decode to no text, which a replica sends no text chunk for).
    cfg = LoadConfig(model=model, progress=False, prompt=PromptConfig(seed=prompt_seed),
                     extra_body={"return_token_ids": True})
    result = asyncio.run(run_load(url, trace, cfg))
    errors = [r.error for r in result.records if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} calibration requests failed, first: {errors[0]}")


class ServedCalibration:
    """A torch replica logging its steps (`sim_preset`: a sim replica of that preset, to check
    the method), fed the calibration workload in passes, then fitted:

        with ServedCalibration(cfg) as cal:
            cal.run_passes(5, 48, seed=0, retries=2)
        model, report = cal.fit()

    Several shorter passes spread the measurement over time, e.g. between the rounds of another
    measurement on the same machine, so that both see the machine as it was (on the project's
    shared 2-core machine the calibration's median step ranged 4.0-7.3 ms between runs minutes
    apart), and they let one disturbed pass be found and measured again: each pass's steps are
    checked against the model fitted to the other passes (`replica.calibrate.check_passes`); a
    disturbed one is repeated, at most `retries` times in all, and one still disturbed after that
    is left out of the fit (`passes_to_keep`). The report says what was done."""

    def __init__(self, cfg: EngineConfig, sim_preset: str | None = None) -> None:
        self.cfg = cfg
        self.sim_preset = sim_preset
        self.passes: list[list[StepRecord]] = []
        self.pass_seeds: list[int] = []
        self.pass_requests: list[int] = []
        self.log: list[dict] = []  # one entry per pass run: what it was and what became of it
        self._rep: procs.Proc | None = None

    @property
    def records(self) -> list[StepRecord]:
        return [r for p in self.passes for r in p]

    @property
    def requests(self) -> int:
        return sum(self.pass_requests)

    def __enter__(self) -> "ServedCalibration":
        self._rep = procs.start(replica_args(self.cfg, self.sim_preset))
        try:
            warm = [TraceRequest(arrival_s=0.2 * i, input_length=n, output_length=8)
                    for i, n in enumerate((100, 700, 1500))]
            _send(self._rep.url, warm, self.cfg.model_name, prompt_seed=10_000)
        except BaseException:
            self._rep.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._rep is not None:
            self._rep.stop()
            self._rep = None

    def _serve(self, num_requests: int, seed: int) -> list[StepRecord]:
        if self._rep is None:
            raise RuntimeError("run_pass needs the replica: use ServedCalibration as a context manager")
        since, _ = read_step_log(self._rep.url, 1 << 62)  # only the seq the next step gets
        _send(self._rep.url, served_workload(num_requests, seed), self.cfg.model_name, prompt_seed=seed)
        return read_step_log(self._rep.url, since)[1]

    def run_pass(self, num_requests: int, seed: int = 0) -> int:
        """Serve `served_workload(num_requests, seed)` and keep the steps it logged as a new pass;
        returns the pass's index."""
        self.passes.append(self._serve(num_requests, seed))
        self.pass_seeds.append(seed)
        self.pass_requests.append(num_requests)
        self.log.append({"pass": len(self.passes) - 1, "seed": seed, "requests": num_requests, "repeat": False})
        return len(self.passes) - 1

    def repeat_pass(self, index: int) -> None:
        """Serve pass `index`'s workload again and replace its steps with the new ones."""
        self.passes[index] = self._serve(self.pass_requests[index], self.pass_seeds[index])
        self.log.append({"pass": index, "seed": self.pass_seeds[index], "requests": self.pass_requests[index],
                         "repeat": True})

    def check(self) -> list[PassCheck]:
        """Each pass against the model of the others (`check_passes`)."""
        return check_passes([served_periods(p) for p in self.passes])

    def run_passes(self, passes: int, requests_per_pass: int, seed: int = 0, retries: int = 2,
                   between: Callable[[int], None] | None = None,
                   progress: Callable[[str], None] | None = None,
                   retry_wait_s: float = RETRY_WAIT_S) -> list[PassCheck]:
        """Run `passes` passes (seeds `seed`, `seed + 1`, ...), then repeat the most disturbed
        pass while one is disturbed, at most `retries` times, the first after `retry_wait_s`
        and each further one after twice the wait before it (what disturbs a pass, another
        process's burst, lasts a while: measured again at once, it is often still there).
        `between(i)` runs after each run of pass i, first or repeated (a measurement to
        interleave with the passes: the benchmark's torch rounds, repeated with the pass they
        share the minute with). Returns the last check."""
        say = progress or (lambda _msg: None)
        wait = retry_wait_s
        for i in range(passes):
            self.run_pass(requests_per_pass, seed + i)
            if between is not None:
                between(i)
        checks = self.check()
        for _ in range(retries):
            bad = [c for c in checks if c.disturbed]
            if not bad:
                break
            worst = max(bad, key=lambda c: c.error + abs(c.bias))
            say(f"pass {worst.index + 1} looks disturbed ({worst.describe()}): measuring it again"
                + (f" in {wait:.0f} s" if wait > 0 else ""))
            self.log[_last_run(self.log, worst.index)].update(error=worst.error, bias=worst.bias, disturbed=True)
            time.sleep(wait)
            wait *= 2
            self.repeat_pass(worst.index)
            if between is not None:
                between(worst.index)
            checks = self.check()
        return checks

    def fit(self, seed: int = 0) -> tuple[StepTimeModel, dict]:
        """Fit the kept passes (`passes_to_keep`: all but those still disturbed) together."""
        what = f"sim preset {self.sim_preset}" if self.sim_preset else f"{self.cfg.model}, threads={self.cfg.threads}"
        checks = self.check()
        keep = passes_to_keep(checks)
        records = [r for i in keep for r in self.passes[i]]
        model, report = fit_served(records, seed, source=f"kvfleet calibrate --mode served: {what}")
        report["logged_steps"] = len(self.records)
        report["requests"] = self.requests
        report["passes"] = [{**asdict(c), "seed": self.pass_seeds[c.index], "requests": self.pass_requests[c.index],
                             "kept": c.index in keep} for c in checks]
        report["repeated_passes"] = [e["pass"] for e in self.log if e["repeat"]]
        # every run of a pass, in order, with its check (a replaced run: the check that replaced it)
        runs = [dict(e) for e in self.log]
        for c in checks:
            runs[_last_run(runs, c.index)].update(error=c.error, bias=c.bias, disturbed=c.disturbed)
        report["pass_runs"] = runs
        report["dropped_passes"] = [c.index for c in checks if c.index not in keep]
        return model, report


def _last_run(log: list[dict], index: int) -> int:
    return max(k for k, e in enumerate(log) if e["pass"] == index)


def calibrate_served(cfg: EngineConfig, num_requests: int = 240, seed: int = 0,
                     sim_preset: str | None = None, passes: int = 5, retries: int = 2,
                     progress: Callable[[str], None] | None = None,
                     retry_wait_s: float = RETRY_WAIT_S) -> tuple[StepTimeModel, dict]:
    """Serve the seeded workload from a fresh torch replica (`sim_preset`: a sim replica) in
    `passes` passes of `num_requests / passes` requests, repeat a disturbed pass (at most
    `retries` times in all), and fit the model to the kept passes' busy steps' periods.
    RuntimeError if the replica will not start or requests fail; ValueError if too few steps
    were logged to fit."""
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    if retries < 0:
        raise ValueError(f"retries must be non-negative, got {retries}")
    with ServedCalibration(cfg, sim_preset) as cal:
        cal.run_passes(passes, -(-num_requests // passes), seed, retries, progress=progress,
                       retry_wait_s=retry_wait_s)
    return cal.fit(seed)
