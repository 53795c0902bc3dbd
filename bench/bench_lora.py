"""LoRA-aware routing in the offline simulator (issue #17 part 5): a fleet serving several
adapters, a bounded number resident per replica, each load a modelled delay; policies with and
without adapter awareness side by side.

Workload: `--adapters` adapters with Zipf(1) popularity; each adapter's requests share its own
system prompt (`--system` tokens) plus a unique question (`--question` tokens) and generate
`--output` tokens; Poisson arrivals at `--rate` req/s. Every replica serves every adapter,
`--max-loras` resident at once, a load taking `--lora-load-s` (default 0.04 s, the assumption
in balancer/policies/predictive.py), on the Llama-3-8B/H100 step model.

Rows: `predictive` (prices the load: `lora_aware`), `predictive` with `lora_aware = false`
(adapters ignored), and `precise_prefix` / `least_request`, which the router narrows to the
replicas holding the adapter first (`adapter_candidates`, `lora_slack` 8).

    .venv/bin/python bench/bench_lora.py [--requests 2000] [--rate 40] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, table  # noqa: E402
from protocol.hashing import root_hash  # noqa: E402
from replica.step_model import get_preset  # noqa: E402
from simulator.fleet import MODEL, FleetConfig, FleetSimulation, Prompt, SimRequest  # noqa: E402

VARIANTS = (
    ("predictive", (), "prices the load"),
    ("predictive", (("lora_aware", False),), "ignores adapters"),
    ("precise_prefix", (), "holders first (router)"),
    ("least_request", (), "holders first (router)"),
)


def workload(args, seed: int) -> list[SimRequest]:
    rng = random.Random(seed)
    names = [f"lora{i}" for i in range(args.adapters)]
    weights = [1 / (i + 1) for i in range(args.adapters)]  # Zipf(1)
    systems = {n: [rng.randrange(256) for _ in range(args.system)] for n in names}
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        name = rng.choices(names, weights)[0]
        tokens = systems[name] + [rng.randrange(256) for _ in range(args.question)]
        prompt = Prompt(tokens, 16, root_hash(MODEL, lora_name=name))
        out.append(SimRequest(t, prompt.token_ids, args.output, len(tokens), tag=name, prompt=prompt, lora_name=name))
    return out


def run(args, policy: str, options: tuple, requests: list[SimRequest]) -> dict:
    cfg = FleetConfig(replicas=args.replicas, preset=get_preset("llama3-8b-h100"), policy=policy,
                      policy_options=options, load_report_interval_s=0.1, lora_adapters=tuple(
                          f"lora{i}" for i in range(args.adapters)), max_loras=args.max_loras,
                      lora_load_s=args.lora_load_s, kv_blocks=args.kv_blocks)
    sim = FleetSimulation(cfg)
    res = sim.run(requests)
    ttft = sorted(r.ttft for r in res.records if not r.rejected)
    loads = sum(rep.loras.loads_total - min(args.max_loras, args.adapters) for rep in sim.replicas.values())
    cached = sum(r.cached_tokens for r in res.records) / max(1, sum(r.prompt_tokens for r in res.records))
    return {"mean": statistics.fmean(ttft), "p99": ttft[int(0.99 * (len(ttft) - 1))], "loads": loads,
            "hit": cached}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rate", type=float, default=40.0, help="arrivals per second (Poisson)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--lora-load-s", type=float, default=0.04)
    p.add_argument("--system", type=int, default=1024, help="tokens of each adapter's shared system prompt")
    p.add_argument("--question", type=int, default=128)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=None, help="per replica (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for policy, options, what in VARIANTS:
        per_seed = [run(args, policy, options, workload(args, seed)) for seed in args.seeds]
        mean = lambda k: statistics.fmean(r[k] for r in per_seed)  # noqa: E731
        label = policy + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options))
        rows.append([label, what, round(mean("mean") * 1e3, 1), round(mean("p99") * 1e3, 1), round(mean("loads")),
                     f"{mean('hit'):.1%}"])
    print(f"machine: {machine()}")
    print(f"{args.replicas} replicas (Llama-3-8B/H100 step model), {args.adapters} adapters (Zipf 1), "
          f"max_loras {args.max_loras}, load {args.lora_load_s * 1e3:.0f} ms, {args.requests} requests at "
          f"{args.rate} req/s, prompt {args.system}+{args.question}, output {args.output}; seeds {args.seeds} "
          f"(means over seeds); {time.perf_counter() - t0:.0f} s")
    print(table(["policy", "adapters", "mean TTFT ms", "p99 TTFT ms", "adapter loads", "cache hit"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
