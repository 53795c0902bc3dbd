"""Online (prequential) evaluation of predictors over a trace.

Requests are taken in arrival order. Each predictor predicts request i before it has seen i's
output; i is observed `delay` requests later (delay 0: right after its prediction; delay K
models completion lag: K other requests arrive before it ends). Every predictor starts empty and
sees exactly the same stream, so the numbers compare like with like.

Reported per predictor, on all requests and on the requests that have prefix history (their
first block was already observed, so at least one block-hash depth has been seen), each beside
the global-median baseline: MAE, MAE / baseline MAE, median relative error, Kendall tau-b of
prediction vs actual, log2-bucket accuracy, coverage of [p10, p90], and the mean cost of a
predict and an observe in microseconds.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from predictors import BASELINE, make_predictor, predictor_names
from predictors.base import Features
from predictors.features import from_trace_request
from predictors.metrics import bucket_accuracy, coverage, kendall_tau, mae, median_relative_error

DEFAULT_PREDICTORS = ("global_median", "max_tokens", "prefix_history", "online_regressor", "ensemble")
SUBSETS = ("all", "history")


@dataclass(frozen=True)
class EvalConfig:
    predictors: tuple[str, ...] = DEFAULT_PREDICTORS  # the baseline is added when missing
    delay: int = 0  # observe each request after this many later requests were predicted
    max_requests: int | None = None  # only the first N requests (in arrival order)

    def __post_init__(self) -> None:
        if not self.predictors:
            raise ValueError("give at least one predictor")
        unknown = [p for p in self.predictors if p not in predictor_names()]
        if unknown:
            raise ValueError(f"unknown predictor(s) {unknown}; choose from {', '.join(predictor_names())}")
        if len(set(self.predictors)) != len(self.predictors):
            raise ValueError(f"a predictor is listed twice: {self.predictors}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0 requests, got {self.delay}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.predictors if BASELINE in self.predictors else (BASELINE, *self.predictors)


def history_mask(features: Sequence[Features], delay: int) -> np.ndarray:
    """True for requests whose first block was observed before their prediction (chained hashes:
    any depth seen implies the first block seen), with the same observation delay."""
    seen: set[int] = set()
    pending: deque[Features] = deque()
    out = np.zeros(len(features), dtype=bool)
    for i, f in enumerate(features):
        out[i] = bool(f.block_hashes) and f.block_hashes[0] in seen
        pending.append(f)
        if len(pending) > delay:
            done = pending.popleft()
            if done.block_hashes:
                seen.add(done.block_hashes[0])
    return out


def replay(name: str, features: Sequence[Features], actual: Sequence[int], delay: int) -> dict[str, Any]:
    """One predictor over the stream: its predictions (arrays) and costs."""
    p = make_predictor(name)
    n = len(features)
    point, p10, p90 = np.zeros(n), np.zeros(n), np.zeros(n)
    sources: Counter[str] = Counter()
    pending: deque[int] = deque()
    t_pred = t_obs = 0
    clock = time.perf_counter_ns
    for i, f in enumerate(features):
        t0 = clock()
        pr = p.predict(f)
        t_pred += clock() - t0
        point[i], p10[i], p90[i] = pr.tokens, pr.p10, pr.p90
        sources[pr.source.removeprefix("ensemble:").split(":", 1)[0]] += 1  # prefix / tenant / global / ...
        pending.append(i)
        if len(pending) > delay:
            j = pending.popleft()
            t0 = clock()
            p.observe(features[j], actual[j])
            t_obs += clock() - t0
    n_obs = max(1, n - len(pending))
    return {"point": point, "p10": p10, "p90": p90, "sources": dict(sources),
            "predict_us": t_pred / max(n, 1) / 1e3, "observe_us": t_obs / n_obs / 1e3,
            "memory_items": p.memory_items(), "max_memory_items": p.max_memory_items()}


def _metrics(r: dict[str, Any], y: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    yy = y[mask]
    return {"n": int(mask.sum()), "mae": mae(r["point"][mask], yy),
            "median_rel_err": median_relative_error(r["point"][mask], yy),
            "kendall_tau": kendall_tau(r["point"][mask], yy) if mask.sum() > 1 else math.nan,
            "bucket_acc": bucket_accuracy(r["point"][mask], yy),
            "coverage_p10_p90": coverage(r["p10"][mask], r["p90"][mask], yy)}


def evaluate_features(features: Sequence[Features], actual: Sequence[int], config: EvalConfig) -> dict[str, Any]:
    """The evaluation of config's predictors over a stream of (features, actual output tokens)."""
    if len(features) != len(actual):
        raise ValueError(f"{len(features)} features but {len(actual)} output lengths")
    if config.max_requests is not None:
        features, actual = features[: config.max_requests], actual[: config.max_requests]
    y = np.asarray(actual, float)
    masks = {"all": np.ones(len(y), dtype=bool), "history": history_mask(features, config.delay)}
    out: dict[str, Any] = {"requests": len(y), "delay": config.delay,
                           "with_history": int(masks["history"].sum()), "predictors": {}}
    for name in config.names:
        r = replay(name, features, actual, config.delay)
        out["predictors"][name] = {
            **{s: _metrics(r, y, m) for s, m in masks.items()},
            **{k: r[k] for k in ("predict_us", "observe_us", "memory_items", "max_memory_items", "sources")},
        }
    base = out["predictors"][BASELINE]
    for res in out["predictors"].values():
        for s in SUBSETS:
            b = base[s]["mae"]
            res[s]["mae_vs_baseline"] = res[s]["mae"] / b if b and not math.isnan(b) else math.nan
    return out


def evaluate_trace(trace, config: EvalConfig | None = None) -> dict[str, Any]:
    """Evaluate over loadgen TraceRequests (taken in arrival order)."""
    config = config or EvalConfig()
    reqs = sorted(trace, key=lambda r: r.arrival_s)
    if config.max_requests is not None:
        reqs = reqs[: config.max_requests]
    return evaluate_features([from_trace_request(r) for r in reqs], [r.output_length for r in reqs], config)


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def table(result: dict[str, Any]) -> str:
    """Markdown: one table per subset (all requests, requests with prefix history)."""
    titles = {"all": f"all requests (n={result['requests']})",
              "history": f"requests with prefix history (n={result['with_history']})"}
    lines = []
    for s in SUBSETS:
        if s == "history" and not result["with_history"]:
            lines += ["", "no request has prefix history (the trace has no hash ids, or none repeats)"]
            continue
        lines += ["", f"**{titles[s]}**, observation delay {result['delay']} requests", "",
                  "| predictor | MAE | MAE / baseline | median rel. err | Kendall τ | log2-bucket acc "
                  "| p10–p90 coverage"
                  + (" | predict µs | observe µs |" if s == "all" else " |"),
                  "|---|---|---|---|---|---|---" + ("|---|---|" if s == "all" else "|")]
        for name, r in result["predictors"].items():
            m = r[s]
            ratio = m["mae_vs_baseline"]
            row = [name, _fmt(m["mae"], 4), "–" if math.isnan(ratio) else f"{ratio:.3f}", _fmt(m["median_rel_err"]),
                   _fmt(m["kendall_tau"]), _fmt(m["bucket_acc"]), _fmt(m["coverage_p10_p90"])]
            if s == "all":
                row += [_fmt(r["predict_us"]), _fmt(r["observe_us"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines[1:])


def write(result: dict[str, Any], out_dir: str | Path, label: str) -> dict[str, Path]:
    """LABEL.json and LABEL.md under out_dir."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / f"{label}.json", "md": d / f"{label}.md"}
    paths["json"].write_text(json.dumps(_plain(result), indent=2) + "\n")
    paths["md"].write_text(table(result) + "\n")
    return paths


def _plain(o: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN to null (strict JSON has no NaN)."""
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return None if math.isnan(o) else float(o)
    return o
