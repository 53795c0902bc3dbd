"""ApproxIndex: learning from routing decisions, TTL and LRU capacity, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.approx_index import ApproxIndex


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def chain(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def test_record_then_match_like_the_exact_index() -> None:
    idx = ApproxIndex(clock=FakeClock())
    idx.record("a", chain(6))
    idx.record("b", chain(2) + [900, 901])
    assert idx.match(chain(6)) == {"a": 6, "b": 2}
    assert idx.match(chain(3)) == {"a": 3, "b": 2}
    assert idx.match([5000]) == {} and idx.match([]) == {}
    idx.check_integrity()


def test_blocks_not_routed_to_within_the_ttl_are_forgotten() -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl_s=10.0, clock=clock)
    idx.record("a", chain(4))
    clock.t += 6
    idx.record("a", chain(2))  # the shared head is refreshed, the tail is not
    clock.t += 6
    assert idx.match(chain(4)) == {"a": 2}
    clock.t += 10
    assert idx.match(chain(4)) == {} and idx.evicted_ttl == 4
    idx.check_integrity()


def test_capacity_evicts_least_recently_routed_tail_first() -> None:
    clock = FakeClock()
    idx = ApproxIndex(capacity_per_replica=5, clock=clock)
    idx.record("a", chain(4))
    clock.t += 1
    idx.record("a", chain(3, 100))  # 7 blocks > 5: the two oldest go, i.e. chain(4)'s tail
    assert idx.match(chain(4)) == {"a": 2}
    assert idx.match(chain(3, 100)) == {"a": 3}
    assert idx.evicted_capacity == 2
    idx.check_integrity()


def test_explicit_now_and_a_clock_that_goes_back() -> None:
    idx = ApproxIndex(ttl_s=5.0, clock=FakeClock())
    idx.record("a", chain(2), now=50.0)
    idx.record("a", chain(2, 10), now=40.0)  # treated as 50.0
    assert idx.match(chain(2, 10), now=54.0) == {"a": 2}
    assert idx.match(chain(2, 10), now=56.0) == {}
    idx.check_integrity()


def test_remove_and_clear_replica() -> None:
    idx = ApproxIndex(clock=FakeClock())
    idx.record("a", chain(3))
    idx.record("b", chain(3))
    idx.clear_replica("a")
    assert idx.match(chain(3)) == {"b": 3}
    idx.remove_replica("b")
    idx.record("c", chain(1))
    assert idx.match(chain(3)) == {"c": 1} and sorted(idx.replicas()) == ["a", "c"]
    idx.check_integrity()


def test_bad_config() -> None:
    with pytest.raises(ValueError):
        ApproxIndex(capacity_per_replica=0)
    with pytest.raises(ValueError):
        ApproxIndex(ttl_s=0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3), st.integers(1, 6), st.floats(0, 4)), max_size=40))
def test_matches_a_brute_force_model(ops) -> None:
    clock = FakeClock()
    cap, ttl = 8, 5.0
    idx = ApproxIndex(capacity_per_replica=cap, ttl_s=ttl, clock=clock)
    model: dict[str, dict[int, float]] = {r: {} for r in "abc"}  # replica -> hash -> last routed
    for replica, base, n, dt in ops:
        clock.t += dt
        hashes = chain(n, base * 100)
        idx.record(replica, hashes)
        lru = model[replica]
        for h in reversed(hashes):
            lru.pop(h, None)
            lru[h] = clock.t
        while len(lru) > cap:
            del lru[next(iter(lru))]
        idx.check_integrity()
        for r in "abc":
            for h in [h for h, t in model[r].items() if t <= clock.t - ttl]:
                del model[r][h]
        for base2 in range(4):
            probe = chain(6, base2 * 100)
            expected = {}
            for r in "abc":
                k = 0
                while k < len(probe) and probe[k] in model[r]:
                    k += 1
                if k:
                    expected[r] = k
            assert idx.match(probe) == expected
        for r in "abc":
            assert idx.replica_block_hashes(r) == set(model[r])
