"""Write a run's results: summary JSON, per-request JSONL, a markdown summary and PNG plots;
and compare several runs side by side.

Files for label L in the output folder:
    L.json             summarize() (vllm bench serve's keys + kvfleet's)
    L.requests.jsonl   one line per request (times in ms)
    L.md               a markdown summary
    L.ttft_cdf.png, L.latency.png, L.replicas.png   (matplotlib, Agg backend)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from loadgen.client import RequestRecord, RunResult
from loadgen.metrics import METRICS, percentile_key, summarize, tpot_s


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)


def request_row(r: RequestRecord) -> dict:
    tp = tpot_s(r)
    return {"index": r.index, "scheduled_ms": _ms(r.scheduled_s), "sent_ms": _ms(r.sent_s), "lag_ms": _ms(r.lag_s),
            "ttft_ms": _ms(r.ttft_s), "tpot_ms": _ms(tp), "e2el_ms": _ms(r.e2el_s),
            "itl_ms": [_ms(g) for g in r.itl_s], "input_length": r.input_length, "output_length": r.output_length,
            "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "cached_tokens": r.cached_tokens,
            "replica": r.replica, "session_id": r.session_id, "tenant": r.tenant, "status": r.status,
            "success": r.success, "error": r.error, "error_kind": r.error_kind}


def safe_label(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    if not s:
        raise ValueError(f"label {label!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return s


def _fmt(v, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}f}"
    return str(v)


def markdown(summary: Mapping) -> str:
    pcts = summary.get("percentiles", [50, 90, 99])
    lines = [f"# loadgen run: {summary.get('label') or ''}", "",
             f"- target: {summary.get('url')}",
             f"- requests: {summary['num_requests']} sent, {summary['completed']} completed, {summary['failed']} failed",
             f"- duration: {_fmt(summary['duration'])} s",
             f"- request throughput: {_fmt(summary['request_throughput'])} req/s"
             + (f", goodput {_fmt(summary['request_goodput'])} req/s (SLOs ms: {summary['goodput_slos_ms']})"
                if summary.get("request_goodput") is not None else ""),
             f"- output throughput: {_fmt(summary['output_throughput'])} tok/s, total "
             f"{_fmt(summary['total_token_throughput'])} tok/s",
             f"- cache hit rate: {_fmt(summary['cache_hit_rate'], 3)}",
             f"- schedule lag ms: p50 {_fmt(summary['schedule_lag_ms']['p50'], 3)}, "
             f"p99 {_fmt(summary['schedule_lag_ms']['p99'], 3)}, max {_fmt(summary['schedule_lag_ms']['max'], 3)}",
             "", "| metric (ms) | mean | median | std | " + " | ".join(percentile_key(p) for p in pcts) + " |",
             "|---|---|---|---|" + "---|" * len(pcts)]
    for m in METRICS:
        row = [summary[f"mean_{m}_ms"], summary[f"median_{m}_ms"], summary[f"std_{m}_ms"]]
        row += [summary[f"{percentile_key(p)}_{m}_ms"] for p in pcts]
        lines.append(f"| {m.upper()} | " + " | ".join(_fmt(v) for v in row) + " |")
    if summary.get("replicas"):
        lines += ["", "| replica | requests | share | hit rate |", "|---|---|---|---|"]
        for name, rep in summary["replicas"].items():
            lines.append(f"| {name} | {rep['requests']} | {_fmt(rep['share'], 3)} | {_fmt(rep['hit_rate'], 3)} |")
    if summary.get("classes"):
        pk = [percentile_key(p) for p in pcts]
        lines += ["", "| class | requests | completed | shed (429) | failed | goodput req/s | good share | "
                  "mean TTFT ms | " + " | ".join(f"{k} TTFT ms" for k in pk) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(pk)]
        for name, c in summary["classes"].items():
            row = [c["requests"], c["completed"], c["shed"], c["failed"], c["request_goodput"], c["good_share"],
                   c["mean_ttft_ms"]] + [c[f"{k}_ttft_ms"] for k in pk]
            lines.append(f"| {name} | " + " | ".join(_fmt(v, 3 if i == 5 else 2) for i, v in enumerate(row)) + " |")
    errs = summary["errors"]
    if errs["count"]:
        lines += ["", f"errors: {errs['count']} {errs['by_kind']}"] + [f"- {e}" for e in errs["first"]]
    return "\n".join(lines) + "\n"


def write_report(result: RunResult, out_dir: str | Path, label: str, percentiles: Sequence[float] = (50, 90, 99),
                 goodput: Mapping[str, float] | None = None, plots: bool = True) -> dict[str, Path]:
    """Write the files above; returns {"json", "requests", "markdown", and the plot names: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = safe_label(label)
    summary = summarize(result, percentiles, goodput, label=label)
    paths = {"json": out / f"{name}.json", "requests": out / f"{name}.requests.jsonl", "markdown": out / f"{name}.md"}
    summary["requests_file"] = paths["requests"].name
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    with open(paths["requests"], "w") as f:
        for r in result.records:
            f.write(json.dumps(request_row(r), separators=(",", ":")) + "\n")
    paths["markdown"].write_text(markdown(summary))
    if plots:
        from loadgen.plots import plot_run

        paths.update(plot_run(result, out, name))
    return paths


def load_summary(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no results file at {p}; give the .json that `kvfleet loadgen --out DIR` wrote")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); give a loadgen results .json") from None
    if not isinstance(data, dict) or "completed" not in data:
        raise ValueError(f"{p}: not a loadgen results file (no 'completed' key)")
    return data


COMPARE_ROWS = [("completed", "completed", 0), ("failed", "failed", 0), ("request_throughput", "req/s", 2),
                ("request_goodput", "goodput req/s", 2), ("output_throughput", "output tok/s", 1),
                ("mean_ttft_ms", "mean TTFT ms", 2), ("median_ttft_ms", "median TTFT ms", 2),
                ("p90_ttft_ms", "p90 TTFT ms", 2), ("p99_ttft_ms", "p99 TTFT ms", 2),
                ("mean_tpot_ms", "mean TPOT ms", 2), ("p99_tpot_ms", "p99 TPOT ms", 2),
                ("mean_itl_ms", "mean ITL ms", 2), ("mean_e2el_ms", "mean E2E ms", 2),
                ("p99_e2el_ms", "p99 E2E ms", 2), ("cache_hit_rate", "cache hit rate", 3)]


def compare(summaries: Sequence[Mapping], names: Sequence[str] | None = None) -> str:
    """A markdown table with one column per run."""
    names = list(names or [s.get("label") or f"run{i}" for i, s in enumerate(summaries)])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, title, nd in COMPARE_ROWS:
        if not any(key in s for s in summaries):
            continue
        lines.append(f"| {title} | " + " | ".join(_fmt(s.get(key), nd) for s in summaries) + " |")
    lines.append("| lag p99 ms | " + " | ".join(_fmt((s.get("schedule_lag_ms") or {}).get("p99"), 3)
                                               for s in summaries) + " |")
    return "\n".join(lines) + "\n"
