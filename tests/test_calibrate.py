"""Calibration: the robust fit, step logs (engine, replica route), fitting served step periods,
`kvfleet calibrate` on the command line, and served calibration end to end on a sim replica."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request

import pytest

from harness import procs
from kvfleet.cli import main as cli_main
from replica.calibrate_served import ServedCalibration
from replica.calibrate import (MAX_PASS_BIAS, NOISY_ERROR, PassCheck, check_passes, fit_served, fit_with_holdout,
                              load_preset_file, passes_to_keep, save, served_periods)
from replica.config import EngineConfig
from replica.engine import build_sim_engine
from replica.request import SamplingParams
from replica.step_model import STEP_RECORD_FIELDS, StepFeatures, StepRecord, StepTimeModel

TRUTH = StepTimeModel(0.002, 8e-5, 5e-8, 1e-6, 1.5e-6, 8e-4)


def random_features(rng: random.Random) -> StepFeatures:
    """A prefill chunk (with or without cached context) beside some decodes, or decodes only."""
    decodes = rng.randint(0, 12)
    ctx = sum(rng.randint(16, 1500) for _ in range(decodes))
    if rng.random() < 0.3:
        new, cached = rng.randint(8, 512), rng.choice([0, 0, 512, 1024])
        return StepFeatures(new + decodes, new * (cached + new / 2), cached, ctx, decodes + 1)
    decodes = max(decodes, 1)
    return StepFeatures(decodes, 0.0, 0, ctx or 100, decodes)


def served_log(rng: random.Random, n: int, model: StepTimeModel, outliers: float = 0.0) -> list[StepRecord]:
    """A replica's step log whose busy periods are the model's durations, with small noise and a
    fraction of steps delayed 2-5x (a shared machine); every 7th step leaves the replica idle."""
    t, out = 100.0, []
    for seq in range(n):
        f = random_features(rng)
        period = model.duration(f) * rng.uniform(0.97, 1.03)
        if rng.random() < outliers:
            period *= rng.uniform(2, 5)
        busy = seq % 7 != 6
        out.append(StepRecord(seq, t, 0.8 * period, f, busy))
        t += period if busy else period + rng.uniform(0.05, 1.0)  # idle: the next step starts later
    return out


def assert_close(model: StepTimeModel, truth: StepTimeModel, rng: random.Random, rel: float) -> None:
    for _ in range(200):
        f = random_features(rng)
        assert model.duration(f) == pytest.approx(truth.duration(f), rel=rel)


# ------------------------------------------------------------------------------ the fit


def test_robust_fit_follows_the_typical_step_not_the_delayed_ones():
    rng = random.Random(1)
    rows = [random_features(rng) for _ in range(600)]
    y = [TRUTH.duration(r) * rng.uniform(0.97, 1.03) * (rng.uniform(2, 5) if rng.random() < 0.15 else 1.0)
         for r in rows]
    robust = StepTimeModel.fit(rows, y, robust=True)
    assert_close(robust, TRUTH, random.Random(2), rel=0.08)
    assert all(c >= 0 for c in robust.coefficients())


def test_robust_fit_of_exact_data_is_exact():
    rng = random.Random(3)
    rows = [random_features(rng) for _ in range(100)]
    fitted = StepTimeModel.fit(rows, [TRUTH.duration(r) for r in rows], robust=True)
    assert_close(fitted, TRUTH, random.Random(4), rel=1e-4)


def test_fit_with_holdout_refuses_too_few_steps_or_mismatched_lengths():
    rows = [StepFeatures(1, 0.0, 0, 10, 1)] * 10
    with pytest.raises(ValueError, match="too few"):
        fit_with_holdout(rows, [0.001] * 10)
    with pytest.raises(ValueError, match="one duration per step"):
        fit_with_holdout(rows, [0.001] * 9)


# ------------------------------------------------------------------------------ served periods


def test_served_periods_run_from_a_busy_step_to_the_next_logged_start():
    f = [StepFeatures(i + 1, 0.0, 0, 100, 1) for i in range(6)]
    log = [StepRecord(0, 10.0, 0.002, f[0], True),
           StepRecord(1, 10.003, 0.002, f[1], True),
           StepRecord(2, 10.007, 0.002, f[2], False),  # went idle: no period
           StepRecord(3, 12.0, 0.002, f[3], True),  # its successor (seq 4) was not logged: no period
           StepRecord(5, 12.5, 0.002, f[5], True)]  # the last logged step: no successor
    rows, periods = served_periods(reversed(log))  # order of the log does not matter
    assert rows == [f[0], f[1]]
    assert periods == pytest.approx([0.003, 0.004])


def test_fit_served_recovers_the_model_behind_a_noisy_step_log():
    log = served_log(random.Random(5), 1500, TRUTH, outliers=0.1)
    model, report = fit_served(log, seed=0)
    assert_close(model, TRUTH, random.Random(6), rel=0.08)
    assert report["mode"] == "served"
    assert report["steps"] == sum(1 for r in log[:-1] if r.busy_after)
    assert report["holdout"]["median_rel_error"] < 0.05


def test_step_record_wire_round_trip_and_bad_input():
    r = StepRecord(7, 1.5, 0.003, StepFeatures(130, 8450.0, 0, 2000, 3), True)
    wire = json.loads(json.dumps(r.to_wire()))
    assert len(wire) == len(STEP_RECORD_FIELDS)
    assert StepRecord.from_wire(wire) == r
    for bad in ([1, 2, 3], None, ["x"] * 9):
        with pytest.raises(ValueError, match="not a step record"):
            StepRecord.from_wire(bad)


# ------------------------------------------------------------------------------ step logs


def test_engine_logs_each_step_with_its_features_only_when_asked():
    from collections import deque

    cfg = EngineConfig(num_blocks=64, max_num_batched_tokens=32)
    engine = build_sim_engine(cfg, "tiny-cpu", time_scale=1e6)
    assert engine.step_log is None
    engine.step_log = deque(maxlen=100)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    log = list(engine.step_log)
    assert [r.seq for r in log] == [0, 1, 2, 3]
    # 40 prompt tokens in chunks of 32: then 8 more after 32 cached, then two decodes
    assert log[0].features == StepFeatures(32, 32 * 16, 0, 0, 1)
    assert log[1].features == StepFeatures(8, 8 * (32 + 4), 32, 0, 1)
    assert log[2].features == StepFeatures(1, 0.0, 0, 40, 1)
    assert [r.busy_after for r in log] == [True, True, True, False]
    assert all(b.start >= a.start + a.duration for a, b in zip(log, log[1:]))


SIM_REPLICA = ["replica", "--engine", "sim", "--preset", "tiny-cpu", "--port", "0", "--num-blocks", "256"]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def complete(url: str, prompt: list[int], max_tokens: int) -> None:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


@pytest.mark.slow
def test_replica_serves_its_step_log_and_says_how_to_turn_it_on():
    rep = procs.start([*SIM_REPLICA, "--step-log", "100"])
    try:
        status, body = get(f"{rep.url}/step_log")
        assert status == 200 and body == {"fields": list(STEP_RECORD_FIELDS), "next_seq": 0, "steps": []}
        complete(rep.url, list(range(50)), 4)  # one prefill step, three decodes
        status, body = get(f"{rep.url}/step_log")
        steps = [StepRecord.from_wire(s) for s in body["steps"]]
        assert body["next_seq"] == 4 and [s.seq for s in steps] == [0, 1, 2, 3]
        assert steps[0].features.new_tokens == 50 and steps[-1].busy_after is False
        complete(rep.url, list(range(60, 70)), 2)
        _, body = get(f"{rep.url}/step_log?since=4")
        assert [s[0] for s in body["steps"]] == [4, 5]
        status, body = get(f"{rep.url}/step_log?since=x")
        assert status == 400 and "since" in body["error"]["message"]
    finally:
        assert rep.stop() == 0
    rep = procs.start(SIM_REPLICA)
    try:
        status, body = get(f"{rep.url}/step_log")
        assert status == 404 and "--step-log" in body["error"]["message"]
    finally:
        rep.stop()


# ------------------------------------------------------------------------------ the command


def test_calibrate_help_names_both_modes(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["calibrate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--mode {served,engine}" in out and "--requests" in out and "--passes" in out and "--retries" in out


@pytest.mark.parametrize("args, message", [
    (["--requests", "3"], "--requests must be at least 10"),
    (["--model", "nope"], "unknown model preset 'nope'"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--passes", "0"], "--passes must be at least 1"),
    (["--retries", "-1"], "--retries and --retry-wait non-negative"),
    (["--retry-wait", "-1"], "--retries and --retry-wait non-negative"),
    (["--requests", "40", "--passes", "5"], "at least 10 per pass"),
])
def test_calibrate_rejects_bad_arguments_before_measuring(args, message, capsys, tmp_path):
    out = tmp_path / "m.json"
    assert cli_main(["calibrate", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_rejects_an_unknown_mode(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["calibrate", "--mode", "fast"])
    assert e.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_replica_rejects_a_negative_step_log(capsys):
    assert cli_main(["replica", "--engine", "sim", "--step-log", "-1"]) == 2
    assert "--step-log" in capsys.readouterr().err


@pytest.mark.slow
def test_served_calibration_of_a_sim_replica_writes_a_preset_a_sim_replica_loads(tmp_path):
    from replica.calibrate_served import calibrate_served

    cfg = EngineConfig(model="tiny", num_blocks=256, max_num_batched_tokens=512, max_num_seqs=32)
    model, report = calibrate_served(cfg, num_requests=30, seed=1, sim_preset="tiny-cpu", passes=2, retries=1,
                                     retry_wait_s=0)
    assert report["mode"] == "served" and report["requests"] == 30
    assert 0 < report["steps"] <= report["logged_steps"]
    assert [(p["index"], p["seed"], p["requests"]) for p in report["passes"]] == [(0, 1, 15), (1, 2, 15)]
    assert all(p["steps"] > 0 for p in report["passes"])
    assert len(report["repeated_passes"]) <= 1
    assert "sim preset tiny-cpu" in model.source
    path = tmp_path / "cal.json"
    save(path, model, cfg, report)
    preset = load_preset_file(path)
    assert preset.model == model and preset.kv_blocks == 256 and preset.max_num_batched_tokens == 512


@pytest.fixture(scope="module")
def engine_calibrations() -> dict:
    """The real in-process calibrations the parametrized test below ran, by (cfg, requests, seed):
    its cases differ only in the holdout error they set afterwards, so one measurement serves both."""
    return {}


@pytest.mark.parametrize("holdout, warned", [(0.05, False), (0.4, True)])
def test_calibrate_warns_when_the_fit_says_the_machine_was_busy(holdout, warned, engine_calibrations, monkeypatch,
                                                                capsys, tmp_path):
    import copy

    import replica.calibrate as cal

    real = cal.calibrate

    def measured(cfg, requests, seed):
        key = (cfg, requests, seed)
        if key not in engine_calibrations:
            engine_calibrations[key] = real(cfg, requests, seed)
        model, report = copy.deepcopy(engine_calibrations[key])
        report["holdout"]["median_rel_error"] = holdout  # as a disturbed (or a quiet) run reports it
        return model, report

    monkeypatch.setattr(cal, "calibrate", measured)
    out = tmp_path / "m.json"
    assert cli_main(["calibrate", "--mode", "engine", "--requests", "12", "--max-num-seqs", "4",
                     "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert out.exists()
    assert ("re-run when it is quiet" in err) == warned


# ------------------------------------------------------------------------------ passes


def pass_periods(seed: int, n: int, model: StepTimeModel, slow: float = 1.0,
                 scatter: float = 0.03) -> tuple[list[StepFeatures], list[float]]:
    """One calibration pass's (features, periods): the model's durations × `slow`, each moved
    by up to ±`scatter`."""
    rng = random.Random(seed)
    rows = [random_features(rng) for _ in range(n)]
    return rows, [model.duration(f) * slow * rng.uniform(1 - scatter, 1 + scatter) for f in rows]


def test_check_passes_finds_the_pass_that_ran_slow_or_scattered_and_only_it():
    quiet = [pass_periods(s, 300, TRUTH) for s in range(4)]
    checks = check_passes(quiet)
    assert [c.disturbed for c in checks] == [False] * 4
    assert all(c.error < 0.05 and abs(c.bias) < 0.03 and c.steps == 300 for c in checks)

    slow = check_passes([*quiet, pass_periods(9, 300, TRUTH, slow=1.3)])
    assert [c.disturbed for c in slow] == [False] * 4 + [True]
    assert slow[4].bias == pytest.approx(0.3, abs=0.03) and "slower than the others by" in slow[4].describe()

    # 12 % slower throughout: each step is near its prediction (error ~11 %), but all on one side
    slower = check_passes([*quiet, pass_periods(9, 300, TRUTH, slow=1.12)])
    assert slower[4].error < NOISY_ERROR and slower[4].bias > MAX_PASS_BIAS and slower[4].disturbed
    assert not check_passes([*quiet, pass_periods(9, 300, TRUTH, slow=1.05)])[4].disturbed

    fast = check_passes([pass_periods(9, 300, TRUTH, slow=0.8), *quiet])
    assert [c.disturbed for c in fast] == [True] + [False] * 4 and fast[0].bias < -0.15

    # steps scattered ±60 %: about right on average, but most of them far off
    scattered = check_passes([*quiet[:2], pass_periods(9, 300, TRUTH, scatter=0.6), *quiet[2:]])
    assert [c.disturbed for c in scattered] == [False, False, True, False, False]
    assert scattered[2].error > NOISY_ERROR and abs(scattered[2].bias) < MAX_PASS_BIAS


def test_a_single_pass_has_nothing_to_disagree_with():
    [c] = check_passes([pass_periods(1, 300, TRUTH, slow=2.0)])
    assert not c.disturbed and c.steps == 300


def test_passes_to_keep_drops_the_disturbed_but_keeps_at_least_half():
    def check(i, error, bias=0.0):
        return PassCheck(i, 100, error, bias, error > NOISY_ERROR or abs(bias) > MAX_PASS_BIAS)

    assert passes_to_keep([check(0, 0.05), check(1, 0.4), check(2, 0.06, 0.2), check(3, 0.07)]) == [0, 3]
    # most of them disturbed: the machine was busy throughout; the least disturbed half (3 of 5)
    assert passes_to_keep([check(0, 0.3), check(1, 0.2), check(2, 0.5), check(3, 0.05), check(4, 0.16)]) == [1, 3, 4]
    assert passes_to_keep([check(0, 0.9)]) == [0]


class ScriptedCalibration(ServedCalibration):
    """`ServedCalibration` whose replica is a script: pass i's n-th run (from 0) logs steps
    `slow[(i, n)]` times slower than TRUTH (default 1), so the pass logic runs without a
    replica (the real replica is exercised by the slow test below)."""

    def __init__(self, slow: dict[tuple[int, int], float]) -> None:
        super().__init__(EngineConfig(model="tiny"))
        self.slow = slow
        self.runs: dict[int, int] = {}
        self.t = 0.0

    def _serve(self, num_requests: int, seed: int) -> list[StepRecord]:
        n = self.runs.get(seed, 0)
        self.runs[seed] = n + 1
        rng = random.Random(seed * 100 + n)
        log = served_log(rng, 8 * num_requests, TRUTH)
        factor = self.slow.get((seed, n), 1.0)
        base = self.t
        out, t, seq0 = [], base, len(self.records)
        for r in log:  # restamp: periods × factor, sequence numbers after the previous passes'
            out.append(StepRecord(seq0 + r.seq, t, r.duration * factor, r.features, r.busy_after))
            nxt = log[r.seq + 1].start - r.start if r.seq + 1 < len(log) else 1.0
            t += nxt * factor if r.busy_after else nxt
        self.t = t + 10.0
        return out


def test_a_disturbed_pass_is_measured_again_with_what_shared_its_minute():
    cal = ScriptedCalibration({(2, 0): 1.4})  # pass 3's first run is slowed by 40 %
    between = []
    checks = cal.run_passes(5, 40, seed=0, retries=2, between=between.append, retry_wait_s=0)
    assert between == [0, 1, 2, 3, 4, 2]
    assert cal.runs == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    assert not any(c.disturbed for c in checks)
    model, report = cal.fit()
    assert report["repeated_passes"] == [2] and report["dropped_passes"] == []
    assert [p["kept"] for p in report["passes"]] == [True] * 5
    assert [p["seed"] for p in report["passes"]] == [0, 1, 2, 3, 4]
    assert report["requests"] == 200
    assert_close(model, TRUTH, random.Random(7), rel=0.05)


def test_a_pass_disturbed_every_time_is_left_out_after_the_retries(monkeypatch):
    cal = ScriptedCalibration({(1, n): 1.5 for n in range(5)})
    messages = []
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    cal.run_passes(4, 40, seed=0, retries=2, progress=messages.append, retry_wait_s=3)
    assert slept == [3, 6]  # waits before each repeat, doubling
    assert cal.runs[1] == 3  # the first run and two retries, no more
    assert len(messages) == 2 and all("pass 2 looks disturbed" in m for m in messages)
    assert "measuring it again in 3 s" in messages[0]
    model, report = cal.fit()
    assert report["repeated_passes"] == [1, 1] and report["dropped_passes"] == [1]
    assert [p["kept"] for p in report["passes"]] == [True, False, True, True]
    # the fit follows the undisturbed passes, not 1.5x
    assert_close(model, TRUTH, random.Random(8), rel=0.05)
    assert report["steps"] < len(served_periods(cal.records)[0])


def test_no_retries_means_no_repeat_but_the_disturbed_pass_is_still_left_out():
    cal = ScriptedCalibration({(0, 0): 1.5})
    cal.run_passes(3, 40, seed=0, retries=0, retry_wait_s=0)
    assert cal.runs == {0: 1, 1: 1, 2: 1}
    _, report = cal.fit()
    assert report["repeated_passes"] == [] and report["dropped_passes"] == [0]


@pytest.mark.slow
def test_calibrate_served_on_the_command_line_reports_each_pass(monkeypatch, capsys, tmp_path):
    """The command's served path end to end, against a real (sim) replica subprocess; a pass
    the check finds disturbed is said to be measured again and, if still disturbed, left out."""
    import replica.calibrate_served as cs

    real = cs.calibrate_served
    calls = []

    def on_a_sim_replica(cfg, requests, seed, **kw):
        calls.append((requests, seed, kw["passes"], kw["retries"], kw["retry_wait_s"]))
        kw["progress"]("pass 2 looks disturbed (a test): measuring it again")  # the command prints progress
        return real(cfg, requests, seed, sim_preset="tiny-cpu", **kw)

    monkeypatch.setattr(cs, "calibrate_served", on_a_sim_replica)
    out = tmp_path / "m.json"
    assert cli_main(["calibrate", "--requests", "30", "--passes", "3", "--retries", "1", "--retry-wait", "0",
                     "--num-blocks", "256", "--out", str(out)]) == 0
    assert calls == [(30, 0, 3, 1, 0)]
    text = capsys.readouterr().out
    assert "kvfleet calibrate: pass 2 looks disturbed (a test): measuring it again" in text
    for i in (1, 2, 3):
        assert f"  pass {i}: " in text
    assert "against the other passes' model median error" in text
    report = json.loads(out.read_text())["report"]
    assert [p["index"] for p in report["passes"]] == [0, 1, 2]
    assert sum("left out" in line for line in text.splitlines()) == len(report["dropped_passes"])
