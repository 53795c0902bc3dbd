"""`kvfleet simulate --sweep FILE`: a matrix of simulations, one table against the bounds.

A sweep file (TOML) names workloads — trace files, or kvfleet's own generators — and the axes
to cross: fleet sizes, loads, KV tokens per replica, seeds. Every cell (workload × replicas ×
load × KV × host tier × seed) replays the same requests under every policy, each (cell, policy) pair in its
own worker process, and the table gives per cell the best peer (the policy other than the
candidate and its variants with the lowest mean TTFT), the candidate, both bounds, the share of the gap
between best peer and ideal TTFT the candidate closes (mean and p99) and the hit rates, then
how many cells meet issue #15's goals; with `[variants]`, a second table puts each variant's
TTFT, TPOT, E2E and hit rate beside the candidate's and the best peer's. Example file (bench/routing_matrix.toml is the full one):

    preset = "llama3-8b-h100"
    candidate = "predictive"
    policies = ["least_request", "dynamo_kv", "llmd_scorer", "preble_e2", "predictive"]
    replicas = [8]
    loads = [0.8, 0.9]
    kv_tokens = [120000]
    seeds = [0]
    requests_per_replica = 125      # 1,000 requests on 8 replicas
    [[workloads]]
    name = "mooncake"
    trace = "../shared/traces/mooncake_synthetic.jsonl"   # relative to this file, else the cwd
    [[workloads]]
    name = "chat"
    generate = { kind = "chat", session_rate = 1.0, tenants = 8, burstiness = 0.5 }
    [variants.pred_w05]               # a policy with settings, named for `policies`/`candidate`
    policy = "predictive"
    others_weight = 0.5

`host_kv_tokens = [0, 480000]` adds a KV offload tier of that many tokens below each replica's
device pool (simulator/tiers.py; the KV column reads "120k+480k"), `host_link` its link.

Seeds: a generated workload is generated from the seed; a trace is cut into windows of
consecutive requests, seed k taking the k-th (and the first one, with other prompt contents,
when the trace is too short for it). Same file, same results, whatever the worker count.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

BLOCK_TOKENS = 16
# issue #15's goals: gap closed on the mean at loads up to GOAL_LOAD, p99 never above the best
# peer, at load 1.0 the mean never above it, hit rate >= HIT_SHARE of the pooled-cache bound.
GOAL_GAP = 0.6
GOAL_LOAD = 0.9
HIT_SHARE = 0.8


@dataclass(frozen=True)
class Workload:
    name: str
    trace: str | None = None  # a trace file ...
    format: str = "auto"
    generate: tuple[tuple[str, object], ...] = ()  # ... or GenerateConfig fields (kind, ...)

    def __post_init__(self) -> None:
        if (self.trace is None) == (not self.generate):
            raise ValueError(f"workload {self.name!r}: give exactly one of trace = FILE or generate = {{kind = ...}}")


@dataclass(frozen=True)
class SweepSpec:
    workloads: tuple[Workload, ...]
    policies: tuple[str, ...]
    candidate: str = "predictive"
    preset: str = "llama3-8b-h100"
    replicas: tuple[int, ...] = (8,)
    loads: tuple[float, ...] = (0.8,)
    kv_tokens: tuple[int, ...] = (120_000,)
    seeds: tuple[int, ...] = (0,)
    requests_per_replica: int = 125
    max_requests: int = 4000
    predictor: str = "ensemble"
    # How often replicas' load reports reach the balancer; None: a live replica's cadence
    # (simulator.run.DEFAULT_LOAD_REPORT_INTERVAL_S), 0: after every step.
    load_report_interval_s: float | None = None
    # Named policy settings, usable in `policies` like a policy: (label, policy, ((key, value), ...))
    variants: tuple[tuple[str, str, tuple[tuple[str, object], ...]], ...] = ()
    # KV offload tier below each replica's device pool, in tokens (an axis, like kv_tokens; 0: no
    # host tier), and the host link (simulator/tiers.py HOST_LINKS; "": the preset's PCIe Gen5).
    host_kv_tokens: tuple[int, ...] = (0,)
    host_link: str = ""

    def __post_init__(self) -> None:
        from balancer.policies import policy_names
        from replica.step_model import PRESETS

        for label, policy, _ in self.variants:
            if policy not in policy_names() or label in policy_names():
                raise ValueError(f"variant {label!r}: policy {policy!r} must be a policy and the label not one")
        labels = {v[0] for v in self.variants}
        unknown = [p for p in self.policies if p not in policy_names() and p not in labels]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {policy_names()}")
        own = self.resolve(self.candidate)[0]
        if self.candidate not in self.policies or all(self.resolve(p)[0] == own for p in self.policies):
            raise ValueError(f"policies must hold the candidate {self.candidate!r} and at least one peer (a policy "
                             f"other than {own!r}: the candidate's own variants are not its peers), e.g. round_robin")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if not (self.workloads and self.replicas and self.loads and self.kv_tokens and self.seeds):
            raise ValueError("workloads, replicas, loads, kv_tokens and seeds must each have at least one entry")
        if len({w.name for w in self.workloads}) != len(self.workloads):
            raise ValueError("workload names must be unique")
        if not self.host_kv_tokens or min(self.host_kv_tokens) < 0:
            raise ValueError("host_kv_tokens must list at least one size >= 0 (0: no host tier)")
        if self.host_link:
            from simulator.tiers import HOST_LINKS

            if self.host_link not in HOST_LINKS:
                raise ValueError(f"unknown host_link {self.host_link!r}; choose one of {sorted(HOST_LINKS)}")
        if min(self.kv_tokens) < BLOCK_TOKENS or self.requests_per_replica < 1 or self.max_requests < 1:
            raise ValueError("kv_tokens must hold a block; requests_per_replica and max_requests must be positive")

    def resolve(self, label: str) -> tuple[str, tuple[tuple[str, object], ...]]:
        """(policy, options) for an entry of `policies`."""
        for name, policy, options in self.variants:
            if name == label:
                return policy, options
        return label, ()

    def cells(self) -> list[Cell]:
        return [Cell(w, n, load, kv, seed, min(self.requests_per_replica * n, self.max_requests), host)
                for w, n, load, kv, host, seed in itertools.product(self.workloads, self.replicas, self.loads,
                                                                    self.kv_tokens, self.host_kv_tokens, self.seeds)]


@dataclass(frozen=True)
class Cell:
    workload: Workload
    replicas: int
    load: float
    kv_tokens: int
    seed: int
    requests: int
    host_kv_tokens: int = 0  # the host tier below each device pool (0: none)

    @property
    def key(self) -> tuple:
        base = (self.workload.name, self.replicas, self.load, self.kv_tokens, self.seed)
        return base + (self.host_kv_tokens,) if self.host_kv_tokens else base

    @property
    def kv_label(self) -> str:
        """KV tokens per replica for tables: "120k", or "120k+480k" with a host tier."""
        return f"{self.kv_tokens // 1000}k" + (f"+{self.host_kv_tokens // 1000}k" if self.host_kv_tokens else "")


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep file; relative trace paths are taken from the file's folder, else the cwd."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no sweep file at {p}; bench/routing_matrix.toml is an example to copy")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from None
    workloads = []
    for w in raw.pop("workloads", []):
        w = dict(w)
        if "trace" in w:
            t = Path(w["trace"])
            if not t.is_absolute() and (p.parent / t).is_file():
                t = p.parent / t
            w["trace"] = str(t)
        gen = w.pop("generate", None) or {}
        try:
            workloads.append(Workload(generate=tuple(sorted(gen.items())), **w))
        except TypeError as e:
            raise ValueError(f"{p}: workload {w.get('name')!r}: {e}; keys are name, trace, format, generate") from None
    variants = []
    for label, v in raw.pop("variants", {}).items():
        v = dict(v)
        if "policy" not in v:
            raise ValueError(f"{p}: variant {label!r} needs policy = NAME (and its settings)")
        variants.append((label, v.pop("policy"), tuple(sorted(v.items()))))
    raw["variants"] = tuple(variants)
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    extra = set(raw) - known
    if extra:
        raise ValueError(f"{p}: unknown keys {sorted(extra)}; known: {sorted(known)}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return SweepSpec(workloads=tuple(workloads), **tuples)


def cell_trace(cell: Cell) -> tuple[list, int]:
    """The cell's requests (TraceRequests, first arrival at 0) and the seed for their prompts'
    contents: a trace window's own index, or the cell's seed when the trace is too short."""
    from loadgen.generate import GenerateConfig, generate
    from loadgen.traces import load_trace

    w, n = cell.workload, cell.requests
    if w.generate:
        return generate(GenerateConfig(**dict(w.generate), num_requests=n, seed=cell.seed)), 0
    trace = load_trace(w.trace, w.format)
    if (cell.seed + 1) * n <= len(trace):
        start, prompt_seed = cell.seed * n, 0
    else:
        start, prompt_seed = 0, cell.seed
    window = trace[start:start + n]
    t0 = window[0].arrival_s
    return [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in window], prompt_seed


def cell_config(spec: SweepSpec, cell: Cell, policy: str, extra_options: tuple[tuple[str, object], ...] = ()):
    """(the cell's requests, the simulate() config of `policy` on it): a variant label resolves
    to its policy and options; `extra_options` are added to them."""
    from replica.step_model import get_preset
    from simulator.run import SimulateConfig

    trace, prompt_seed = cell_trace(cell)
    name, options = spec.resolve(policy)
    options = (*options, *extra_options)
    cfg = SimulateConfig(cell.replicas, get_preset(spec.preset), (name,), kv_blocks=cell.kv_tokens // BLOCK_TOKENS,
                         load=cell.load, seed=prompt_seed, predictor=spec.predictor,
                         policy_options=((name, options),) if options else (),
                         host_kv_blocks=cell.host_kv_tokens // BLOCK_TOKENS, host_link=spec.host_link,
                         **({} if spec.load_report_interval_s is None
                            else {"load_report_interval_s": spec.load_report_interval_s}))
    return trace, cfg


def run_pair(spec: SweepSpec, cell: Cell, policy: str) -> dict:
    """One policy on one cell (a worker's task): the simulate() summary and the bounds."""
    from simulator.run import simulate

    out = simulate(*cell_config(spec, cell, policy))
    return {"policy": out["policies"][0], "bounds": out["bounds"], "config": out["config"]}


def run_sweep(spec: SweepSpec, jobs: int | None = None,
              progress: Callable[[int, int, Cell, str, float], None] | None = None) -> dict:
    """Every (cell, policy) pair, `jobs` worker processes at a time (default: the CPUs)."""
    cells = spec.cells()
    pairs = [(c, p) for c in cells for p in spec.policies]
    jobs = max(1, jobs or os.cpu_count() or 1)
    results: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    if jobs == 1:
        for i, (c, p) in enumerate(pairs):
            results[(c.key, p)] = run_pair(spec, c, p)
            if progress:
                progress(i + 1, len(pairs), c, p, time.perf_counter() - t0)
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("forkserver")) as pool:
            futures = {pool.submit(run_pair, spec, c, p): (c, p) for c, p in pairs}
            for i, f in enumerate(as_completed(futures)):
                c, p = futures[f]
                results[(c.key, p)] = f.result()
                if progress:
                    progress(i + 1, len(pairs), c, p, time.perf_counter() - t0)
    rows = [cell_row(spec, c, {p: results[(c.key, p)] for p in spec.policies}) for c in cells]
    return {"spec": _spec_json(spec), "rows": rows, "summary": summarize_rows(rows),
            "wall_s": time.perf_counter() - t0, "jobs": jobs,
            "simulated_requests": sum(r["requests"] for r in rows) * len(spec.policies)}


def _gap(peer: float, cand: float, ideal: float) -> float | None:
    """Share of the peer→ideal gap the candidate closes (negative: worse than the peer)."""
    gap = peer - ideal
    return None if gap <= 1e-6 else (peer - cand) / gap


def cell_row(spec: SweepSpec, cell: Cell, by_policy: dict[str, dict]) -> dict:
    cand = by_policy[spec.candidate]["policy"]
    # Peers: the other policies (the candidate's own variants are not peers of it).
    own = spec.resolve(spec.candidate)[0]
    peers = {p: r["policy"] for p, r in by_policy.items() if spec.resolve(p)[0] != own}
    best = min(peers, key=lambda p: (peers[p]["mean_ttft_s"], p))
    best_p99 = min(peers, key=lambda p: (peers[p]["p99_ttft_s"], p))
    best_e2e = min(peers, key=lambda p: (peers[p]["mean_e2el_s"], p))
    b = by_policy[spec.candidate]["bounds"]
    peer = peers[best]
    return {
        "workload": cell.workload.name, "replicas": cell.replicas, "load": cell.load, "kv_tokens": cell.kv_tokens,
        "host_kv_tokens": cell.host_kv_tokens, "kv_label": cell.kv_label, "seed": cell.seed, "requests": cand["completed"] + cand["rejected"],
        "best_peer": best, "peer_mean_ttft_s": peer["mean_ttft_s"], "peer_p99_ttft_s": peer["p99_ttft_s"],
        "best_p99_peer": best_p99, "best_peer_p99_ttft_s": peers[best_p99]["p99_ttft_s"],
        "mean_ttft_s": cand["mean_ttft_s"], "p99_ttft_s": cand["p99_ttft_s"],
        "ideal_mean_ttft_s": b["ideal_mean_ttft_s"], "ideal_p99_ttft_s": b["ideal_p99_ttft_s"],
        "gap_closed_mean": _gap(peer["mean_ttft_s"], cand["mean_ttft_s"], b["ideal_mean_ttft_s"]),
        "gap_closed_p99": _gap(peers[best_p99]["p99_ttft_s"], cand["p99_ttft_s"], b["ideal_p99_ttft_s"]),
        # TTFT is what the goals score; E2E (prefill + every decode step) is what the user waits
        # for the whole answer, against the peer with the lowest mean E2E
        "best_e2e_peer": best_e2e, "best_peer_mean_e2e_s": peers[best_e2e]["mean_e2el_s"],
        "mean_e2e_s": cand["mean_e2el_s"],
        "hit_rate": cand["cache_hit_rate"], "peer_hit_rate": peer["cache_hit_rate"],
        "pooled_hit_rate": b["pooled_cache_hit_rate"], "infinite_hit_rate": b["infinite_cache_hit_rate"],
        # with offload tiers: the pooled hierarchy's lower-tier hits and TTFT (simulator/bounds.py)
        **{k: b[k] for k in ("pooled_lower_hit_rate", "pooled_mean_ttft_s", "pooled_p99_ttft_s") if k in b},
        "policies": {p: {k: r["policy"][k] for k in ("mean_ttft_s", "p99_ttft_s", "mean_tpot_s", "mean_e2el_s",
                                                     "cache_hit_rate", "wall_s", "completed")}
                     | ({"load_s_per_token": r["policy"]["load_s_per_token"]} if "load_s_per_token" in r["policy"] else {})
                     for p, r in by_policy.items()},
    }


def summarize_rows(rows: Sequence[dict]) -> dict:
    """How many cells meet each of issue #15's goals (module constants)."""
    def count(sel, ok):
        picked = [r for r in rows if sel(r)]
        return {"met": sum(1 for r in picked if ok(r)), "cells": len(picked)}

    return {
        "gap_mean": count(lambda r: r["load"] <= GOAL_LOAD,
                          lambda r: r["gap_closed_mean"] is None or r["gap_closed_mean"] >= GOAL_GAP),
        "p99_not_worse": count(lambda r: True, lambda r: r["p99_ttft_s"] <= r["best_peer_p99_ttft_s"] + 1e-9),
        "mean_not_worse_at_1": count(lambda r: r["load"] >= 1.0, lambda r: r["mean_ttft_s"] <= r["peer_mean_ttft_s"] + 1e-9),
        "mean_not_worse": count(lambda r: True, lambda r: r["mean_ttft_s"] <= r["peer_mean_ttft_s"] + 1e-9),
        "e2e_not_worse": count(lambda r: True, lambda r: r["mean_e2e_s"] <= r["best_peer_mean_e2e_s"] + 1e-9),
        "hit_vs_pooled": count(lambda r: r["pooled_hit_rate"] > 0.01,
                               lambda r: r["hit_rate"] >= HIT_SHARE * r["pooled_hit_rate"]),
    }


def _kv(row: dict) -> str:
    """A row's KV column (rows written before host tiers have no kv_label)."""
    return row.get("kv_label") or f"{row['kv_tokens'] // 1000}k"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.0f} %"


def sweep_table(out: dict) -> str:
    from simulator.run import md_table

    cand = out["spec"]["candidate"]
    head = ["workload", "repl", "load", "KV tok", "seed", "best peer", "peer mean", f"{cand} mean", "ideal mean",
            "gap closed", "peer p99", f"{cand} p99", "ideal p99", "gap closed p99", "best E2E peer", "peer E2E",
            f"{cand} E2E", "hit", "peer hit", "pooled", "inf"]
    rows = [head]
    for r in out["rows"]:
        rows.append([r["workload"], str(r["replicas"]), f"{r['load']:.1f}", _kv(r), str(r["seed"]),
                     r["best_peer"], f"{r['peer_mean_ttft_s']:.3f}", f"{r['mean_ttft_s']:.3f}",
                     f"{r['ideal_mean_ttft_s']:.3f}", _pct(r["gap_closed_mean"]),
                     f"{r['best_peer_p99_ttft_s']:.3f}", f"{r['p99_ttft_s']:.3f}", f"{r['ideal_p99_ttft_s']:.3f}",
                     _pct(r["gap_closed_p99"]), r["best_e2e_peer"], f"{r['best_peer_mean_e2e_s']:.2f}",
                     f"{r['mean_e2e_s']:.2f}", f"{r['hit_rate']:.3f}", f"{r['peer_hit_rate']:.3f}",
                     f"{r['pooled_hit_rate']:.3f}", f"{r['infinite_hit_rate']:.3f}"])
    lines = [md_table(rows)]
    s = out["summary"]
    lines += ["", f"TTFT in seconds; gap closed = (best peer − {cand}) / (best peer − ideal), p99 against the peer "
                  f"with the lowest p99; mean E2E against the peer with the lowest mean E2E; hit rates: {cand}, "
                  f"best peer, pooled-cache and infinite-cache bounds.",
              f"- mean gap closed ≥ {GOAL_GAP:.0%} at loads ≤ {GOAL_LOAD}: {s['gap_mean']['met']} of {s['gap_mean']['cells']} cells",
              f"- p99 TTFT not above the best peer's: {s['p99_not_worse']['met']} of {s['p99_not_worse']['cells']}",
              f"- mean TTFT not above the best peer's: {s['mean_not_worse']['met']} of {s['mean_not_worse']['cells']} "
              f"(at load 1.0: {s['mean_not_worse_at_1']['met']} of {s['mean_not_worse_at_1']['cells']})",
              f"- mean E2E not above the best peer's (not a goal; what the whole answer takes): "
              f"{s['e2e_not_worse']['met']} of {s['e2e_not_worse']['cells']}",
              f"- hit rate ≥ {HIT_SHARE:.0%} of the pooled-cache bound: {s['hit_vs_pooled']['met']} of "
              f"{s['hit_vs_pooled']['cells']} (cells where the bound is above 0.01)",
              f"- {out['simulated_requests']} simulated requests in {out['wall_s']:.0f} s on {out['jobs']} worker processes "
              f"({out['simulated_requests'] / max(out['wall_s'], 1e-9):.0f} requests/s)"]
    if out["spec"]["variants"]:
        lines += ["", variants_table(out)]
    return "\n".join(lines)


def variants_table(out: dict) -> str:
    """Per cell, the candidate's variants beside the candidate and the best peer (the main table
    scores the candidate alone; a variant is how an option of it is A/B-tested)."""
    from simulator.run import md_table

    cand = out["spec"]["candidate"]
    shown = [cand, *out["spec"]["variants"]]
    rows = [["workload", "repl", "load", "KV tok", "seed", "policy", "TTFT mean s", "TTFT p99 s", "TPOT ms",
             "E2E mean s", "hit"]]
    for r in out["rows"]:
        for name in [*shown, r["best_peer"]]:
            p = r["policies"].get(name)
            if p is None:
                continue
            label = name if name in shown else f"{name} (best peer)"
            rows.append([r["workload"], str(r["replicas"]), f"{r['load']:.1f}", _kv(r),
                         str(r["seed"]), label, f"{p['mean_ttft_s']:.3f}", f"{p['p99_ttft_s']:.3f}",
                         f"{1e3 * p['mean_tpot_s']:.1f}", f"{p['mean_e2el_s']:.2f}", f"{p['cache_hit_rate']:.3f}"])
    return f"{cand} and its variants ([variants] of the sweep file):\n\n" + md_table(rows)


def _spec_json(spec: SweepSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["variants"] = {label: {"policy": policy, **dict(options)} for label, policy, options in spec.variants}
    d["workloads"] = [{"name": w.name, "trace": w.trace, "format": w.format, "generate": dict(w.generate)}
                      for w in spec.workloads]
    return d


def write_sweep(out: dict, out_dir: str | Path) -> dict[str, Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "sweep.json", "table": d / "sweep.md"}
    paths["json"].write_text(json.dumps(out, indent=2))
    paths["table"].write_text(sweep_table(out) + "\n")
    return paths


__all__ = ["Cell", "SweepSpec", "Workload", "cell_config", "cell_trace", "load_spec", "run_sweep", "sweep_table", "variants_table",
           "write_sweep"]
