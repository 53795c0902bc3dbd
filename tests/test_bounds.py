"""The simulator's bounds: the pooled-cache hit rate against the infinite cache and hand cases."""

import random

import pytest

from simulator.bounds import infinite_cache_hits, pooled_cache_hits


def chains(seed: int, n: int = 300) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    prefixes = [tuple(rng.randrange(10**9) for _ in range(rng.randrange(1, 40))) for _ in range(12)]
    return [rng.choice(prefixes)[: rng.randrange(1, 40)] + tuple(rng.randrange(10**9) for _ in range(rng.randrange(0, 5)))
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_pooled_is_at_most_infinite_and_equal_when_nothing_is_evicted(seed):
    cs = chains(seed)
    inf = infinite_cache_hits(cs, 16)
    assert pooled_cache_hits(cs, 16, sum(map(len, cs))) == inf
    small = pooled_cache_hits(cs, 16, 50)
    assert all(p <= i for p, i in zip(small, inf)) and sum(small) < sum(inf)
    # More memory never loses a hit under LRU on prefix chains (a stack algorithm per block).
    assert sum(pooled_cache_hits(cs, 16, 100)) >= sum(small)


def test_pooled_hand_case_evicts_the_least_recent_chain_from_its_tail():
    a, b = (1, 2, 3), (7, 8)
    # capacity 4: a (3 blocks), then b (2) pushes out a's least recent block, its tail (3); a
    # hits 1, 2 and brings 3 back, which pushes out b's tail (8): b then hits only 7.
    assert pooled_cache_hits([a, b, a, b], 1, 4) == [0, 0, 2, 1]
    assert pooled_cache_hits([a, a, a], 1, 4) == [0, 3, 3]
    with pytest.raises(ValueError):
        pooled_cache_hits([a], 1, 0)


def test_ideal_ttft_is_reached_on_an_idle_fleet_with_its_fixed_latency():
    """Requests far apart on an idle fleet pay exactly the bound: their uncached prefill plus
    the request and response latency every routing pays (so the bound is attainable)."""
    from loadgen.traces import TraceRequest
    from replica.step_model import get_preset
    from simulator.run import SimulateConfig, simulate

    trace = [TraceRequest(arrival_s=30.0 * i, input_length=n, output_length=4) for i, n in enumerate((700, 3000, 40))]
    cfg = SimulateConfig(replicas=2, preset=get_preset("llama3-8b-h100"), policies=("round_robin",),
                         request_latency_s=0.02, response_latency_s=0.005)
    out = simulate(trace, cfg)
    assert out["policies"][0]["mean_ttft_s"] == pytest.approx(out["bounds"]["ideal_mean_ttft_s"], rel=1e-6)
    assert out["bounds"]["ideal_mean_ttft_s"] > 0.025
