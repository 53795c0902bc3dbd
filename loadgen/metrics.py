"""Summary metrics of a run, with `vllm bench serve`'s key names and definitions.

From vllm/benchmarks/serve.py (`calculate_metrics` and the result dict of `benchmark`):
- `completed` / `failed`; `total_input_tokens` (prompt tokens of completed requests: usage's
  `prompt_tokens` when reported, else the trace's input length), `total_output_tokens`;
- `request_throughput` = completed / duration, `output_throughput`, `total_token_throughput`;
- for ttft, tpot, itl, e2el: `mean_X_ms`, `median_X_ms`, `std_X_ms` (population std, numpy's
  default) and `pP_X_ms` for each selected percentile (numpy linear interpolation; the key is
  `p99`, `p99.9`, ...);
- TPOT = (E2E - TTFT) / (output_tokens - 1) over requests with more than one output token; ITL
  pools every request's gaps;
- `request_goodput` = requests meeting every SLO / duration, where an SLO `ttft:500` etc. is in
  ms and a request meets it when its value is <= the SLO; for goodput a request with <= 1 output
  token counts TPOT as 0 (as vLLM does); None when no SLO is given;
- `max_output_tokens_per_s` (tokens received in the busiest 1-s bucket) and
  `max_concurrent_requests` (most requests active in a 1-s bucket).

kvfleet's additions: `cache_hit_rate` (sum cached / sum prompt tokens over completed requests
that reported usage), `replicas` (per serving replica: requests, share, hit rate),
`schedule_lag_ms` (p50 / p99 / max of send time - scheduled time), `errors` (count by kind and
the first few messages).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from loadgen.client import RequestRecord, RunResult

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")  # what vllm bench serve's --goodput accepts


def parse_goodput(specs: Iterable[str] | str | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` or `"ttft:500 tpot:50"` -> {"ttft": 500.0, "tpot": 50.0} (ms)."""
    if not specs:
        return {}
    items = specs.split() if isinstance(specs, str) else [s for spec in specs for s in spec.split()]
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad goodput SLO {item!r}: write KEY:MS with KEY one of {', '.join(SLO_KEYS)}, "
                             "e.g. --goodput ttft:500 tpot:50")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms >= 0:
            raise ValueError(f"bad goodput SLO {item!r}: the value must not be negative")
        out[key] = ms
    return out


def parse_percentiles(spec: str | Sequence[float]) -> tuple[float, ...]:
    """`"50,90,99"` -> (50.0, 90.0, 99.0)."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    try:
        out = tuple(float(p) for p in items)
    except ValueError:
        raise ValueError(f"bad percentiles {spec!r}: write numbers separated by commas, e.g. 50,90,99") from None
    if not out or any(not 0 <= p <= 100 for p in out):
        raise ValueError(f"bad percentiles {spec!r}: each must be between 0 and 100")
    return out


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def tpot_s(rec: RequestRecord) -> float | None:
    """(E2E - TTFT) / (output_tokens - 1), or None with one output token or fewer."""
    if rec.e2el_s is None or rec.ttft_s is None or rec.output_tokens <= 1:
        return None
    return (rec.e2el_s - rec.ttft_s) / (rec.output_tokens - 1)


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(np.mean(v)), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(np.std(v))}
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(v, p))
    return out


def is_good(rec: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """Whether a completed request meets every SLO (vllm bench serve's goodput rule)."""
    values = {"ttft": rec.ttft_s, "tpot": tpot_s(rec) or 0.0, "e2el": rec.e2el_s}
    return all(values[k] is not None and values[k] <= slo / 1000.0 for k, slo in slos_ms.items())


def _peaks(done: Sequence[RequestRecord]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s and max_concurrent_requests over 1-s buckets."""
    if not done:
        return 0.0, 0
    start = min(r.sent_s for r in done)
    end = max(r.sent_s + r.e2el_s for r in done)
    nb = int(math.ceil(end - start)) + 1
    tokens = np.zeros(nb)
    active = np.zeros(nb)
    for r in done:
        t = r.sent_s + r.ttft_s
        times = [t]
        for gap in r.itl_s:
            t += gap
            times.append(t)
        idx = np.minimum((np.asarray(times) - start).astype(int), nb - 1)
        np.add.at(tokens, idx, 1)
        active[int(r.sent_s - start): int(r.sent_s + r.e2el_s - start) + 1] += 1
    return float(tokens.max()), int(active.max())


def summarize(result: RunResult, percentiles: Sequence[float] = (50, 90, 99),
              goodput: Mapping[str, float] | None = None, label: str | None = None) -> dict:
    """The results JSON of a run (vLLM's keys first, then kvfleet's)."""
    recs = result.records
    done = [r for r in recs if r.success and r.ttft_s is not None and r.e2el_s is not None]
    dur = result.duration_s if result.duration_s > 0 else float("nan")
    total_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_length for r in done)
    total_out = sum(r.output_tokens for r in done)
    good = sum(1 for r in done if is_good(r, goodput)) if goodput else None
    out: dict = {
        "label": label,
        "url": result.url,
        "duration": result.duration_s,
        "num_requests": len(recs),
        "completed": len(done),
        "failed": len(recs) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / dur,
        "request_goodput": None if good is None else good / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "goodput_slos_ms": dict(goodput or {}),
        "percentiles": list(percentiles),
    }
    max_tok, max_conc = _peaks(done)
    out["max_output_tokens_per_s"] = max_tok
    out["max_concurrent_requests"] = max_conc
    series = {"ttft": [r.ttft_s for r in done],
              "tpot": [t for t in (tpot_s(r) for r in done) if t is not None],
              "itl": [g for r in done for g in r.itl_s],
              "e2el": [r.e2el_s for r in done]}
    for name in METRICS:
        out.update(_stats(name, series[name], percentiles))
    out.update(kvfleet_metrics(result))
    out["classes"] = per_class(result, percentiles, goodput)
    return out


def per_class(result: RunResult, percentiles: Sequence[float] = (50, 90, 99),
              goodput: Mapping[str, float] | None = None) -> dict:
    """Per request class (each record's `tenant`: the class sent with LoadConfig.class_header),
    when the run has classes: requests, completed, shed (429: a balancer with --fairness refused
    it), other failures, goodput (req/s meeting every SLO over the run's duration; None without
    SLOs) and TTFT statistics of the completed ones. {} for a run without classes."""
    by: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in result.records:
        if r.tenant is not None:
            by[r.tenant].append(r)
    dur = result.duration_s if result.duration_s > 0 else float("nan")
    out = {}
    for name, recs in sorted(by.items()):
        done = [r for r in recs if r.success and r.ttft_s is not None and r.e2el_s is not None]
        shed = sum(1 for r in recs if r.status == 429)
        good = sum(1 for r in done if is_good(r, goodput)) if goodput else None
        out[name] = {"requests": len(recs), "completed": len(done), "shed": shed,
                     "failed": len(recs) - len(done) - shed,
                     "request_throughput": len(done) / dur,
                     "request_goodput": None if good is None else good / dur,
                     "good_share": None if good is None else good / len(recs),
                     **_stats("ttft", [r.ttft_s for r in done], percentiles)}
    return out


def kvfleet_metrics(result: RunResult) -> dict:
    recs = result.records
    done = [r for r in recs if r.success]
    reported = [r for r in done if r.cached_tokens is not None and r.prompt_tokens]
    cached = sum(r.cached_tokens for r in reported)
    prompt = sum(r.prompt_tokens for r in reported)
    per: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in done:
        per[r.replica or "unknown"].append(r)
    replicas = {}
    for name, rs in sorted(per.items()):
        rep = [r for r in rs if r.cached_tokens is not None and r.prompt_tokens]
        p = sum(r.prompt_tokens for r in rep)
        replicas[name] = {"requests": len(rs), "share": len(rs) / len(done),
                          "cached_tokens": sum(r.cached_tokens for r in rep), "prompt_tokens": p,
                          "hit_rate": (sum(r.cached_tokens for r in rep) / p) if p else None}
    lags = np.asarray([r.lag_s for r in recs if r.lag_s is not None], dtype=float) * 1000.0
    lag = ({"p50": float(np.percentile(lags, 50)), "p99": float(np.percentile(lags, 99)),
            "max": float(lags.max()), "mean": float(lags.mean())} if lags.size else
           {"p50": None, "p99": None, "max": None, "mean": None})
    failed = [r for r in recs if not r.success]
    kinds = Counter(r.error_kind or ("not_sent" if r.sent_s is None else "other") for r in failed)
    return {
        "cache_hit_rate": (cached / prompt) if prompt else None,
        "cached_tokens": cached,
        "replicas": replicas,
        "schedule_lag_ms": lag,
        "closed_loop": result.closed_loop,
        "errors": {"count": len(failed), "by_kind": dict(kinds),
                   "first": [f"request {r.index}: {r.error}" for r in failed[:5]]},
    }
