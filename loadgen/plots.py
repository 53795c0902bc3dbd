"""PNG plots of loadgen runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from loadgen.client import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: Sequence[float], label: str) -> None:
    v = np.sort(np.asarray(values_ms, dtype=float))
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label)


def plot_run(result: RunResult, out: Path, name: str) -> dict[str, Path]:
    """TTFT CDF, latency over time, per-replica request share and hit rate."""
    plt = _pyplot()
    done = [r for r in result.records if r.success and r.ttft_s is not None]
    paths = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    _cdf(ax, [r.ttft_s * 1000 for r in done], name)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    paths["ttft_cdf"] = out / f"{name}.ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(paths["ttft_cdf"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    if done:
        t = [r.sent_s for r in done]
        ax.scatter(t, [r.ttft_s * 1000 for r in done], s=6, label="TTFT")
        ax.scatter(t, [r.e2el_s * 1000 for r in done], s=6, label="E2E", alpha=0.5)
    failed = [r for r in result.records if not r.success and r.sent_s is not None]
    if failed:
        ax.scatter([r.sent_s for r in failed], [0] * len(failed), marker="x", color="red", label="failed")
    ax.set_xlabel("send time (s from start)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("symlog")
    ax.set_title("latency over time")
    ax.grid(alpha=0.3)
    ax.legend()
    paths["latency"] = out / f"{name}.latency.png"
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=100)
    plt.close(fig)

    per: dict[str, list] = {}
    for r in done:
        per.setdefault(r.replica or "unknown", []).append(r)
    names = sorted(per)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    a1.bar(names, [len(per[n]) / max(1, len(done)) for n in names])
    a1.set_title("request share")
    hits = []
    for n in names:
        rep = [r for r in per[n] if r.cached_tokens is not None and r.prompt_tokens]
        p = sum(r.prompt_tokens for r in rep)
        hits.append(sum(r.cached_tokens for r in rep) / p if p else 0.0)
    a2.bar(names, hits)
    a2.set_ylim(0, 1)
    a2.set_title("prefix-cache hit rate")
    for a in (a1, a2):
        a.tick_params(axis="x", labelrotation=30, labelsize=7)
    paths["replicas"] = out / f"{name}.replicas.png"
    fig.tight_layout()
    fig.savefig(paths["replicas"], dpi=100)
    plt.close(fig)
    return paths


def plot_compare_cdf(summary_paths: Sequence[Path], summaries: Sequence[Mapping], out_png: Path) -> Path:
    """TTFT CDFs of several runs on one plot, read from each run's per-request JSONL."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for path, s in zip(summary_paths, summaries):
        req_file = Path(path).parent / (s.get("requests_file") or "")
        if not req_file.is_file():
            continue
        with open(req_file) as f:
            ttfts = [row["ttft_ms"] for row in map(json.loads, f) if row.get("success") and row.get("ttft_ms") is not None]
        _cdf(ax, ttfts, s.get("label") or Path(path).stem)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
