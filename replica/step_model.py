"""How long an engine step takes, from what the step processes.

    duration = base
             + per_token          × new tokens (prefill chunks + decodes: the weight GEMMs)
             + per_prefill_ctx    × Σ over prefill chunks of new_i × context_i (attention, quadratic)
             + per_prefill_seq_ctx× Σ over prefill chunks of context_i (reading the cached prefix)
             + per_decode_ctx     × Σ over decode sequences of context_i (reading their KV)
             + per_seq            × sequences in the step (per-sequence overheads)

This is the shape of Preble's fitted prefill model (design §8: 28.93 ms + 0.1822 ms/token +
0.0040 ms/context + 2.55e-6 ms/(token·context), Llama-3-70B on H100, from Preble's
`model_equations.py`) with a decode term added, as Vidur separates prefill and decode attention.
Features come from a `SchedulerOutput`, so the simulator and calibration use the same code.

Presets (seconds). Where a number is derived rather than measured, the derivation is given:
effective HBM bandwidth 70 % of the H100 SXM's 3.35 TB/s, effective bf16 throughput 50 % of its
989 TFLOP/s dense (NVIDIA H100 datasheet).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np

from protocol.events import MEDIUM_DISK

STEP_RECORD_FIELDS = ("seq", "start", "duration", "busy_after", "new_tokens", "prefill_ctx_product", "prefill_seq_ctx",
                      "decode_ctx", "num_seqs")  # `StepRecord.to_wire` order
FEATURES = ("base", "per_token", "per_prefill_ctx", "per_prefill_seq_ctx", "per_decode_ctx", "per_seq")


@dataclass(frozen=True, slots=True)
class StepFeatures:
    new_tokens: int
    prefill_ctx_product: float  # Σ new_i × (cached_i + new_i / 2) over prefill chunks
    prefill_seq_ctx: int  # Σ cached context of prefill chunks
    decode_ctx: int  # Σ context of decode sequences
    num_seqs: int

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.new_tokens, self.prefill_ctx_product, self.prefill_seq_ctx, self.decode_ctx,
                         self.num_seqs])


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One executed engine step as a replica logs it (`kvfleet replica --step-log N`).

    `start` (engine clock, seconds) is taken after scheduling, `duration` runs to the end of the
    scheduler's update. `busy_after`: requests were left unfinished, so the replica's loop starts
    the next step at once; the time from this step's start to the next one's is then what the
    replica spends per step, server included (`calibrate.served_periods`)."""

    seq: int  # the engine's step number, from 0
    start: float
    duration: float
    features: StepFeatures
    busy_after: bool

    def to_wire(self) -> list:
        f = self.features
        return [self.seq, self.start, self.duration, int(self.busy_after), f.new_tokens, f.prefill_ctx_product,
                f.prefill_seq_ctx, f.decode_ctx, f.num_seqs]

    @classmethod
    def from_wire(cls, raw: Sequence) -> "StepRecord":
        """Inverse of `to_wire`; ValueError on anything else."""
        try:
            seq, start, duration, busy, new, prod, pctx, dctx, n = raw
            return cls(int(seq), float(start), float(duration),
                       StepFeatures(int(new), float(prod), int(pctx), int(dctx), int(n)), bool(busy))
        except (TypeError, ValueError) as e:
            raise ValueError(f"not a step record: {raw!r}") from e


def features_of(scheduled: Iterable, num_prompt_of=None) -> StepFeatures:
    """Features of a step from `(request, num_new_tokens, sample)` triples (a SchedulerOutput's
    `scheduled`). A chunk is a decode when it is one token past the request's prompt."""
    new = prod = pctx = dctx = n = 0
    for req, num_new, _ in scheduled:
        ctx = req.num_computed_tokens
        n += 1
        new += num_new
        if num_new == 1 and ctx >= req.num_prompt_tokens:
            dctx += ctx
        else:
            prod += num_new * (ctx + num_new / 2)
            pctx += ctx
    return StepFeatures(new, prod, pctx, dctx, n)


@dataclass(frozen=True)
class StepTimeModel:
    base: float  # seconds per step
    per_token: float
    per_prefill_ctx: float
    per_prefill_seq_ctx: float
    per_decode_ctx: float
    per_seq: float = 0.0  # per scheduled sequence (gathers, sampling, bookkeeping)
    source: str = ""

    def __post_init__(self) -> None:
        for name in FEATURES:
            if getattr(self, name) < 0:
                raise ValueError(f"step-time coefficient {name} must be non-negative")

    def coefficients(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in FEATURES])

    @cached_property
    def _coef(self) -> np.ndarray:  # built once: `duration` runs once per simulated step
        return self.coefficients()

    def duration(self, f: StepFeatures) -> float:
        # numpy's dot, not a Python sum: its rounding (BLAS, fused multiply-add) is what the
        # published figures were produced with, and same inputs must give identical results.
        return float(self._coef @ f.vector())

    def prefill_time(self, new_tokens: int, cached: int = 0, chunk: int | None = None) -> float:
        """Time to prefill `new_tokens` after `cached` ones on an idle replica, in chunks."""
        chunk = chunk or new_tokens or 1
        t, done = 0.0, 0
        while done < new_tokens:
            n = min(chunk, new_tokens - done)
            ctx = cached + done
            t += self.duration(StepFeatures(n, n * (ctx + n / 2), ctx, 0, 1))
            done += n
        return t

    def decode_step_time(self, batch: int, mean_context: float) -> float:
        return self.duration(StepFeatures(batch, 0.0, 0, int(batch * mean_context), batch))

    @classmethod
    def fit(cls, rows: Sequence[StepFeatures], durations: Sequence[float], source: str = "fitted",
            relative: bool = True, robust: bool = False) -> "StepTimeModel":
        """Non-negative least squares over the features (active-set: drop negative terms, refit).

        `relative`: minimise relative rather than absolute errors (each row weighted by
        1 / its duration), so a few long prefill steps do not decide the fit of the many short
        decode steps; the error is reported relative too.
        `robust`: minimise the sum of absolute (not squared) errors instead, by iteratively
        reweighted least squares: the fit follows the typical step rather than the mean, so the
        steps that the OS or the server delayed well past their usual length (single served
        steps on a shared machine) do not pull every coefficient up."""
        x = np.stack([r.vector() for r in rows])
        y = np.asarray(durations, dtype=float)
        if relative:
            w = 1.0 / np.maximum(y, 1e-9)
            x, y = x * w[:, None], y * w
        coef = _nnls(x, y)
        if robust:
            # IRLS for L1: weight each row by 1 / |residual|, floored so exact fits stay finite.
            floor = 1e-3 * max(float(np.median(np.abs(y))), 1e-12)
            for _ in range(50):
                r = np.sqrt(1.0 / np.maximum(np.abs(x @ coef - y), floor))
                new = _nnls(x * r[:, None], y * r)
                done = np.allclose(new, coef, rtol=1e-6, atol=0)
                coef = new
                if done:
                    break
        return cls(*coef.tolist(), source=source)  # in FEATURES order

    def error(self, rows: Sequence[StepFeatures], durations: Sequence[float]) -> dict[str, float]:
        pred = np.array([self.duration(r) for r in rows])
        y = np.asarray(durations, dtype=float)
        rel = np.abs(pred - y) / np.maximum(y, 1e-9)
        return {"median_rel_error": float(np.median(rel)), "mean_rel_error": float(rel.mean()),
                "p90_rel_error": float(np.quantile(rel, 0.9))}


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x c - y||² over c >= 0, by dropping the most negative term and refitting."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


@dataclass(frozen=True)
class TierCost:
    """What moving KV blocks between the device pool and the offload tiers costs
    (replica/kv_offload.py): `block_bytes` per block over the link's effective bandwidth.

    Only loads (a tier to the device) lengthen a step: the request cannot run before its prefix
    is back. Stores (device to host, host to disk) overlap compute, as vLLM's offloading worker
    copies on its own CUDA stream; they are priced for the transfer metrics only.
    """

    block_bytes: int = 0  # one block of the preset's block_size, all layers, K and V
    host_bytes_per_s: float = 0.0  # host memory <-> device (PCIe); 0 = free
    disk_bytes_per_s: float = 0.0  # local disk -> device (through host memory); 0 = free

    def __post_init__(self) -> None:
        if self.block_bytes < 0 or self.host_bytes_per_s < 0 or self.disk_bytes_per_s < 0:
            raise ValueError("tier cost figures must be non-negative")

    def seconds(self, src_medium: str, dst_medium: str, num_blocks: int) -> float:
        """Modelled time of copying `num_blocks` blocks from `src_medium` to `dst_medium`
        ("GPU", "CPU", "STORAGE"); a copy touching the disk runs at the disk's bandwidth."""
        bw = self.disk_bytes_per_s if MEDIUM_DISK in (src_medium, dst_medium) else self.host_bytes_per_s
        return num_blocks * self.block_bytes / bw if bw > 0 else 0.0

    def load_seconds(self, transfers: Iterable) -> float:
        """The step-blocking part of `transfers` (replica.kv_offload.Transfer): loads into the device."""
        return sum(self.seconds(t.src_medium, t.dst_medium, 1) for t in transfers if t.dst_medium == "GPU")


@dataclass(frozen=True)
class SimPreset:
    """A simulated GPU set-up: its step-time model, KV capacity and KV transfer costs."""

    model: StepTimeModel
    kv_blocks: int  # of 16 tokens
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    description: str = ""
    tier_cost: TierCost = TierCost()  # offload tiers' transfer costs (free unless the preset says)


_HBM = 3.35e12 * 0.7  # bytes/s, effective (H100 SXM datasheet × 70 %)
_FLOPS = 989e12 * 0.5  # bf16 dense, effective (datasheet × 50 %)
# Host memory <-> one H100 over PCIe Gen5 x16: 32 GT/s × 16 lanes ≈ 64 GB/s per direction (the
# NVIDIA H100 datasheet's "PCIe Gen5: 128 GB/s" is both directions), ~50 GB/s achievable with
# pinned memory (× 0.8, as the derating above).
_PCIE = 64e9 * 0.8
# A local NVMe SSD (PCIe Gen4 x4; e.g. Samsung 990 PRO datasheet: 7,450 MB/s sequential read),
# × 0.75 for block-sized reads; the disk is shared by a node's GPUs.
_NVME = 7.45e9 * 0.75

# Host tier <-> device pool copy rate of the tiny preset on this project's 2-core VM
# (bench/bench_offload.py: 1.11 GB/s on a quiet run, 0.56 under load average 8; docs/benchmarks.md).
TINY_CPU_COPY_BYTES_PER_S = 1.1e9

PRESETS = MappingProxyType({
    # Llama-3-70B on H100s: prefill terms are Preble's published fit (design §8; Preble
    # `model_equations.py`, LP_Llama3_70B_H100): 28.93 ms + 0.1822 ms/token + 0.0040 ms per
    # context token + 2.55e-6 ms per token×context. Decode attention reads 320 KiB of KV per
    # context token (80 layers × 8 KV heads × 128 × 2 (K,V) × 2 bytes), assumed spread over
    # 4 GPUs (TP4) at _HBM each. KV capacity under TP4: 4 × 80 GB × 0.9 − 140 GB weights
    # ≈ 148 GB / 320 KiB ≈ 450k tokens.
    "llama3-70b-h100": SimPreset(
        StepTimeModel(28.93e-3, 0.1822e-3, 2.55e-9, 0.0040e-3, 327_680 / (4 * _HBM),
                      source="Preble fit (prefill) + HBM roofline (decode), Llama-3-70B, 4×H100 TP4"),
        kv_blocks=28_000, max_num_seqs=128, max_num_batched_tokens=4096,
        description="Llama-3-70B bf16 on 4×H100 (TP4)",
        # A block is 16 × 320 KiB; under TP4 each GPU loads its quarter over its own link.
        tier_cost=TierCost(16 * 327_680, 4 * _PCIE, _NVME)),
    # Llama-3-8B on one H100, all terms derived: base = 16 GB of weights / _HBM (6.8 ms);
    # per token = 2 × 8.0e9 FLOPs / _FLOPS; attention per (query, key) pair = 4 × 32 layers ×
    # 4096 FLOPs / _FLOPS; decode reads 128 KiB of KV per context token (32 × 8 × 128 × 2 × 2 B)
    # / _HBM; reading a cached prefix during prefill is folded into the quadratic term.
    # KV capacity: 80 GB × 0.9 − 16 GB ≈ 56 GB / 128 KiB ≈ 430k tokens.
    "llama3-8b-h100": SimPreset(
        StepTimeModel(16e9 / _HBM, 2 * 8.0e9 / _FLOPS, 4 * 32 * 4096 / _FLOPS, 0.0, 131_072 / _HBM,
                      source="HBM/FLOP roofline, Llama-3-8B, 1×H100"),
        kv_blocks=27_000, max_num_seqs=256, max_num_batched_tokens=8192,
        description="Llama-3-8B bf16 on 1×H100",
        tier_cost=TierCost(16 * 131_072, _PCIE, _NVME)),  # a block is 16 × 128 KiB
    # The tiny preset on this project's 2-core CPU machines, from `kvfleet calibrate`
    # (see docs/benchmarks.md for the run); used to check the simulator against torch replicas.
    "tiny-cpu": SimPreset(
        # `kvfleet calibrate --mode engine --model tiny --threads 1 --num-blocks 512
        # --max-num-batched-tokens 2048 --max-num-seqs 64` on the project's AMD EPYC 2-core machine,
        # quiet (2026-11-25, after the C decode kernel): holdout median relative step-time error
        # 2.1 %; base includes the live loop's 0.53 ms turnaround. (Served mode on the same day:
        # base 3.6e-3, per_token 9.6e-5, per_seq 5.7e-4, holdout 13.1 %; it put a live 2-replica
        # fleet's TTFT ~30 % too high in bench_policy_live, this fit within ~15 %.)
        StepTimeModel(3.606e-3, 7.223e-5, 5.253e-8, 2.369e-6, 5.538e-7, 5.783e-5,
                      source="kvfleet calibrate, tiny preset, 1 thread, AMD EPYC 2-core CPU"),
        kv_blocks=512, max_num_seqs=64, max_num_batched_tokens=2048,
        description="the tiny torch preset on a 2-core CPU",
        # A tiny block is 64 KiB (4 layers × 2 × 16 × 4 heads × 32 × 4 B); host "transfers" are
        # memory copies, TINY_CPU_COPY_BYTES_PER_S measured by bench/bench_offload.py.
        tier_cost=TierCost(65_536, TINY_CPU_COPY_BYTES_PER_S, TINY_CPU_COPY_BYTES_PER_S)),
})


def get_preset(name: str) -> SimPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown sim preset {name!r}; choose one of {sorted(PRESETS)}") from None
