"""The demo: a local fleet of tiny replicas behind the balancer replays a bundled trace under
`round_robin` and under kvfleet's `predictive`, then prints the comparison, one sentence with
the verdict, and writes the report (with both TTFT distributions on one plot).

The bundled trace is the project's own agentic multi-tenant workload (loadgen/data), with
prompts scaled down for a 2-core CPU, output lengths capped, and arrivals sped up. Between
policies every replica's prefix cache is emptied, so each policy starts cold.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path

from kvfleet.fleet import FleetSpec, LocalFleet
from loadgen.client import LoadConfig, run_load
from loadgen.metrics import summarize
from loadgen.report import compare, write_report
from loadgen.traces import TraceOptions, load_trace

BUNDLED = Path(__file__).resolve().parent.parent / "loadgen" / "data" / "agentic_small.jsonl"


@dataclass(frozen=True)
class DemoConfig:
    replicas: int = 2
    policies: tuple[str, ...] = ("round_robin", "predictive")
    trace: str = str(BUNDLED)
    max_requests: int = 120
    scale_input: float = 0.04  # ~14k-token agentic prompts -> ~550 tokens
    max_output_tokens: int = 24
    time_scale: float = 0.15  # replay arrivals this much faster
    num_blocks: int = 384  # per replica: enough for a few sessions, not for all of them
    out: str = "results/demo"

    def __post_init__(self) -> None:
        if self.replicas < 1 or not self.policies or self.max_requests < 1:
            raise ValueError("the demo needs replicas, policies and requests")


def demo_trace(cfg: DemoConfig):
    reqs = load_trace(cfg.trace, options=TraceOptions(time_scale=cfg.time_scale, scale_input=cfg.scale_input,
                                                      max_requests=cfg.max_requests))
    return [replace(r, output_length=max(1, min(r.output_length, cfg.max_output_tokens))) for r in reqs]


def _change(new: float | None, old: float | None) -> str:
    return "n/a" if not new or not old else f"{100 * (new / old - 1):+.0f} %".replace("-", "−")


def verdict(summaries: dict[str, dict], baseline: str, candidate: str) -> str:
    """One plain sentence: the candidate against the baseline on TTFT and cache hits."""
    b, c = summaries[baseline], summaries[candidate]
    won = (c.get("mean_ttft_ms") or 0) < (b.get("mean_ttft_ms") or 0)
    hits = f"cache hit rate {c.get('cache_hit_rate') or 0:.2f} vs {b.get('cache_hit_rate') or 0:.2f}"
    figures = (f"mean TTFT {_change(c.get('mean_ttft_ms'), b.get('mean_ttft_ms'))}, "
               f"p99 {_change(c.get('p99_ttft_ms'), b.get('p99_ttft_ms'))}, {hits}")
    if won:
        return (f"{candidate} vs {baseline} on the same requests: {figures} — sending each request where its "
                f"prompt is already cached, weighed against the queue, gets its first token sooner.")
    return f"{candidate} did not beat {baseline} on this run: {figures}."


def run_demo(cfg: DemoConfig, log=print) -> dict:
    trace = demo_trace(cfg)
    span = trace[-1].arrival_s - trace[0].arrival_s
    log(f"trace: {len(trace)} requests over {span:.0f} s from {Path(cfg.trace).name}, "
        f"mean prompt {sum(r.input_length for r in trace) / len(trace):.0f} tokens")
    # --log-level warning: no access line per request in the middle of the demo's own output
    spec = FleetSpec(replicas=cfg.replicas, engine="torch", policy=cfg.policies[0], balancer_port=0,
                     replica_args=("--model", "tiny", "--num-blocks", str(cfg.num_blocks), "--threads", "1",
                                   "--max-model-len", "4096", "--log-level", "warning"),
                     balancer_args=("--log-level", "warning"))
    summaries = []
    paths = {}
    with LocalFleet(spec) as fleet:
        log(f"fleet: {len(fleet.replicas)} tiny replicas")
        for i, policy in enumerate(cfg.policies):
            if i:
                fleet.stop_balancer()
                fleet.reset_caches()
                fleet.start_balancer(policy, port=0)
            log(f"replaying under {policy} via {fleet.balancer.url} ...")
            result = asyncio.run(run_load(fleet.balancer.url, trace, LoadConfig(model="tiny", progress=False)))
            paths[policy] = write_report(result, cfg.out, policy)
            s = summarize(result)
            summaries.append(s)
    table = compare(summaries, list(cfg.policies))
    log("\n" + table)
    by = dict(zip(cfg.policies, summaries))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sentence = verdict(by, cfg.policies[0], cfg.policies[-1]) if len(cfg.policies) > 1 else ""
    (out / "compare.md").write_text(table + "\n" + (f"\n{sentence}\n" if sentence else ""))
    plot = None
    try:
        from loadgen.plots import plot_compare_cdf

        written = [json.loads(Path(paths[p]["json"]).read_text()) for p in cfg.policies]  # with requests_file
        plot = plot_compare_cdf([paths[p]["json"] for p in cfg.policies], written, out / "compare_ttft_cdf.png")
    except ImportError:  # no matplotlib: the table and sentence still stand
        pass
    if sentence:
        log("\n" + sentence)
    log(f"\nreport: {cfg.out}/" + (f" (TTFT of both policies on one plot: {plot})" if plot else ""))
    return {"summaries": by, "table": table, "paths": paths, "verdict": sentence, "plot": plot}
