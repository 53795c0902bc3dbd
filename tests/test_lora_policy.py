"""LoRA-aware routing on the balancer's side, without processes: the load report carries the
resident adapters (and stays readable both ways with older peers), the registry learns adapters
from /v1/models entries, the router hashes an adapter's prompt under its root and narrows a
non-pricing policy to the holders, predictive prices the load."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from balancer.approx_index import ApproxIndex
from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad, ReplicaView, RoutingRequest, adapter_candidates
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Router
from protocol.events import BlockStored
from protocol.hashing import prompt_hashes
from protocol.load import LoadReport, decode_load, encode_load
from protocol.openai_api import GenerationRequest
from protocol.tokenizer import ByteTokenizer
from tests.test_policy_predictive import synthetic_steps

REPORT = LoadReport(replica_id="r0", ts=1.0, num_running=1, num_waiting=0, queued_prefill_tokens=0,
                    running_decode_tokens=10, free_blocks=5, total_blocks=10, block_size=16, kv_usage=0.5,
                    loras=("sql", "chat"), lora_load_s=0.012)


def test_load_report_carries_resident_adapters_and_stays_backwards_compatible() -> None:
    assert decode_load(encode_load(REPORT)) == REPORT
    old = msgpack.unpackb(encode_load(REPORT))
    del old["loras"], old["lora_load_s"]  # an older replica's report
    got = decode_load(msgpack.packb(old))
    assert got.loras == () and got.lora_load_s == 0.0
    # an older reader ignores keys it does not know: the new ones are plain extra map keys
    assert {"loras", "lora_load_s"} <= set(msgpack.unpackb(encode_load(REPORT)))


def rr(lora: str | None) -> RoutingRequest:
    return RoutingRequest("q", "", 64, (1, 2, 3, 4), 16, {}, lora_name=lora)


def test_adapter_candidates_keeps_holders_within_the_slack() -> None:
    a = ReplicaView("a", inflight_requests=5, loras=frozenset({"sql"}))
    b = ReplicaView("b", inflight_requests=0, loras=frozenset({"chat"}))
    c = ReplicaView("c", inflight_requests=1)
    views = [a, b, c]
    assert adapter_candidates(rr("sql"), views, slack=8) == [a]
    assert adapter_candidates(rr("sql"), views, slack=4) is views  # a is 5 busier than b: everyone
    assert adapter_candidates(rr("nobody-holds"), views, 8) is views
    assert adapter_candidates(rr(None), views, 8) is views


def test_predictive_prices_the_adapter_load_and_can_be_told_not_to() -> None:
    views = [ReplicaView(rid, load=ReplicaLoad(total_blocks=8000, free_blocks=8000, age_s=0.05),
                         loras=frozenset({"sql"} if rid == "b" else ()), lora_load_s=0.5 if rid == "a" else 0.0)
             for rid in ("a", "b", "c")]
    for aware in (True, False):
        p = make_policy("predictive", {"lora_aware": aware})
        for v in views:
            p.observe_steps(v.replica_id, synthetic_steps(seed=1))
        d = p.select(rr("sql"), views)
        loads = {rid: s["adapter_load"] for rid, s in d.scores.items()}
        if aware:  # b holds it; a's measured 0.5 s, c's unmeasured default (0.04 s)
            assert d.replica_id == "b" and "loads adapter" not in d.reason
            assert loads == {"a": 0.5, "b": 0.0, "c": 0.04}
            assert d.scores["a"]["ttft"] - d.scores["b"]["ttft"] == pytest.approx(0.5)
        else:  # the three replicas look the same
            assert loads == {"a": 0.0, "b": 0.0, "c": 0.0}
            assert len({s["cost"] for s in d.scores.values()}) == 1


def test_router_hashes_an_adapters_prompt_under_its_root_and_routes_to_the_holder() -> None:
    now = [0.0]
    reg = Registry(BreakerConfig(), HealthConfig(), lambda: now[0])
    index = PrefixIndex(16, "tiny")
    for url in ("http://a:1", "http://b:1"):
        state = reg.add(ReplicaSpec(url=url))
        reg.set_models(state, frozenset({"tiny", "sql"}), {"sql": "tiny", "not-listed": "tiny"})
    assert reg.adapter_parent("sql") == "tiny" and reg.adapter_parent("not-listed") is None
    reg.set_loras("http://b:1", frozenset({"sql"}), 0.02)
    router = Router("tiny", 16, ByteTokenizer(), index, ApproxIndex(clock=lambda: now[0]),
                    make_policy("round_robin"), reg, has_events=lambda rid: True)
    tokens = list(range(64))
    # a holds the prompt's blocks, but under the base model: they must not count for `sql`
    index.apply("http://a:1", BlockStored((1, 2, 3, 4), None, tuple(tokens), 16))
    req = GenerationRequest(kind="completion", model="sql", prompt_token_ids=tuple(tokens))
    prepared = router.prepare_tokens(req, tokens, "")
    assert prepared.lora_name == "sql"
    assert list(prepared.block_hashes) == prompt_hashes(tokens, 16, "tiny", lora_name="sql")
    for _ in range(4):  # round robin, narrowed to the replica holding the adapter
        booking = router.route(prepared, "q")
        assert booking.replica_id == "http://b:1" and booking.matched_tokens == 0
        booking.finish(1)
    base = router.prepare_tokens(dataclasses.replace(req, model="tiny"), tokens, "")
    assert base.lora_name is None and router.routing_request(base, "q").matched_blocks == {"http://a:1": 4}


def test_router_candidate_stage_narrows_only_for_a_policy_that_does_not_price_the_load() -> None:
    """Router.candidates: the usable replicas' views after the narrowings. An adapter's request
    keeps to its holders (within the slack) under round robin; predictive prices the load and
    sees every replica; a base model's request is never narrowed; the slack still applies."""
    reg = Registry(BreakerConfig(), HealthConfig(), lambda: 0.0)
    for url in ("http://a:1", "http://b:1", "http://c:1"):
        reg.set_models(reg.add(ReplicaSpec(url=url)), frozenset({"tiny", "sql"}), {"sql": "tiny"})
    reg.set_loras("http://b:1", frozenset({"sql"}), 0.02)

    def router(policy: str, slack: int = 8) -> Router:
        return Router("tiny", 16, ByteTokenizer(), PrefixIndex(16, "tiny"), ApproxIndex(), make_policy(policy), reg,
                      has_events=lambda rid: True, lora_slack=slack)

    def ids(r: Router, model: str) -> list[str]:
        req = GenerationRequest(kind="completion", model=model, prompt_token_ids=tuple(range(32)))
        rr = r.routing_request(r.prepare_tokens(req, list(range(32)), ""), "q")
        return [v.replica_id for v in r.candidates(rr, reg.usable(frozenset(), model))]

    everyone = ["http://a:1", "http://b:1", "http://c:1"]
    assert ids(router("round_robin"), "sql") == ["http://b:1"]
    assert ids(router("round_robin"), "tiny") == everyone
    assert ids(router("predictive"), "sql") == everyone
    reg.get("http://b:1").inflight_requests = 3  # the holder is 3 busier than the idle others
    assert ids(router("round_robin", slack=2), "sql") == everyone
    assert ids(router("round_robin", slack=3), "sql") == ["http://b:1"]


def test_lora_slack_from_the_flag_and_the_config_file(tmp_path) -> None:
    import argparse

    from balancer.config import BalancerConfig
    from kvfleet import cmd_balancer

    path = tmp_path / "b.toml"
    path.write_text('replicas = ["http://h:1"]\nlora_slack = 3\n')
    assert BalancerConfig.from_file(path).lora_slack == 3
    p = argparse.ArgumentParser()
    cmd_balancer.add_arguments(p)
    assert cmd_balancer.build_config(p.parse_args(["--config", str(path), "--lora-slack", "5"])).lora_slack == 5
    with pytest.raises(ValueError, match="lora_slack"):
        BalancerConfig(lora_slack=-1)


def test_chwbl_keys_an_adapters_request_by_the_adapter_name_first() -> None:
    from balancer.policies.chwbl import routing_key

    req = RoutingRequest("q", "the prompt", 3, (), 16, {}, first_user_message="hello there", lora_name="sql")
    assert routing_key(req, 5) == "sqlhello"  # KubeAI: req.Adapter + req.Prefix
    assert routing_key(dataclasses.replace(req, lora_name=None), 5) == "hello"


def test_index_skips_adapter_blocks_it_cannot_name() -> None:
    index = PrefixIndex(16, "tiny")
    tokens = tuple(range(32))
    index.apply("r", BlockStored((1, 2), None, tokens, 16, lora_id=3))  # an id without its name
    index.apply("r", BlockStored((5, 6), None, tokens, 16, lora_id=0))  # 0: no adapter
    assert index.stats.skipped_events == 1
    assert index.match(prompt_hashes(list(tokens), 16, "tiny")) == {"r": 2}
