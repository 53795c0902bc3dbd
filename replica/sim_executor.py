"""The simulated executor: the real scheduler and block pool, no model.

A step takes the time the step-time model gives for what was scheduled, and every sampled
token is a deterministic function of (request id, position), so runs repeat exactly. The
executor does not keep time itself: it hands the duration to `advance`, which sleeps (a live
sim replica, optionally sped up by a time scale) or moves a virtual clock (the offline
simulator).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import xxhash

from replica.scheduler import SchedulerOutput
from replica.step_model import StepTimeModel, features_of

# Printable ASCII: the byte tokenizer turns sim output into readable text.
_TOKEN_LO, _TOKEN_SPAN = 32, 95


def sim_token(request_id: str, position: int) -> int:
    return _TOKEN_LO + xxhash.xxh3_64_intdigest(request_id.encode(), seed=position) % _TOKEN_SPAN


class SimExecutor:
    def __init__(self, model: StepTimeModel, advance: Callable[[float], None]) -> None:
        self.model = model
        self.advance = advance
        self.last_duration = 0.0

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        duration = self.model.duration(features_of(out.scheduled))
        self.last_duration = duration
        self.advance(duration)
        return {req.request_id: sim_token(req.request_id, req.num_tokens)
                for req, _, sample in out.scheduled if sample}


def sleeper(time_scale: float) -> Callable[[float], None]:
    """`advance` for a live sim replica: sleep the modelled time divided by time_scale."""
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")

    def advance(duration: float) -> None:
        time.sleep(duration / time_scale)

    return advance
