"""`kvfleet simulate`: replay a trace through the simulated fleet under several policies.

For each policy a fresh fleet runs the whole trace; the table gives TTFT mean/p50/p99, TPOT,
E2E, goodput at the SLOs, cache hit rate and each replica's share of requests, beside the
bounds (ideal TTFT, infinite-cache and pooled-cache hit rates). Same seed, same trace → identical results.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen.prompts import PromptConfig, prompt_token_ids
from loadgen.traces import TraceRequest
from protocol.events import MEDIUM_CPU, MEDIUM_DISK
from protocol.hashing import hash_blocks, root_hash
from replica.engine import SIM_MAX_MODEL_LEN
from replica.service import ServiceConfig
from replica.step_model import SimPreset
from balancer.sessions import SessionConfig
from simulator.bounds import Bounds, compute_bounds
from simulator.fleet import MODEL, FleetConfig, FleetSimulation, Prompt, SimRequest, SimResult
from simulator.kv_link import KV_LINKS, KvLink
from simulator.tiers import fleet_tier_cost


# What a live fleet adds per request outside the engines, measured on this project's 2-core
# machine (load average ~8) on a live sim fleet (2 replicas, balancer, loadgen) with timestamps
# taken in loadgen and in the replica: loadgen's send -> the request enters the engine's queue
# (median 5.3 ms: HTTP to the balancer, tokenize, hash, route, HTTP to the replica, parse, the
# engine loop picking it up), and a token leaving a step -> loadgen reads it (median 1.9 ms: SSE
# through the balancer). bench/bench_sim_agreement.py measures the sum again on its fleet.
DEFAULT_REQUEST_LATENCY_S = 0.005
DEFAULT_RESPONSE_LATENCY_S = 0.002
DEFAULT_LOAD_REPORT_INTERVAL_S = ServiceConfig().load_report_interval_s


@dataclass(frozen=True)
class SimulateConfig:
    replicas: int
    preset: SimPreset
    policies: tuple[str, ...]
    kv_blocks: int | None = None
    load: float | None = None  # target utilisation; None = the trace's own timestamps
    seed: int = 0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    predictor: str = "ensemble"  # output-length predictor the router uses; "none", or "oracle" (true lengths)
    client_max_tokens: bool = False  # requests carry max_tokens = their output length, as loadgen sends live
    policy_options: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()  # (policy, ((key, value), ...))
    # Per-request latency a live fleet adds outside the engines (simulator.fleet.FleetConfig).
    request_latency_s: float = DEFAULT_REQUEST_LATENCY_S
    response_latency_s: float = DEFAULT_RESPONSE_LATENCY_S
    max_model_len: int = SIM_MAX_MODEL_LEN  # longer prompts are rejected, as by a live sim replica
    # A replica's load reports reach the balancer this often, as a live replica's do
    # (replica.service.ServiceConfig's default); 0 = after every step (simulator.fleet.FleetConfig).
    load_report_interval_s: float = DEFAULT_LOAD_REPORT_INTERVAL_S
    # The policies see exact events, or each replica's cache digest every digest_interval_s
    # (simulator.fleet.FleetConfig).
    index_source: str = "events"
    digest_interval_s: float = 1.0
    digest_filter: str = "binary_fuse8"
    sessions: SessionConfig = SessionConfig()  # sticky sessions, keyed by the trace's session ids
    # Uncoordinated balancer instances in front of the fleet, and whether they route from shared
    # state only (simulator.fleet.FleetConfig, BalancerConfig.consistent_routing).
    balancers: int = 1
    consistent_routing: bool = False
    report_on_arrival: bool = False  # replicas also report when requests join their queue
    # KV offload tiers per replica and the host link (simulator.fleet.FleetConfig, simulator/tiers.py).
    host_kv_blocks: int = 0
    disk_kv_blocks: int = 0
    host_link: str = ""
    # Prefill/decode disaggregation over a modelled KV link (simulator.fleet.FleetConfig); the
    # offered load is the same as for `replicas` unified ones, so the two compare on one trace.
    prefill_replicas: int = 0
    decode_replicas: int = 0
    kv_link: KvLink = KV_LINKS["ib-ndr"]
    kv_bytes_per_token: int = 131_072
    kv_lanes: int = 1

    def __post_init__(self) -> None:
        if self.load is not None and not 0 < self.load <= 10:
            raise ValueError("load must be in (0, 10]")
        if not self.policies:
            raise ValueError("give at least one policy")
        from simulator.tiers import fleet_tier_cost, fleet_tiers

        fleet_tiers(self.host_kv_blocks, self.disk_kv_blocks)  # ValueError naming what to give
        fleet_tier_cost(self.preset, 16, self.host_link)


# Prompts are materialised once and shared by every policy's run (and the bounds) up to this
# many prompt tokens in all (~3.5 bytes per token: the ids as bytes, the hash chain as ints; the
# Mooncake synthetic trace's 61M tokens take ~210 MB); a longer trace regenerates them per run.
MEMO_MAX_TOKENS = 150_000_000


def sim_requests(trace: Sequence[TraceRequest], seed: int = 0, block_size: int = 16,
                 memoize: bool | None = None) -> list[SimRequest]:
    """The trace as simulator requests. With `memoize` (default: when the trace's prompts fit
    in MEMO_MAX_TOKENS) each prompt is materialised and hashed here, once."""
    cfg = PromptConfig(seed=seed)
    if memoize is None:
        memoize = sum(t.input_length for t in trace) <= MEMO_MAX_TOKENS
    root = root_hash(MODEL)

    def lazy(req: TraceRequest, i: int):
        return lambda: prompt_token_ids(req, i, cfg).tolist()

    out = []
    for i, t in enumerate(trace):
        tokens = lazy(t, i)
        memo = Prompt(tokens(), block_size, root) if memoize else None
        out.append(SimRequest(t.arrival_s, memo.token_ids if memo else tokens, t.output_length, t.input_length,
                              t.tenant or t.session_id or "", memo, session=t.session_id or ""))
    return out


def offered_load(reqs: Sequence[SimRequest], cfg: SimulateConfig) -> tuple[float, float]:
    """(utilisation of the fleet at the trace's own rate, mean service demand in seconds).

    Demand of a request: prefill of its whole prompt (no cache: what a policy gains from
    caching is headroom, not part of the offered load), in chunks, plus its decode steps
    amortised over a batch of min(32, max_num_seqs) sequences. A heuristic capacity model,
    the same for every policy.
    """
    p = cfg.preset
    model = p.model
    chunk = cfg.max_num_batched_tokens or p.max_num_batched_tokens
    batch = min(32, cfg.max_num_seqs or p.max_num_seqs)
    demand = []
    for r in reqs:
        cached = 0
        decode = r.output_length * model.decode_step_time(batch, r.input_length + r.output_length / 2) / batch
        demand.append(model.prefill_time(r.input_length - cached, cached, chunk) + decode)
    span = max(reqs[-1].arrival_s - reqs[0].arrival_s, 1e-9)
    rate = len(reqs) / span
    mean = float(np.mean(demand))
    return rate * mean / cfg.replicas, mean


def rescale(reqs: Sequence[SimRequest], factor: float) -> list[SimRequest]:
    t0 = reqs[0].arrival_s
    return [dataclasses.replace(r, arrival_s=t0 + (r.arrival_s - t0) * factor) for r in reqs]


def replayed(trace: Sequence[TraceRequest], cfg: SimulateConfig) -> tuple[list[SimRequest], float, float, float]:
    """The requests as `simulate` replays them: prompts materialised once, in arrival order,
    arrivals stretched so the fleet runs at `cfg.load` (as they come when it is None); with the
    trace's own utilisation and mean demand (`offered_load`) and the time factor applied."""
    reqs = sim_requests(trace, cfg.seed)
    reqs.sort(key=lambda r: r.arrival_s)
    util, demand = offered_load(reqs, cfg)
    factor = 1.0
    if cfg.load is not None:
        factor = util / cfg.load
        reqs = rescale(reqs, factor)
    return reqs, util, demand, factor


def summarize(res: SimResult, cfg: SimulateConfig) -> dict:
    recs = [r for r in res.records if r.finish is not None]
    ttft = np.array([r.ttft for r in recs])
    e2e = np.array([r.e2e for r in recs])
    tpots = np.array([t for t in (r.tpot for r in recs) if t is not None])
    good = sum(1 for r in recs if r.ttft <= cfg.slo_ttft_s and (r.tpot is None or r.tpot <= cfg.slo_tpot_s))
    span = max(r.finish for r in recs) - min(r.arrival for r in recs) if recs else 1.0
    share = {rid: 0 for rid in res.replica_ids}
    for r in recs:
        share[r.replica] += 1
    prompt = sum(r.prompt_tokens for r in recs)
    return {
        "policy": res.policy,
        **({"balancers": res.extra["balancers"], "agreement": res.extra["agreement"]}
           if "agreement" in res.extra else {}),
        "completed": len(recs),
        "rejected": sum(1 for r in res.records if r.rejected),
        "mean_ttft_s": float(ttft.mean()), "median_ttft_s": float(np.median(ttft)),
        "p99_ttft_s": float(np.quantile(ttft, 0.99)),
        "mean_tpot_s": float(tpots.mean()) if tpots.size else 0.0,
        "p99_tpot_s": float(np.quantile(tpots, 0.99)) if tpots.size else 0.0,
        "mean_e2el_s": float(e2e.mean()), "p99_e2el_s": float(np.quantile(e2e, 0.99)),
        "request_goodput": good / span, "goodput_fraction": good / max(len(recs), 1),
        "cache_hit_rate": sum(r.cached_tokens for r in recs) / max(prompt, 1),
        "predicted_hit_rate": sum(r.predicted_cached_tokens for r in recs) / max(prompt, 1),
        "replica_share": {k: v / max(len(recs), 1) for k, v in share.items()},
        "steps": res.steps, "wall_s": res.wall_s,
        **({"sessions": res.extra["sessions"]} if "sessions" in res.extra else {}),
        **({"warmups": res.extra["warmups"]} if "warmups" in res.extra else {}),
        **({"load_s_per_token": res.extra["load_s_per_token"]} if "load_s_per_token" in res.extra else {}),
        **({"disagg": {k: v for k, v in res.extra["disagg"].items() if k != "roles"}} if "disagg" in res.extra else {}),
    }


def make_predictor(cfg: SimulateConfig):
    """The output-length predictor the router consults (None for the oracle: the fleet then
    passes true lengths), fresh per run: it learns online."""
    if cfg.predictor == "oracle":
        return None
    from predictors.adapter import balancer_predictor

    return balancer_predictor(cfg.predictor, MODEL)


def fleet_config(cfg: SimulateConfig, policy: str) -> FleetConfig:
    """The fleet one policy's run of `cfg` replays on."""
    return FleetConfig(cfg.replicas, cfg.preset, policy, dict(cfg.policy_options).get(policy, ()),
                       kv_blocks=cfg.kv_blocks, seed=cfg.seed, max_num_seqs=cfg.max_num_seqs,
                       max_num_batched_tokens=cfg.max_num_batched_tokens, oracle_lengths=cfg.predictor == "oracle",
                       client_max_tokens=cfg.client_max_tokens, request_latency_s=cfg.request_latency_s,
                       response_latency_s=cfg.response_latency_s, load_report_interval_s=cfg.load_report_interval_s,
                       max_model_len=cfg.max_model_len, index_source=cfg.index_source,
                       digest_interval_s=cfg.digest_interval_s, digest_filter=cfg.digest_filter,
                       sessions=cfg.sessions,
                       balancers=cfg.balancers, consistent_routing=cfg.consistent_routing,
                       report_on_arrival=cfg.report_on_arrival,
                       host_kv_blocks=cfg.host_kv_blocks,
                       disk_kv_blocks=cfg.disk_kv_blocks, host_link=cfg.host_link,
                       prefill_replicas=cfg.prefill_replicas,
                       decode_replicas=cfg.decode_replicas, kv_link=cfg.kv_link,
                       kv_bytes_per_token=cfg.kv_bytes_per_token, kv_lanes=cfg.kv_lanes)


def simulate(trace: Sequence[TraceRequest], cfg: SimulateConfig) -> dict:
    reqs, util, demand, factor = replayed(trace, cfg)
    bs = 16
    # Bounds over the requests a replica accepts (the rejected ones are in no policy's figures);
    # the offered load (`replayed`) is the whole trace's.
    served = [r for r in reqs if r.input_length < cfg.max_model_len]
    chains = [r.prompt.hashes if r.prompt is not None else hash_blocks(r.token_ids(), bs, root_hash(MODEL))
              for r in served]
    p = cfg.preset
    chunk = cfg.max_num_batched_tokens or p.max_num_batched_tokens
    bounds: Bounds = compute_bounds(chains, [r.input_length for r in served], bs, p.model, chunk,
                                    capacity_blocks=cfg.replicas * (cfg.kv_blocks or p.kv_blocks),
                                    fixed_latency_s=cfg.request_latency_s + cfg.response_latency_s,
                                    tier_blocks=((MEDIUM_CPU, cfg.replicas * cfg.host_kv_blocks),
                                                 (MEDIUM_DISK, cfg.replicas * cfg.disk_kv_blocks)),
                                    tier_cost=fleet_tier_cost(p, bs, cfg.host_link))
    out = {"config": {"replicas": cfg.replicas, "preset": p.description, "kv_blocks": cfg.kv_blocks or p.kv_blocks,
                      "load": cfg.load, "trace_utilisation": util, "time_factor": factor,
                      "mean_demand_s": demand, "requests": len(reqs), "seed": cfg.seed,
                      "predictor": cfg.predictor, "client_max_tokens": cfg.client_max_tokens,
                      "index_source": cfg.index_source, "sessions": cfg.sessions.enabled,
                      **({"host_kv_blocks": cfg.host_kv_blocks, "disk_kv_blocks": cfg.disk_kv_blocks,
                          "host_link": cfg.host_link or "preset"} if cfg.host_kv_blocks else {}),
                      **({"prefill_replicas": cfg.prefill_replicas, "decode_replicas": cfg.decode_replicas,
                          "kv_link": cfg.kv_link.name, "kv_bytes_per_token": cfg.kv_bytes_per_token,
                          "kv_lanes": cfg.kv_lanes}
                         if cfg.prefill_replicas or cfg.decode_replicas else {}),
                      **({"digest_interval_s": cfg.digest_interval_s, "digest_filter": cfg.digest_filter}
                         if cfg.index_source == "digests" else {})},
           "bounds": {"infinite_cache_hit_rate": bounds.infinite_cache_hit_rate,
                      "pooled_cache_hit_rate": bounds.pooled_cache_hit_rate,
                      "ideal_mean_ttft_s": bounds.ideal_ttft_mean, "ideal_median_ttft_s": bounds.ideal_ttft_p50,
                      "ideal_p99_ttft_s": bounds.ideal_ttft_p99,
                      **({"pooled_lower_hit_rate": bounds.pooled_lower_hit_rate,
                          "pooled_mean_ttft_s": bounds.pooled_ttft_mean, "pooled_p99_ttft_s": bounds.pooled_ttft_p99}
                         if bounds.pooled_ttft_mean is not None else {})},
           "policies": []}
    for name in cfg.policies:
        # One predictor per balancer instance: each learns from the requests it routed, as live.
        fleet = FleetSimulation(fleet_config(cfg, name), predictor_factory=lambda: make_predictor(cfg))
        res = fleet.run(reqs)
        out["policies"].append(summarize(res, cfg))
        out.setdefault("_results", {})[name] = res
    return out


def table(out: dict) -> str:
    head = ["policy", "TTFT mean s", "TTFT p50 s", "TTFT p99 s", "TPOT ms", "E2E mean s", "goodput req/s",
            "hit rate", "max share", "min share", "wall s"]
    rows = [head]
    for s in out["policies"]:
        share = s["replica_share"].values()
        rows.append([s["policy"], f"{s['mean_ttft_s']:.3f}", f"{s['median_ttft_s']:.3f}", f"{s['p99_ttft_s']:.3f}",
                     f"{1e3 * s['mean_tpot_s']:.1f}", f"{s['mean_e2el_s']:.2f}", f"{s['request_goodput']:.2f}",
                     f"{s['cache_hit_rate']:.3f}", f"{max(share):.2f}", f"{min(share):.2f}", f"{s['wall_s']:.1f}"])
    b = out["bounds"]
    rows.append(["(bound: ideal / infinite cache)", f"{b['ideal_mean_ttft_s']:.3f}", f"{b['ideal_median_ttft_s']:.3f}",
                 f"{b['ideal_p99_ttft_s']:.3f}", "", "", "", f"{b['infinite_cache_hit_rate']:.3f}", "", "", ""])
    if "pooled_mean_ttft_s" in b:  # with offload tiers: the pooled hierarchy's TTFT, its loads priced
        rows.append(["(bound: pooled cache + tiers)", f"{b['pooled_mean_ttft_s']:.3f}", "", f"{b['pooled_p99_ttft_s']:.3f}",
                     "", "", "", f"{b['pooled_cache_hit_rate']:.3f}", "", "", ""])
    else:
        rows.append(["(bound: pooled cache)", "", "", "", "", "", "", f"{b['pooled_cache_hit_rate']:.3f}", "", "", ""])
    return md_table(rows)


def md_table(rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded to their widest cell; rows[0] is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]])


def write(out: dict, out_dir: str | Path) -> dict[str, Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "simulate.json", "table": d / "simulate.md"}
    paths["json"].write_text(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=2))
    paths["table"].write_text(table(out) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, res in out.get("_results", {}).items():
            ttft = np.sort([r.ttft for r in res.records if r.first_token is not None])
            ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("TTFT CDF per policy (simulated)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths["ttft_cdf"] = d / "simulate_ttft_cdf.png"
        fig.savefig(paths["ttft_cdf"], dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return paths
