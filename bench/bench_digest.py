"""Compact cache digests (issue #17 part 2): their size, false-positive rate and cost, and the
TTFT cost of routing from digests instead of exact KV events.

Part 1, the filter (protocol/digest.py): for each filter kind and set size, the bytes on the
wire per million blocks, the false-positive rate measured over a million probes that are not in
the set, the build time and the lookup time per block.

Part 2, the lookups: `DigestIndex.match` (what the router asks per request) over R replicas'
digests, and what the balancer holds per block.

Part 3, the simulator: cells of issue #15's matrix (bench/routing_matrix.toml, the same
requests, fleet and load) run with the policies reading exact events, then each replica's
digest taken every T virtual seconds; the table gives mean and p99 TTFT and the predicted hit
rate of each, and the change against events.

    .venv/bin/python bench/bench_digest.py                      # every part
    .venv/bin/python bench/bench_digest.py --part filter        # or lookup, or sim
    .venv/bin/python bench/bench_digest.py --part sim --workloads mooncake,chat --intervals 1,5
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from protocol.digest import FILTER_KINDS, HEADER_BYTES, BlockFilter  # noqa: E402

MATRIX = Path(__file__).resolve().parent / "routing_matrix.toml"


def _list(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def filter_rows(sizes: tuple[int, ...], probes: int) -> list[list]:
    rng = np.random.default_rng(0)
    rows = []
    for kind in sorted(FILTER_KINDS):
        for n in sizes:
            keys = rng.integers(0, 1 << 64, size=n, dtype=np.uint64)
            t = time.perf_counter()
            f = BlockFilter.build(kind, keys, distinct=True)  # 2**-64 chance of a duplicate: none
            build_s = time.perf_counter() - t
            wire = f.size_bytes + HEADER_BYTES
            other = rng.integers(0, 1 << 64, size=probes, dtype=np.uint64).tolist()
            t = time.perf_counter()
            fp = sum(h in f for h in other)
            lookup_ns = (time.perf_counter() - t) / probes * 1e9
            chain = keys[:512].tolist()
            t = time.perf_counter()
            assert f.prefix_len(chain) == len(chain)
            walk_us = (time.perf_counter() - t) * 1e6
            rows.append([kind, n, wire, round(wire * 8 / n, 2), round(wire / n * 1e6 / 2 ** 20, 2),
                         f"{fp / probes:.5%}", fp, round(build_s * 1e3, 1), round(lookup_ns), round(walk_us)])
    return rows


def lookup_rows(replicas: tuple[int, ...], blocks: int, chain_blocks: int, repeats: int) -> list[list]:
    """`DigestIndex.match` of a `chain_blocks` chain over R replicas' digests (`blocks` each):
    one replica holds the whole chain, the others none of it, as for a request whose prefix
    one replica cached."""
    from balancer.digest_index import DigestIndex
    from protocol.digest import CacheDigest

    rng = np.random.default_rng(1)
    chain = rng.integers(0, 1 << 64, size=chain_blocks, dtype=np.uint64)
    rows = []
    for r in replicas:
        idx = DigestIndex(16, 1e9, time.monotonic)
        for i in range(r):
            keys = rng.integers(0, 1 << 64, size=blocks, dtype=np.uint64)
            if i == 0:
                keys[:chain_blocks] = chain
            idx.update(f"r{i}", CacheDigest(0.0, 0, None, 16, blocks, BlockFilter.build("binary_fuse8", keys)))
        hashes = chain.tolist()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            got = idx.match(hashes)
            times.append(time.perf_counter() - t)
        assert got["r0"] == chain_blocks
        held = sum(idx.latest(f"r{i}").filter.size_bytes for i in range(r))
        rows.append([r, blocks, chain_blocks, round(float(np.median(times)) * 1e6), round(float(np.quantile(times, 0.99)) * 1e6),
                     round(held / (r * blocks), 2)])
    return rows


def _sim_one(args: tuple) -> dict:
    spec_path, workload, replicas, load, kv, seed, policy, source, interval = args
    from simulator.run import simulate
    from simulator.sweep import cell_config, load_spec

    spec = load_spec(spec_path)
    spec = dataclasses.replace(spec, workloads=tuple(w for w in spec.workloads if w.name == workload),
                               replicas=(replicas,), loads=(load,), kv_tokens=(kv,), seeds=(seed,))
    (cell,) = spec.cells()
    trace, cfg = cell_config(spec, cell, policy)
    cfg = dataclasses.replace(cfg, index_source=source, **({"digest_interval_s": interval} if interval else {}))
    out = simulate(trace, cfg)
    s = out["policies"][0]
    return {"workload": workload, "policy": policy, "source": source, "interval": interval,
            "mean": s["mean_ttft_s"], "p99": s["p99_ttft_s"], "hit": s["cache_hit_rate"],
            "predicted": s["predicted_hit_rate"], "wall_s": s["wall_s"]}


def sim_rows(a: argparse.Namespace) -> list[list]:
    runs = [(str(a.spec), w, a.replicas, a.load, a.kv_tokens, a.seed, p, src, iv)
            for w in a.workloads for p in a.policies
            for src, iv in (("events", None), *(("digests", t) for t in a.intervals))]
    with ProcessPoolExecutor(a.jobs) as pool:
        results = list(pool.map(_sim_one, runs))
    base = {(r["workload"], r["policy"]): r for r in results if r["source"] == "events"}
    rows = []
    for r in results:
        b = base[(r["workload"], r["policy"])]
        src = "events" if r["source"] == "events" else f"digests every {r['interval']:g} s"
        rows.append([r["workload"], r["policy"], src, round(r["mean"], 3), f"{r['mean'] / b['mean'] - 1:+.1%}",
                     round(r["p99"], 3), f"{r['p99'] / b['p99'] - 1:+.1%}", round(r["hit"], 3),
                     round(r["predicted"], 3), round(r["wall_s"], 1)])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("filter", "lookup", "sim", "all"), default="all")
    ap.add_argument("--lookup-replicas", type=_list(int), default=(16, 64, 256))
    ap.add_argument("--lookup-blocks", type=int, default=100_000, help="blocks in each replica's digest")
    ap.add_argument("--sizes", type=_list(int), default=(100_000, 1_000_000), help="blocks per filter")
    ap.add_argument("--probes", type=int, default=1_000_000, help="non-member lookups for the FP rate")
    ap.add_argument("--spec", default=str(MATRIX), help="sweep file whose cells to run (default: issue #15's)")
    ap.add_argument("--workloads", type=_list(str), default=("mooncake", "chat", "agentic"))
    ap.add_argument("--policies", type=_list(str), default=("precise_prefix", "predictive"))
    ap.add_argument("--intervals", type=_list(float), default=(1.0, 5.0), help="digest intervals (virtual s)")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--kv-tokens", type=int, default=120_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="results/bench_digest")
    a = ap.parse_args(argv)
    if a.part in ("filter", "all"):
        report("Cache digest filters: size, false positives, cost",
               ["filter", "blocks", "wire bytes", "bits/block", "MiB per 1M blocks", "FP rate", "FP hits",
                "build ms", "lookup ns", "512-block walk µs"],
               filter_rows(a.sizes, a.probes), out=f"{a.out}/filters.json")
    if a.part in ("lookup", "all"):
        report("Routing lookups from digests (one replica holds the chain)",
               ["replicas", "blocks per digest", "chain blocks", "match p50 µs", "match p99 µs",
                "balancer bytes per block"],
               lookup_rows(a.lookup_replicas, a.lookup_blocks, 512, 200), out=f"{a.out}/lookup.json")
    if a.part in ("sim", "all"):
        report(f"TTFT: routing from digests vs events ({a.replicas} replicas, load {a.load}, {a.kv_tokens} KV "
               f"tokens, seed {a.seed})",
               ["workload", "policy", "index", "TTFT mean s", "vs events", "TTFT p99 s", "vs events",
                "hit rate", "predicted hit", "wall s"],
               sim_rows(a), out=f"{a.out}/sim.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
