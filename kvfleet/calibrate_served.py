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

The first requests (warm-up, not fitted) pay a fresh process's one-off costs.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request

from kvfleet import procs
from loadgen.client import LoadConfig, run_load
from loadgen.prompts import PromptConfig
from loadgen.traces import TraceRequest
from replica.calibrate import fit_served, output_length, prompt_length
from replica.config import EngineConfig
from replica.step_model import StepRecord, StepTimeModel

# Mean gaps between arrivals, seconds, one drawn per request: mostly-alone requests, a few at a
# time, and bursts that batch many sequences (a tiny-model request alone takes ~0.1 s here).
ARRIVAL_GAPS_S = (0.3, 0.1, 0.03)
STEP_LOG_SIZE = 200_000  # steps the replica keeps: far more than a calibration run makes


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
    args = ["replica", *engine, "--port", "0", "--model", cfg.model, "--seed", str(cfg.seed),
            "--block-size", str(cfg.block_size), "--max-num-seqs", str(cfg.max_num_seqs),
            "--max-num-batched-tokens", str(cfg.max_num_batched_tokens), "--device", cfg.device,
            "--step-log", str(STEP_LOG_SIZE), "--log-level", "warning"]
    if cfg.num_blocks is not None:
        args += ["--num-blocks", str(cfg.num_blocks)]
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
    if not cfg.enable_prefix_caching:
        args.append("--no-prefix-caching")
    return args


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
    the method), fed the calibration workload in one or more passes, then fitted:

        with ServedCalibration(cfg) as cal:
            cal.run_pass(240, seed=0)
        model, report = cal.fit()

    Several shorter passes spread the measurement over time, e.g. between the rounds of another
    measurement on the same machine, so that both see the machine as it was (on the project's
    shared 2-core machine the calibration's median step ranged 4.0-7.3 ms between runs minutes
    apart)."""

    def __init__(self, cfg: EngineConfig, sim_preset: str | None = None) -> None:
        self.cfg = cfg
        self.sim_preset = sim_preset
        self.records: list[StepRecord] = []
        self.requests = 0
        self._rep: procs.Proc | None = None

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

    def run_pass(self, num_requests: int, seed: int = 0) -> None:
        """Serve `served_workload(num_requests, seed)` and keep the steps it logged."""
        if self._rep is None:
            raise RuntimeError("run_pass needs the replica: use ServedCalibration as a context manager")
        since, _ = read_step_log(self._rep.url, 1 << 62)  # only the seq the next step gets
        _send(self._rep.url, served_workload(num_requests, seed), self.cfg.model_name, prompt_seed=seed)
        self.records += read_step_log(self._rep.url, since)[1]
        self.requests += num_requests

    def fit(self, seed: int = 0) -> tuple[StepTimeModel, dict]:
        what = f"sim preset {self.sim_preset}" if self.sim_preset else f"{self.cfg.model}, threads={self.cfg.threads}"
        model, report = fit_served(self.records, seed, source=f"kvfleet calibrate --mode served: {what}")
        report["logged_steps"] = len(self.records)
        report["requests"] = self.requests
        return model, report


def calibrate_served(cfg: EngineConfig, num_requests: int = 240, seed: int = 0,
                     sim_preset: str | None = None) -> tuple[StepTimeModel, dict]:
    """Serve the seeded workload from a fresh torch replica (`sim_preset`: a sim replica) and
    fit the model to its busy steps' periods. RuntimeError if the replica will not start or
    requests fail; ValueError if too few steps were logged to fit."""
    with ServedCalibration(cfg, sim_preset) as cal:
        cal.run_pass(num_requests, seed)
    return cal.fit(seed)
