"""The simulated executor: the real scheduler and block pool, no model.

A step takes the time the step-time model gives for what was scheduled, and every sampled
token is a deterministic function of (request id, position), so runs repeat exactly. The
executor does not keep time itself: it hands the duration (and the step's `SchedulerOutput`)
to `advance`, which moves a virtual clock (the offline simulator) or holds a live sim replica's
step to its modelled wall-clock time (`Pacer`, optionally sped up by a time scale). A step
whose batch needs a LoRA adapter that is not resident takes the adapter's modelled load time
longer (`replica.lora.AdapterSlots` with `modelled_load_s`). With KV offload tiers (`kv` given,
its manager built with tiers), the step also takes the modelled time of loading the prefixes it
found in a tier (`step_model.TierCost`: block bytes over the link's bandwidth); copies into the
tiers overlap compute and cost the step nothing. Both are added to the tiers' transfer totals.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import xxhash

from replica.kv_cache_manager import KVCacheManager
from replica.lora import AdapterSlots
from replica.scheduler import SchedulerOutput
from replica.step_model import StepTimeModel, TierCost, features_of

# Printable ASCII: the byte tokenizer turns sim output into readable text.
_TOKEN_LO, _TOKEN_SPAN = 32, 95


def sim_token(request_id: str, position: int) -> int:
    return _TOKEN_LO + xxhash.xxh3_64_intdigest(request_id.encode(), seed=position) % _TOKEN_SPAN


class SimExecutor:
    has_logits = False  # modelled step times, no model: no logprobs
    def __init__(self, model: StepTimeModel, advance: Callable[[float, SchedulerOutput], None],
                 loras: AdapterSlots | None = None, kv: KVCacheManager | None = None,
                 tier_cost: TierCost | None = None) -> None:
        self.model = model
        self.advance = advance
        self.loras = loras
        self.kv = kv if kv is not None and kv.offload is not None else None
        self.moves_kv = self.kv is not None  # it drains (prices) the tiers' queued copies
        self.tier_cost = tier_cost or TierCost()
        self.last_duration = 0.0

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        duration = self.model.duration(features_of(out.scheduled))
        if self.loras is not None:
            duration += self.loras.activate(r.lora_name for r, _, _ in out.scheduled if r.lora is not None)
        if self.kv is not None:
            duration += self._transfers()
        self.last_duration = duration
        self.advance(duration, out)
        return {req.request_id: sim_token(req.request_id, req.num_tokens)
                for req, _, sample in out.scheduled if sample}

    def _transfers(self) -> float:
        """Price the queued tier copies; returns the step-blocking (load) seconds."""
        assert self.kv is not None and self.kv.offload is not None
        transfers = self.kv.take_transfers()
        if not transfers:
            return 0.0
        cost, totals = self.tier_cost, self.kv.offload.totals
        counts = Counter((t.src_medium, t.dst_medium) for t in transfers)
        for (src, dst), n in counts.items():
            totals.add(f"{src}_to_{dst}", n, n * cost.block_bytes, cost.seconds(src, dst, n))
        return cost.load_seconds(transfers)


class Pacer:
    """`advance` for a live sim replica: each step ends when the model says it does, in wall time.

    The steps of a busy replica lie back to back on a modelled timeline: a step starts when the
    previous one's modelled time ended, or, if the replica had nothing to do then, when the
    earliest request of the step entered the engine; it ends `duration / time_scale` later and
    the executor sleeps until then. So the process's own costs — scheduling, handing each step to
    the worker thread and back, HTTP and events on the loop, the OS waking it late on a busy
    machine — come out of the modelled step instead of adding to it: a GPU replica's step times,
    which the presets are fitted to, already include its engine's CPU work, and a live sim
    replica must not pay it twice. A step whose own Python work outlasts the model ends late;
    the next one starts from the modelled end, so short overruns are caught up. Beyond
    `max_lag_s` behind (the process was stopped or starved) the timeline restarts from now
    rather than running steps back to back to catch up, as a stalled GPU would not either.

    Stats (wall seconds): `steps`, `late_steps` (ended after their modelled end), `lag_s` (how
    late the last one ended), `max_lag_s_seen`, `total_lag_s`, `restarts`.
    """

    def __init__(self, time_scale: float = 1.0, max_lag_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if max_lag_s < 0:
            raise ValueError("max_lag_s must be non-negative")
        self.time_scale = time_scale
        self.max_lag_s = max_lag_s
        self.clock = clock
        self.sleep = sleep
        self._end = float("-inf")  # modelled end of the previous step (wall clock)
        self.steps = self.late_steps = self.restarts = 0
        self.lag_s = self.max_lag_s_seen = self.total_lag_s = 0.0

    def __call__(self, duration: float, out: SchedulerOutput | None = None) -> None:
        now = self.clock()
        ready = min((s.request.arrival_time for s in out.scheduled), default=now) if out is not None else now
        start = max(self._end, min(ready, now))
        if start < now - self.max_lag_s:
            start = now
            self.restarts += 1
        end = start + duration / self.time_scale
        self._end = end
        if end > now:
            self.sleep(end - now)
        lag = self.clock() - end
        self.steps += 1
        self.lag_s = max(lag, 0.0)
        if lag > 0:
            self.late_steps += 1
            self.total_lag_s += lag
            self.max_lag_s_seen = max(self.max_lag_s_seen, lag)

    def stats(self) -> dict[str, float]:
        return {"steps": self.steps, "late_steps": self.late_steps, "lag_s": self.lag_s,
                "max_lag_s": self.max_lag_s_seen, "mean_lag_s": self.total_lag_s / max(self.steps, 1),
                "restarts": self.restarts}
