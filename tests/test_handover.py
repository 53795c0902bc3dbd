"""The balancer's side of prefill/decode disaggregation without processes: the two legs' bodies
(vLLM's toy_proxy_server.py shape), reading a prefill's answer, and replica roles from config."""

from __future__ import annotations

import argparse
import json

import pytest

from balancer import handover
from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
from balancer.registry import Registry


def test_prefill_leg_asks_for_one_token_and_a_remote_decode():
    body = {"model": "m", "prompt": "p", "max_tokens": 50, "max_completion_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}, "min_tokens": 3, "temperature": 0}
    out = json.loads(handover.prefill_payload(body))
    assert out == {"model": "m", "prompt": "p", "max_tokens": 1, "max_completion_tokens": 1, "stream": False,
                   "temperature": 0,
                   "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                          "remote_engine_id": None, "remote_block_ids": None, "remote_host": None,
                                          "remote_port": None}}
    assert body["max_tokens"] == 50 and "stream_options" in body  # the client's body is left as it came


def test_decode_leg_is_the_clients_body_with_the_prefills_params():
    body = {"model": "m", "prompt": "p", "max_tokens": 50, "stream": True}
    params = {"do_remote_prefill": True, "remote_block_ids": [3, 4], "remote_host": "h", "remote_port": 9}
    assert json.loads(handover.decode_payload(body, params, token_ids=False)) == {**body, "kv_transfer_params": params}
    assert json.loads(handover.decode_payload(body, params, token_ids=True))["return_token_ids"] is True


def test_a_prefill_answer_without_params_cannot_hand_over():
    params = {"do_remote_prefill": True, "remote_block_ids": [1]}
    assert handover.params_of(json.dumps({"choices": [], "kv_transfer_params": params}).encode()) == params
    assert handover.params_of(b'{"choices": []}') is None  # a server without a KV connector
    assert handover.params_of(b'{"kv_transfer_params": {"do_remote_prefill": false}}') is None
    assert handover.params_of(b"not json") is None


def test_replica_roles_from_the_spec_win_over_reports():
    assert ReplicaSpec.parse("prefill@http://h:8100=tcp://h:5557").role == "prefill"
    assert ReplicaSpec.parse("http://user@h:8100").role is None  # an `@` inside the URL is the URL's
    with pytest.raises(ValueError, match="role"):
        ReplicaSpec.parse("router@http://h:8100")
    reg = Registry(BreakerConfig(), HealthConfig(), clock=lambda: 0.0)
    fixed = reg.add(ReplicaSpec.parse("decode@http://a:1"))
    free = reg.add(ReplicaSpec.parse("http://b:1"))
    assert (fixed.role, free.role) == ("decode", "both")
    assert not reg.set_role(fixed.replica_id, "prefill") and fixed.role == "decode"
    assert reg.roles() == {"http://a:1": "decode", "http://b:1": "both"}
    assert reg.set_role(free.replica_id, "prefill") and free.role == "prefill"
    assert reg.roles() == {"http://a:1": "decode", "http://b:1": "prefill"}
    reg.remove(fixed.replica_id)
    assert reg.roles() == {"http://b:1": "prefill"}


def test_a_local_fleet_gives_each_replica_its_role():
    from kvfleet.fleet import FleetSpec

    assert FleetSpec(replicas=4, prefill=1, decode=2).roles() == ["prefill", "decode", "decode", "both"]
    with pytest.raises(ValueError, match="at most"):
        FleetSpec(replicas=1, prefill=1, decode=1)
    with pytest.raises(ValueError, match="torch"):
        FleetSpec(replicas=2, engine="sim", prefill=1)


def test_kv_transfer_peers_allow_loopback_the_own_host_and_the_configured_ones():
    from replica.config import KVTransferConfig

    cfg = KVTransferConfig(host="10.0.0.5", peers=("10.1.0.0/16", "prefill-0.kv", "fd00::7"))
    allowed = ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "10.0.0.5", "10.1.44.3", "prefill-0.kv",
               "PREFILL-0.kv", "fd00::7"]
    assert all(cfg.allows_peer(h) for h in allowed)
    refused = ["10.2.0.1", "192.168.1.1", "prefill-1.kv", "evil.example", "fd00::8", "0.0.0.0"]
    assert not any(cfg.allows_peer(h) for h in refused)
    assert not KVTransferConfig().allows_peer("10.0.0.5")  # default: loopback (and its own 127.0.0.1) only
    assert KVTransferConfig(peers=("*",)).allows_peer("203.0.113.9")
    with pytest.raises(ValueError, match="CIDR"):
        KVTransferConfig(peers=("10.0.0.0/99",))
    with pytest.raises(ValueError, match="kv-transfer-peers"):
        KVTransferConfig(peers=("a b",))


def test_the_kvfleet_replica_flag_sets_the_peers_and_the_fleet_passes_its_host():
    from kvfleet import cmd_replica
    from kvfleet.fleet import FleetSpec, LocalFleet

    p = argparse.ArgumentParser()
    cmd_replica.add_arguments(p)
    cfg = cmd_replica.replica_config(p.parse_args(["--role", "decode", "--kv-transfer-peers", "10.0.0.0/8,p0"]))
    assert cfg.kv_transfer.peers == ("10.0.0.0/8", "p0")
    args = LocalFleet(FleetSpec(replicas=2, prefill=1, decode=1, host="10.9.0.1"))._replica_args("decode")
    assert args[args.index("--kv-transfer-peers") + 1] == "10.9.0.1"


def test_role_names_have_one_definition():
    import protocol.load
    import protocol.roles
    import replica.config
    from balancer import disagg
    from kvfleet import cmd_replica

    assert protocol.load.ROLES is protocol.roles.ROLES is disagg.ROLES
    p = argparse.ArgumentParser()
    cmd_replica.add_arguments(p)
    role = next(a for a in p._actions if a.dest == "role")
    assert tuple(role.choices) == protocol.roles.ROLES
    assert not hasattr(replica.config, "ROLES") or replica.config.ROLES is protocol.roles.ROLES
    with pytest.raises(ValueError, match="choose one of prefill, decode, both"):
        ReplicaSpec.parse("encode@http://h:1")
