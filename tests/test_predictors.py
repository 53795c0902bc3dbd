"""Output-length predictors: the interface every predictor keeps (online, bounded, deterministic,
side-effect-free predict, max_tokens respected), and each predictor's behaviour.

Evaluation, metrics, the shared-trace acceptance numbers and the CLI are in
test_predictors_eval.py.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from predictors.base import deep_size
from predictors import (
    Calibrated,
    CalibrationConfig,
    Ensemble,
    EnsembleConfig,
    Features,
    GlobalMedian,
    GlobalMedianConfig,
    MaxTokensCap,
    OnlineRegressor,
    OnlineRegressorConfig,
    Prediction,
    Predictor,
    PrefixHistory,
    PrefixHistoryConfig,
    make_predictor,
    predictor_names,
)
from predictors.adapter import BalancerPredictor
from predictors.features import chain_ids, from_routing_request, from_trace_request, hash_ngrams
from predictors.window import LruTable, RollingWindow

ROOT = Path(__file__).resolve().parents[1]
ALL = predictor_names()


def small(name: str) -> Predictor:
    """Each predictor with small bounds, so a test reaches them quickly."""
    ph = lambda: PrefixHistory(PrefixHistoryConfig(max_keys=500, max_groups=8, global_window=128))  # noqa: E731
    reg = lambda: OnlineRegressor(OnlineRegressorConfig(dim_bits=10, global_window=128))  # noqa: E731
    gm = lambda: GlobalMedian(GlobalMedianConfig(window=128))  # noqa: E731
    return {
        "global_median": gm,
        "max_tokens": lambda: MaxTokensCap(GlobalMedianConfig(window=128)),
        "prefix_history": lambda: Calibrated(ph()),
        "online_regressor": lambda: Calibrated(reg()),
        "ensemble": lambda: Calibrated(Ensemble([ph(), reg(), gm()])),
    }[name]()


def chain(*ids: int) -> tuple[int, ...]:
    return chain_ids(ids)


def stream(n: int, seed: int = 0) -> list[tuple[Features, int]]:
    """A mixed workload: 20 shared system prompts with their own output scale, tenants, turns."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        g = rng.randrange(20)
        ids = (g, 1000 + g) + tuple(10_000 + rng.randrange(50) for _ in range(rng.randrange(4)))
        f = Features(prompt_tokens=512 * len(ids), block_hashes=chain(*ids), tenant=f"t{g % 3}",
                     model="m", turn=rng.randrange(3), max_tokens=rng.choice([None, 64, 4096]))
        out.append((f, max(0, int(rng.gauss(10 * (g + 1), 3)))))
    return out


# ----------------------------------------------------------------------------- records and structures


def test_features_and_prediction_validate_and_cap():
    with pytest.raises(ValueError):
        Features(prompt_tokens=-1)
    with pytest.raises(ValueError):
        Features(prompt_tokens=1, max_tokens=-5)
    with pytest.raises(ValueError):
        Features(prompt_tokens=1, turn=-1)
    p = Prediction(300.0, 10.0, 300.0, 900.0, "global")
    assert p.capped(None) is p and p.capped(1000) is p
    assert p.capped(100) == Prediction(100.0, 10.0, 100.0, 100.0, "global")


@pytest.mark.parametrize("cfg", [
    lambda: GlobalMedianConfig(window=0),
    lambda: PrefixHistoryConfig(depths=(4, 2)),
    lambda: PrefixHistoryConfig(depths=(), full_chain=False),
    lambda: PrefixHistoryConfig(ring=2, min_samples=3),
    lambda: PrefixHistoryConfig(gate_half_life=0),
    lambda: OnlineRegressorConfig(dim_bits=40),
    lambda: OnlineRegressorConfig(lr=-1),
    lambda: OnlineRegressorConfig(lr=0.1, lr_floor=0.5),
    lambda: EnsembleConfig(half_life=0),
    lambda: EnsembleConfig(power=float("nan")),
    lambda: CalibrationConfig(miss=0.5),
    lambda: CalibrationConfig(step=0),
])
def test_configs_reject_bad_values(cfg):
    with pytest.raises(ValueError):
        cfg()


def test_make_predictor_names_and_unknown():
    assert set(ALL) == {"global_median", "max_tokens", "prefix_history", "online_regressor", "ensemble"}
    for name in ALL:
        assert make_predictor(name).name == name
    with pytest.raises(ValueError, match="choose from"):
        make_predictor("oracle")


def test_rolling_window_quantiles_are_exact_over_the_window():
    rng = np.random.default_rng(0)
    w = RollingWindow(50)
    xs = rng.lognormal(3, 1, 400).round().tolist()
    for i, x in enumerate(xs):
        w.add(x)
        tail = xs[max(0, i - 49): i + 1]
        assert len(w) == len(tail)
        assert w.quantiles() == pytest.approx(tuple(np.quantile(tail, [0.1, 0.5, 0.9])))


def test_lru_table_evicts_least_recently_touched_and_get_does_not_reorder():
    t: LruTable[list] = LruTable(2)
    t.touch("a", list)
    t.touch("b", list)
    t.get("a")  # reading does not make "a" recent
    t.touch("c", list)
    assert t.get("a") is None and t.get("b") is not None
    t.touch("b", list)
    t.touch("d", list)
    assert t.get("c") is None and t.get("b") is not None and len(t) == 2


def test_chained_trace_hashes_share_exactly_the_common_prefix():
    a, b = chain_ids((7, 8, 9, 10)), chain_ids((7, 8, 99, 10))
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:]))
    assert chain_ids((7, 8, 9, 10)) == a  # pure
    assert chain_ids((-1,)) == chain_ids((2**64 - 1,))  # negative ids taken mod 2**64
    assert all(0 <= h < 2**64 for h in a)


def test_features_from_trace_and_routing_request():
    from loadgen.traces import TraceRequest

    r = TraceRequest(arrival_s=0, input_length=1500, output_length=7, hash_ids=(1, 2, 3), tenant="acme", turn=2)
    f = from_trace_request(r)
    assert f == Features(1500, chain_ids((1, 2, 3)), None, "acme", None, 2)
    assert from_trace_request(TraceRequest(0, 10, 1)).block_hashes == ()
    from balancer.policies.base import RoutingRequest

    rr = RoutingRequest("r1", "", 40, (11, 22), 16, {}, max_tokens=64)
    assert from_routing_request(rr, tenant="acme") == Features(40, (11, 22), 64, "acme")
    assert hash_ngrams("Write a haiku") == hash_ngrams("write  a HAIKU") and len(hash_ngrams("a b c d")) == 3
    assert hash_ngrams(None) == () and len(hash_ngrams("one")) == 1


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", ALL)
def test_online_predict_changes_nothing_and_observe_learns(name):
    p = make_predictor(name)
    f = Features(prompt_tokens=100, block_hashes=chain(1, 2), tenant="t", model="m")
    first = p.predict(f)
    assert first.source.endswith("prior")  # nothing observed yet
    assert p.predict(f) == first and p.memory_items() == make_predictor(name).memory_items()
    for _ in range(30):
        p.observe(f, 500)
    after = p.predict(f)
    assert after != first and abs(after.tokens - 500) < abs(first.tokens - 500)
    before_items = p.memory_items()
    for _ in range(3):
        assert p.predict(f) == after
    assert p.memory_items() == before_items


@pytest.mark.parametrize("name", ALL)
def test_predictions_are_ordered_finite_and_within_max_tokens(name):
    p = small(name)
    for f, y in stream(600):
        pr = p.predict(f)
        assert 0 <= pr.p10 <= pr.p50 <= pr.p90 and all(map(math.isfinite, (pr.tokens, pr.p10, pr.p90)))
        if f.max_tokens is not None and name != "max_tokens":
            assert pr.tokens <= f.max_tokens and pr.p90 <= f.max_tokens
        p.observe(f, y)


@pytest.mark.parametrize("name", ALL)
def test_predict_and_observe_is_predict_then_observe(name):
    a, b = make_predictor(name), make_predictor(name)
    for f, y in stream(500, seed=5):
        expected = a.predict(f)
        a.observe(f, y)
        assert b.predict_and_observe(f, y) == expected
    assert a.predict(stream(1, seed=9)[0][0]) == b.predict(stream(1, seed=9)[0][0])


def test_observe_rejects_bad_lengths():
    for name in ALL:
        with pytest.raises(ValueError):
            make_predictor(name).observe(Features(1), -3)
        with pytest.raises(ValueError):
            make_predictor(name).observe(Features(1), float("inf"))


@pytest.mark.parametrize("name", ALL)
def test_memory_is_bounded_after_100k_unique_prefixes(name):
    p = small(name)
    bound = p.max_memory_items()
    sizes = []
    for i in range(100_000):
        p.observe(Features(prompt_tokens=1 + i % 9000, block_hashes=(i * 2654435761 % 2**64,)), i % 997)
        if i in (49_999, 99_999):
            assert p.memory_items() <= bound
            sizes.append(deep_size(p))
    held = p.inner if isinstance(p, Calibrated) else p
    held = held.members[0] if isinstance(held, Ensemble) else held
    if isinstance(held, PrefixHistory):  # the LRU is full: keys are being evicted
        assert held.describe()["prefix_keys"] == held.config.max_keys
    assert sizes[1] <= sizes[0] * 1.01 + 1024, f"memory grew from {sizes[0]} to {sizes[1]} bytes"


@pytest.mark.parametrize("name", ALL)
def test_deterministic_within_and_across_processes(name):
    data = stream(400, seed=3)
    runs = []
    for _ in range(2):
        p = make_predictor(name)
        preds = []
        for f, y in data:
            preds.append(p.predict(f))
            p.observe(f, y)
        runs.append(preds)
    assert runs[0] == runs[1]
    # string keys (tenant, model) must not go through Python's salted hash()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_predictors import stream; "
            "from predictors import make_predictor; p = make_predictor(sys.argv[2]); out = []\n"
            "for f, y in stream(400, seed=3): out.append(p.predict(f).tokens); p.observe(f, y)\n"
            "print(repr(out))")
    outs = {subprocess.run([sys.executable, "-c", code, str(ROOT), name], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and eval(outs.pop()) == [p.tokens for p in runs[0]]


def test_predictors_import_no_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import predictors, predictors.evaluate, predictors.adapter, "
            "predictors.workloads, kvfleet.cmd_predict; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- baselines


def test_global_median_is_the_median_of_the_recent_window():
    p = GlobalMedian(GlobalMedianConfig(window=5))
    for y in (1000, 1000, 1, 2, 3, 4, 5):
        p.observe(Features(10), y)
    pr = p.predict(Features(10))
    assert pr.tokens == 3 and pr.source == "global"  # the two 1000s left the window


def test_max_tokens_cap_uses_max_tokens_else_the_median():
    p = MaxTokensCap()
    for y in (10, 20, 30):
        p.observe(Features(10), y)
    assert p.predict(Features(10, max_tokens=256)).tokens == 256
    assert p.predict(Features(10, max_tokens=256)).p10 <= 256
    assert p.predict(Features(10)).tokens == 20


# ----------------------------------------------------------------------------- PrefixHistory


def test_prefix_history_learns_exact_repeats():
    p = PrefixHistory()
    rng = random.Random(0)
    prompts = [chain(*(rng.randrange(10**9) for _ in range(rng.randrange(1, 40)))) for _ in range(200)]
    lengths = [rng.randrange(1, 2000) for _ in prompts]
    for bh, y in zip(prompts, lengths):
        p.observe(Features(512 * len(bh), bh), y)
    for bh, y in zip(prompts, lengths):
        pr = p.predict(Features(512 * len(bh), bh))
        assert pr.tokens == y and pr.source == f"prefix:{len(bh)}"


def test_prefix_history_backs_off_to_the_longest_seen_prefix_then_tenant_model_global():
    p = PrefixHistory(PrefixHistoryConfig(min_group_samples=2))
    p.observe(Features(100, chain(1, 2, 3, 4, 5), tenant="a", model="m"), 40)
    p.observe(Features(100, chain(1, 2, 3, 4, 5), tenant="a", model="m"), 40)
    p.observe(Features(100, chain(1, 2, 9, 9), tenant="b", model="m"), 400)
    p.observe(Features(100, chain(1, 2, 9, 9), tenant="b", model="m"), 400)
    p.observe(Features(100, chain(7), model="m"), 1)
    # shares 4 blocks with the first prompt: the depth-4 key answers
    assert p.predict(Features(100, chain(1, 2, 3, 4, 77))).source == "prefix:4"
    assert p.predict(Features(100, chain(1, 2, 3, 4, 77))).tokens == 40
    # shares 2 blocks with all four: the depth-2 key, their median
    pr = p.predict(Features(100, chain(1, 2, 55)))
    assert pr.source == "prefix:2" and pr.tokens == 220
    assert p.history_depth(Features(100, chain(1, 2, 55))) == 2
    # no shared prefix: tenant, then model, then global, then the prior
    assert p.predict(Features(100, chain(8), tenant="b", model="m")).tokens == 400
    assert p.predict(Features(100, chain(8), tenant="nobody", model="m")).source == "model"
    assert p.predict(Features(100, chain(8))).source == "global"
    assert PrefixHistory().predict(Features(100, chain(8))).source == "prior"


def test_prefix_history_interval_is_borrowed_around_a_single_sample():
    p = PrefixHistory()
    for y in range(10, 210, 10):  # a shared system prompt, lengths 10..200
        p.observe(Features(100, chain(1, y)), y)
    p.observe(Features(100, chain(1, 2, 3)), 50)
    pr = p.predict(Features(100, chain(1, 2, 3)))
    assert pr.source == "prefix:3" and pr.tokens == 50 and pr.p10 < 50 < pr.p90


def test_prefix_history_gate_falls_back_when_prefixes_carry_no_signal():
    """Outputs independent of the prompt, every prompt seen twice: a 1-sample prefix median is
    noise, so after a while the global median answers instead."""
    rng = random.Random(1)
    p = PrefixHistory()
    for i in range(3000):
        bh = chain(i // 2)
        p.observe(Features(100, bh), int(rng.lognormvariate(5, 1)))
    assert not p.gate_open(1)
    p.observe(Features(100, chain(10**6)), 5)
    assert p.predict(Features(100, chain(10**6))).source == "global"
    # and where prefixes do predict, it stays open
    q = PrefixHistory()
    for i in range(3000):
        q.observe(Features(100, chain(i // 2)), 10 + (i // 2) % 500)
    assert q.gate_open(1)


# ----------------------------------------------------------------------------- OnlineRegressor


def test_regressor_learns_a_tenant_effect_and_max_tokens():
    p = OnlineRegressor()
    rng = random.Random(0)
    for _ in range(3000):
        t = rng.choice("ab")
        y = rng.randrange(10, 30) if t == "a" else rng.randrange(500, 700)
        p.observe(Features(rng.randrange(10, 5000), tenant=t), y)
    a, b = p.predict(Features(800, tenant="a")), p.predict(Features(800, tenant="b"))
    assert 8 < a.tokens < 40 and 400 < b.tokens < 800
    assert a.p10 <= a.p50 <= a.p90 < b.p10 <= b.p90


def test_regressor_never_diverges_on_adversarial_lengths():
    c = OnlineRegressorConfig(max_output_tokens=100_000)
    p = OnlineRegressor(c)
    rng = random.Random(0)
    for i in range(5000):
        f = Features(rng.choice([1, 10**7]), block_hashes=chain(i % 3), turn=rng.randrange(100),
                     max_tokens=rng.choice([None, 1, 10**9]), text_ngrams=(i % 5, 7))
        p.observe(f, rng.choice([0, 10**9, 1]))
        pr = p.predict(f)
        assert all(0 <= v <= c.max_output_tokens and math.isfinite(v) for v in (pr.p10, pr.tokens, pr.p90))
    assert max(abs(w) for w in p._w) <= c.weight_clip


# ----------------------------------------------------------------------------- Ensemble


class _Const(Predictor):
    name = "const"

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(self, features):
        return Prediction(self.value, self.value, self.value, self.value, f"const:{self.value}")

    def observe(self, features, actual_output_tokens):
        pass

    def memory_items(self):
        return 0

    def max_memory_items(self):
        return 0


def test_ensemble_moves_weight_to_the_better_member():
    e = Ensemble([_Const(1000), _Const(20)])
    assert e.weights() == [0.5, 0.5]
    for i in range(200):
        e.observe(Features(10), 18 + i % 5)
    w = e.weights()
    assert w[1] > 0.99 and abs(e.predict(Features(10)).tokens - 20) < 10
    # the world changes: the other member becomes right, and the weight follows
    for _ in range(1500):
        e.observe(Features(10), 1000)
    assert e.weights()[0] > 0.99


def test_ensemble_weights_per_context():
    """PrefixHistory beats the global median on requests with history and ties without: the
    ensemble trusts it where it has history."""
    e = Ensemble([PrefixHistory(), GlobalMedian()])
    rng = random.Random(0)
    for i in range(4000):
        g = rng.randrange(100)
        bh = chain(g) if rng.random() < 0.5 else chain(10**6 + i)
        e.observe(Features(100, bh), 10 + 10 * g)
    seen = Features(100, chain(42))
    assert e.weights(seen)[0] > 0.9
    assert abs(e.predict(seen).tokens - 430) < 40


# ----------------------------------------------------------------------------- the balancer's hooks


def test_balancer_adapter_gives_the_same_features_at_route_and_completion():
    from balancer.policies.base import RoutingRequest
    from balancer.router import Prepared
    from protocol.hashing import prompt_hashes
    from protocol.openai_api import GenerationRequest

    tokens = tuple(range(100))
    hashes = tuple(prompt_hashes(tokens, 16, "tiny"))
    prepared = Prepared(GenerationRequest(kind="completion", model="tiny", prompt_token_ids=tokens, max_tokens=64),
                        tokens, "", hashes, "write a poem", 0)
    rr = RoutingRequest("r1", "", len(tokens), hashes, 16, {}, max_tokens=64, first_user_message="write a poem")
    with_text = BalancerPredictor(make_predictor("online_regressor"), text_ngrams=True)
    assert with_text.features(prepared) == with_text.features(rr)
    assert with_text.features(rr).text_ngrams == hash_ngrams("write a poem")
    bp = BalancerPredictor(make_predictor("ensemble"), model="tiny")
    assert bp.features(prepared) == bp.features(rr) == Features(100, hashes, 64, None, "tiny")
    assert isinstance(bp.predict_point(prepared), float)
    for _ in range(5):
        bp.observe_done(rr, 33)
    assert bp.predict_point(prepared) == pytest.approx(33, abs=1)
    assert bp.predict(prepared).source.startswith("ensemble:prefix")


# ----------------------------------------------------------------------------- Calibrated


def test_calibrated_intervals_cover_about_80_percent_and_leave_the_point_alone():
    """A predictor whose interval is far too narrow (a 2-length ring) gets widened until ~10 %
    of outputs fall on each side; the point estimate is the inner predictor's."""
    rng = random.Random(0)
    narrow = lambda: PrefixHistory(PrefixHistoryConfig(ring=2, quantile_samples=1, gate=False))  # noqa: E731
    raw, cal = narrow(), Calibrated(narrow())
    below = above = inside_raw = 0
    n = 6000
    for i in range(n):
        f = Features(100, chain(i % 50))
        y = int(rng.lognormvariate(4 + (i % 50) / 25, 0.6))
        pr, pc = raw.predict(f), cal.predict(f)
        assert pc.tokens == pr.tokens and pc.p10 <= pc.tokens <= pc.p90
        if i >= 1000:
            inside_raw += pr.p10 <= y <= pr.p90
            below += y < pc.p10
            above += y > pc.p90
        raw.observe(f, y)
        cal.observe(f, y)
    m = n - 1000
    assert inside_raw / m < 0.5  # the raw interval is far too narrow
    assert abs(below / m - 0.1) < 0.03 and abs(above / m - 0.1) < 0.03
    assert cal.name == "prefix_history" and "calibration" in cal.describe()
