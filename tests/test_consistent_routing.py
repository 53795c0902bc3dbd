"""Consistent routing (issue #18 part 3, BalancerConfig.consistent_routing): several balancer
instances that share only the replicas' load reports and KV events pick the same replica for the
same request, whatever each has sent itself; in the simulator and through the one routing seam
(Router / Registry.views), for kvfleet's policy and the peers that read load."""

from __future__ import annotations

import pytest

from balancer.approx_index import ApproxIndex
from balancer.config import BalancerConfig, BreakerConfig, HealthConfig, ReplicaSpec
from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Router
from loadgen.traces import TraceRequest
from protocol.openai_api import GenerationRequest
from protocol.tokenizer import ByteTokenizer
from replica.step_model import get_preset

MODEL = "m"
URLS = [f"http://r{i}:80" for i in range(4)]
# What the replicas last reported: unequal queues, so a load-reading policy has a favourite.
LOADS = [ReplicaLoad(num_running=2, num_waiting=1, queued_prefill_tokens=900, running_decode_tokens=3000,
                     free_blocks=4000, total_blocks=8000, kv_usage=0.5),
         ReplicaLoad(num_running=1, num_waiting=0, queued_prefill_tokens=100, running_decode_tokens=1000,
                     free_blocks=6000, total_blocks=8000, kv_usage=0.25),
         ReplicaLoad(num_running=3, num_waiting=2, queued_prefill_tokens=2500, running_decode_tokens=5000,
                     free_blocks=2000, total_blocks=8000, kv_usage=0.75),
         ReplicaLoad(num_running=1, num_waiting=1, queued_prefill_tokens=400, running_decode_tokens=1500,
                     free_blocks=5000, total_blocks=8000, kv_usage=0.4)]


class _Predictor:
    """An output-length predictor that predicts differently on every instance (as ones that
    learned from different requests do)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict_point(self, prepared) -> float:
        return self.value

    def observe_done(self, rr, output_tokens) -> None:
        pass


def _instance(policy: str, consistent: bool, predicted: float = 100.0) -> Router:
    """One balancer instance over the four replicas, fed LOADS as its load reports."""
    registry = Registry(BreakerConfig(), HealthConfig(), clock=lambda: 0.0)
    for url, load in zip(URLS, LOADS):
        registry.add(ReplicaSpec(url=url))
        registry.on_load(url, load)
    return Router(MODEL, 16, ByteTokenizer(), PrefixIndex(16, MODEL), ApproxIndex(clock=lambda: 0.0),
                  make_policy(policy), registry, has_events=lambda rid: True, clock=lambda: 0.0,
                  predictor=_Predictor(predicted), consistent=consistent)


def _prompts(n: int) -> list[str]:
    return [f"request {i}: " + "cold text " * (20 + 7 * i) for i in range(n)]


def _agreement(policy: str, consistent: bool, n: int = 24) -> float:
    """Requests routed (booked) by instance A one after another, no report in between; each is
    first asked of instance B, which has sent nothing: the share B would have sent alike."""
    a, b = _instance(policy, consistent, 40.0), _instance(policy, consistent, 400.0)
    agreed = 0
    for i, text in enumerate(_prompts(n)):
        req = GenerationRequest(kind="completion", model=MODEL, prompt=text, max_tokens=None)
        pa, pb = a.prepare(req), b.prepare(req)
        theirs = b.choose(pb, str(i))[2].replica_id
        agreed += a.route(pa, str(i)).replica_id == theirs
    return agreed / n


@pytest.mark.parametrize("policy", ["predictive", "precise_prefix", "llmd_scorer", "dynamo_kv", "least_request"])
def test_instances_agree_with_consistent_routing_whatever_each_sent(policy):
    assert _agreement(policy, consistent=True) == 1.0


@pytest.mark.parametrize("policy", ["predictive", "precise_prefix", "llmd_scorer", "dynamo_kv"])
def test_instances_counting_their_own_sends_disagree(policy):
    """The default (one instance): A counts what it sent since the reports, B cannot."""
    assert _agreement(policy, consistent=False) < 0.9


def test_views_hold_only_the_reports_with_consistent_routing():
    router = _instance("least_request", consistent=True)
    req = GenerationRequest(kind="completion", model=MODEL, prompt="x " * 100, max_tokens=50)
    booking = router.route(router.prepare(req), "1")
    r = booking.replica
    assert r.inflight_requests == 1 and r.sent_since_report == 1  # still booked (metrics, drain)
    view = {v.replica_id: v for v in router.views(list(router.registry))}[booking.replica_id]
    load = LOADS[URLS.index(booking.replica_id)]
    assert view.sent_since_report == view.sent_tokens_since_report == 0
    assert view.inflight_requests == load.num_running + load.num_waiting
    assert view.inflight_tokens == load.queued_prefill_tokens + load.running_decode_tokens
    own = {v.replica_id: v for v in router.registry.views(list(router.registry), lambda rid: 0)}[booking.replica_id]
    assert (own.inflight_requests, own.sent_since_report) == (1, 1)


def test_consistent_routing_reads_no_learned_prediction():
    """Each instance's predictor learned from its own requests: not consulted (the policy reads
    the client's max_tokens or its default), so two instances' different predictions do not
    split their decisions."""
    router = _instance("predictive", consistent=True)
    req = GenerationRequest(kind="completion", model=MODEL, prompt="y " * 100, max_tokens=None)
    rr, _, _ = router.choose(router.prepare(req), "1")
    assert rr.predicted_output_tokens is None and rr.consistent
    assert _instance("predictive", consistent=False).choose(router.prepare(req), "1")[0].predicted_output_tokens == 100


def test_predictive_spreads_a_burst_over_the_near_best_replicas():
    """Between two reports nothing of a burst is counted: predictive takes the replicas within
    one request's work of the lowest cost as equal and lets each request's hash pick, so a burst
    of cold requests does not all join one replica; and the same request always gets the same one."""
    router = _instance("predictive", consistent=True)
    chosen = []
    for i, text in enumerate(_prompts(16)):
        req = GenerationRequest(kind="completion", model=MODEL, prompt=text, max_tokens=None)
        p = router.prepare(req)
        first = router.choose(p, str(i))[2].replica_id
        assert router.route(p, str(i)).replica_id == first
        chosen.append(first)
    assert len(set(chosen)) >= 2
    exact = _instance("predictive", consistent=True)
    exact.policy.config = type(exact.policy.config)(consistent_spread=0.0)
    lowest = {exact.route(exact.prepare(GenerationRequest(kind="completion", model=MODEL, prompt=t,
                                                          max_tokens=None)), str(i)).replica_id
              for i, t in enumerate(_prompts(16))}
    assert len(lowest) == 1  # 0: every one of them on the replica with the lowest cost


def test_consistent_spread_is_validated():
    from balancer.policies.predictive import PredictiveConfig

    with pytest.raises(ValueError, match="consistent_spread"):
        PredictiveConfig(consistent_spread=-1.0)


def test_the_flag_and_the_config_key():
    import argparse

    from kvfleet import cmd_balancer

    p = argparse.ArgumentParser()
    cmd_balancer.add_arguments(p)
    rep = ["--replica", "http://h:8000"]
    assert cmd_balancer.build_config(p.parse_args([*rep, "--consistent-routing"])).consistent_routing
    assert not cmd_balancer.build_config(p.parse_args(rep)).consistent_routing
    assert BalancerConfig.from_dict({"consistent_routing": True}).consistent_routing
    # a config file's true stands when the flag is not given
    on = BalancerConfig(consistent_routing=True)
    assert cmd_balancer.build_config(p.parse_args(rep), base=on).consistent_routing


def _burst_trace(n: int = 120) -> list[TraceRequest]:
    """Bursts of cold and shared-prefix requests, arriving together as Mooncake's do."""
    out = []
    for i in range(n):
        tenant = i % 5
        head = tuple(range(100 * tenant, 100 * tenant + (6 if i % 2 else 0)))
        out.append(TraceRequest(arrival_s=0.5 * (i // 12), input_length=(len(head) + 3) * 64 - 5,
                                output_length=16 + i % 7, hash_ids=head + (10_000 + 3 * i, 10_001 + 3 * i,
                                                                          10_002 + 3 * i), hash_block_tokens=64))
    return out


@pytest.mark.parametrize("policy", ["predictive", "llmd_scorer"])
def test_simulated_instances_agree_with_consistent_routing(policy):
    """FleetSimulation: two instances, each with its own registry, index, policy and predictor,
    fed the same events and load reports, requests round robin: every decision agrees with the
    mode on; without it, bursts split them."""
    from simulator.run import SimulateConfig, simulate

    preset = get_preset("llama3-8b-h100")
    on = simulate(_burst_trace(), SimulateConfig(4, preset, (policy,), load=0.9, balancers=2, consistent_routing=True))
    off = simulate(_burst_trace(), SimulateConfig(4, preset, (policy,), load=0.9, balancers=2))
    assert on["policies"][0]["agreement"] == 1.0
    assert off["policies"][0]["agreement"] < 0.95


def _reports_while_a_request_arrives(on_arrival: bool) -> list:
    """The load reports a sim replica subprocess publishes around one request, its steps slowed
    100x so the request waits in the queue for a whole step; read on a real SUB socket."""
    import json
    import threading
    import time
    import urllib.request

    import zmq

    from harness import multi_balancer, procs
    from protocol.load import DEFAULT_LOAD_TOPIC, decode_load, split_extras_message

    args = multi_balancer.sim_replica_args(blocks=256, time_scale=0.01, max_model_len=2048)
    rep = procs.start(args + (["--load-report-on-arrival"] if on_arrival else []))
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.connect(rep.events)
        sub.setsockopt(zmq.SUBSCRIBE, DEFAULT_LOAD_TOPIC)
        deadline = time.monotonic() + 20
        while not sub.poll(100):  # the idle replica's periodic reports: subscribed
            assert time.monotonic() < deadline, "no load report from the replica"
        while sub.poll(0):
            sub.recv_multipart()  # the reports from before the request
        body = json.dumps({"model": multi_balancer.MODEL, "prompt": "z" * 300, "max_tokens": 1}).encode()
        req = urllib.request.Request(rep.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        sent = threading.Thread(target=lambda: urllib.request.urlopen(req, timeout=60).read())
        sent.start()
        reports = []
        while sent.is_alive():  # every report until the request is answered
            if sub.poll(50):
                reports.append(decode_load(split_extras_message(sub.recv_multipart())[2]))
        sent.join()
        return reports
    finally:
        sub.close(linger=0)
        rep.stop()


@pytest.mark.slow
def test_a_replica_reports_a_request_as_it_joins_the_queue_with_load_report_on_arrival():
    """`kvfleet replica --load-report-on-arrival`: a report shows the request waiting, made
    before the step that admits it; without the flag the next report comes after that step."""
    waiting = [r for r in _reports_while_a_request_arrives(True) if r.num_waiting == 1]
    assert waiting
    assert not [r for r in _reports_while_a_request_arrives(False) if r.num_waiting == 1]


def test_simulated_replicas_report_arrivals_to_every_instance():
    """FleetSimulation with report_on_arrival: the instances learn of each other's requests
    from the replicas' reports within a step, so consistent routing loses less to bursts."""
    from simulator.run import SimulateConfig, simulate

    from dataclasses import replace

    from bench.bench_multi_balancer import workload

    trace = workload("mooncake", 120)  # ../shared/traces: bursts of arrivals in ~3 s ticks
    cfg = SimulateConfig(4, get_preset("llama3-8b-h100"), ("llmd_scorer",), 120000 // 16, load=0.8, balancers=2,
                         consistent_routing=True)
    plain = simulate(trace, cfg)["policies"][0]
    fresh = simulate(trace, replace(cfg, report_on_arrival=True))["policies"][0]
    assert fresh["agreement"] == 1.0
    assert fresh["mean_ttft_s"] < plain["mean_ttft_s"]
