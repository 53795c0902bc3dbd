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
