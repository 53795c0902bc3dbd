"""Do sticky sessions (balancer/sessions.py) change TTFT? The simulator, on issue #15's `chat`
workload (bench/routing_matrix.toml: multi-turn sessions, each turn carrying the earlier ones;
`--workload agentic|hot` for the others),
each policy with sessions off and on (keyed by the trace's session ids, default settings):
mean / p99 TTFT, mean TPOT, cache hit rate, and the sessions' outcomes.

    .venv/bin/python bench/bench_sessions.py                     # 8 replicas, loads 0.8/1.0, KV 120k, seed 0
    .venv/bin/python bench/bench_sessions.py --loads 0.6,0.9 --seeds 1 --policies predictive,round_robin

`--live` runs the same cell (first load and seed, `--requests` of it) on a live fleet of sim
replicas behind the real balancer as well (bench/bench_live_order.py's `run_live`: loadgen sends
token prompts with max_tokens, and with sessions on each request's session id as its `user`;
`--time-scale` slows the replicas so the machine keeps up), beside the simulator's figures for
the same requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer.sessions import SessionConfig  # noqa: E402
from bench.common import machine  # noqa: E402
from simulator.sweep import Cell, cell_config, load_spec  # noqa: E402

MATRIX = Path(__file__).resolve().parent / "routing_matrix.toml"


def _list(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def run_one(args: tuple) -> dict:
    from simulator.run import simulate

    spec, cell, policy, sessions, options = args
    trace, cfg = cell_config(spec, cell, policy)
    cfg = dataclasses.replace(cfg, sessions=SessionConfig(enabled=sessions, **(options if sessions else {})))
    t0 = time.perf_counter()
    out = simulate(trace, cfg)["policies"][0]
    return {"load": cell.load, "seed": cell.seed, "replicas": cell.replicas, "kv": cell.kv_tokens, "policy": policy,
            "sticky": sessions, "wall_s": time.perf_counter() - t0, **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="chat", help="a workload of bench/routing_matrix.toml (chat, agentic, hot)")
    ap.add_argument("--policies", type=_list(str), default=("predictive", "least_request"))
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--loads", type=_list(float), default=(0.8, 1.0))
    ap.add_argument("--kv-tokens", type=int, default=120_000)
    ap.add_argument("--seeds", type=_list(int), default=(0,))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--live", action="store_true", help="also run the cell on a live fleet (see above)")
    ap.add_argument("--decision-cost", action="store_true",
                    help="only time Router.route for a prepared 8k-token prompt over 16 replicas, without and with "
                         "a session key (the prompt's blocks on one replica; every keyed request sticks)")
    ap.add_argument("--requests", type=int, default=500, help="--live: requests of the cell")
    ap.add_argument("--time-scale", type=float, default=0.25, help="--live: replica speed (bench_live_order.py)")
    ap.add_argument("--session-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a SessionConfig setting for the runs with sessions on, e.g. overload_factor=1.5 (repeatable)")
    a = ap.parse_args(argv)
    if a.decision_cost:
        return decision_cost(a.policies)
    spec = load_spec(MATRIX)
    if a.live:
        return live(a, spec)
    chat = next((w for w in spec.workloads if w.name == a.workload), None)
    if chat is None or chat.trace is not None:
        ap.error(f"--workload must name a generated workload of {MATRIX.name} (its sessions are known)")
    n = min(spec.requests_per_replica * a.replicas, spec.max_requests)
    options = {}
    for item in a.session_option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    tasks = [(spec, Cell(chat, a.replicas, load, a.kv_tokens, seed, n), p, on, options)
             for seed in a.seeds for load in a.loads for p in a.policies for on in (False, True)]
    print(f"# sticky sessions on the {a.workload} workload: {a.replicas} replicas, KV {a.kv_tokens} tokens, "
          f"{n} requests, preset {spec.preset}, session options {options or 'the defaults'}\n# {machine()}")
    with ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
    print("| seed | load | policy | sessions | TTFT mean s | TTFT p99 s | TPOT ms | hit rate | outcomes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in r.get("sessions", {}).items() if v) or "-"
        print(f"| {r['seed']} | {r['load']} | {r['policy']} | {'on' if r['sticky'] else 'off'} "
              f"| {r['mean_ttft_s']:.3f} | {r['p99_ttft_s']:.3f} | {1e3 * r['mean_tpot_s']:.1f} "
              f"| {r['cache_hit_rate']:.3f} | {outcomes} |")
    print(f"# wall {sum(r['wall_s'] for r in rows):.0f} s of simulation")
    return 0


def decision_cost(policies, replicas: int = 16, rounds: int = 5000) -> int:
    import statistics

    from balancer.approx_index import ApproxIndex
    from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
    from balancer.policies import make_policy
    from balancer.prefix_index import PrefixIndex
    from balancer.registry import Registry
    from balancer.router import Router
    from balancer.sessions import Sessions
    from protocol.events import BlockStored
    from protocol.openai_api import GenerationRequest
    from protocol.tokenizer import ByteTokenizer

    print(f"# Router.route + finish, 8,192-token prompt, {replicas} replicas, {rounds} rounds\n# {machine()}")
    print("| policy | no session µs (median) | session µs (median) |")
    print("|---|---|---|")
    tokens = [(i * 7919) % 251 for i in range(8192)]
    for name in policies:
        registry = Registry(BreakerConfig(), HealthConfig(), time.monotonic)
        for i in range(replicas):
            registry.add(ReplicaSpec(url=f"http://r{i}:80"))
        index = PrefixIndex(16, "m")
        router = Router("m", 16, ByteTokenizer(), index, ApproxIndex(), make_policy(name), registry,
                        has_events=lambda rid: True, sessions=Sessions(SessionConfig(enabled=True)))
        index.apply("http://r3:80", BlockStored(tuple(range(512)), None, tuple(tokens), 16))
        req = GenerationRequest(kind="completion", model="m", prompt_token_ids=tuple(tokens), max_tokens=128)
        cells = []
        for session in (None, "conv"):
            p = router.prepare(req, session)
            for k in range(500):  # warm-up
                router.route(p, f"w{k}").finish(16)
            times = []
            for k in range(rounds):
                t0 = time.perf_counter()
                router.route(p, f"r{k}").finish(16)
                times.append(time.perf_counter() - t0)
            cells.append(f"{1e6 * statistics.median(times):.1f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


def live(a, spec) -> int:
    """One cell live and simulated, each policy with sessions off and on."""
    from bench.bench_live_order import run_live
    from replica.step_model import get_preset
    from simulator.run import SimulateConfig, simulate
    from simulator.sweep import cell_trace

    chat = next(w for w in spec.workloads if w.name == a.workload)
    trace, prompt_seed = cell_trace(Cell(chat, a.replicas, a.loads[0], a.kv_tokens, a.seeds[0], a.requests))
    a.preset = spec.preset
    print(f"# live vs simulated, {a.workload}: {a.replicas} sim replicas, load {a.loads[0]}, KV {a.kv_tokens}, "
          f"{a.requests} requests, seed {a.seeds[0]}, time scale {a.time_scale}\n# {machine()}")
    print("| policy | sessions | live TTFT mean / p99 s | simulated TTFT mean / p99 s | live ok |")
    print("|---|---|---|---|---|")
    for policy in a.policies:
        for on in (False, True):
            cfg = SimulateConfig(a.replicas, get_preset(spec.preset), (policy,), kv_blocks=a.kv_tokens // 16,
                                 load=a.loads[0], seed=prompt_seed, predictor=spec.predictor, client_max_tokens=True,
                                 sessions=SessionConfig(enabled=on))
            off = simulate(trace, cfg)
            scaled = [dataclasses.replace(r, arrival_s=r.arrival_s * off["config"]["time_factor"]) for r in trace]
            sim = off["policies"][0]
            got = run_live(scaled, policy, a, prompt_seed, sessions=on)
            print(f"| {policy} | {'on' if on else 'off'} | {got['mean_ttft_s']:.3f} / {got['p99_ttft_s']:.3f} "
                  f"| {sim['mean_ttft_s']:.3f} / {sim['p99_ttft_s']:.3f} | {got['ok']}/{got['sent']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
