"""LoRA-aware routing end to end (issue #17 part 5): two real torch replica subprocesses serve
the same two adapters (made here with safetensors), one resident on each (--max-loras 1, the
first listed loads at start); the balancer sends every request for an adapter to the replica
that holds it, under a policy that does not price loads (round_robin, through the shared
`adapter_candidates`) and under predictive (which prices the load). /v1/models lists the
adapters with their parent, an adapter no replica serves gets a 404, adapter outputs differ
from the base model's, and the prefix index keeps adapters' blocks apart."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from harness import procs
from harness.fleet import REPLICA_ARGS, balancer, http
from replica.lora_weights import save_lora
from replica.model_config import ModelConfig

pytestmark = pytest.mark.slow

PROMPT = "Translate the question into SQL, then explain the plan step by step. " * 6  # ~420 tokens


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    tiny = ModelConfig.from_preset("tiny")
    sql, chat = str(d / "sql.safetensors"), str(d / "chat.safetensors")
    save_lora(sql, tiny, rank=8, alpha=16, projections=("q_proj", "v_proj", "down_proj"), seed=1, std=0.1)
    save_lora(chat, tiny, rank=4, alpha=8, projections=("k_proj", "o_proj", "up_proj"), seed=2, std=0.1)
    a, b = procs.start_all([REPLICA_ARGS + ["--lora-modules", f"sql={sql}", f"chat={chat}", "--max-loras", "1"],
                            REPLICA_ARGS + ["--lora-modules", f"chat={chat}", f"sql={sql}", "--max-loras", "1"]])
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


async def _ready(s: aiohttp.ClientSession, url: str) -> None:
    """Until the balancer knows both replicas' adapters and which one each holds."""
    for _ in range(200):
        async with s.get(url + "/admin/replicas") as r:
            reps = (await r.json())["replicas"]
        if all(len(x["lora_adapters"]) == 2 and x["loras_resident"] for x in reps):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the balancer never saw the replicas' adapters: {reps}")


async def _complete(s: aiohttp.ClientSession, url: str, model: str, prompt: str) -> tuple[int, str, dict]:
    async with s.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                     "temperature": 0, "ignore_eos": True}) as r:
        body = await r.json()
        return r.status, r.headers.get("X-Kvfleet-Replica", ""), body


def _sample(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels}")


@pytest.mark.parametrize("policy", ["round_robin", "predictive"])
def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(fleet, policy):
    a, b = fleet
    holder = {"sql": a.url, "chat": b.url}

    async def main():
        async with balancer([a.replica_arg, b.replica_arg], policy=policy) as (url, _), aiohttp.ClientSession() as s:
            await _ready(s, url)
            async with s.get(url + "/v1/models") as r:
                models = {m["id"]: m["parent"] for m in (await r.json())["data"]}
            assert models == {"tiny": None, "sql": "tiny", "chat": "tiny"}
            served = {}
            for i in range(6):
                for name in ("sql", "chat"):
                    status, replica, body = await _complete(s, url, name, f"{PROMPT} question {i % 2}")
                    assert status == 200, body
                    assert body["model"] == name
                    served.setdefault(name, set()).add(replica)
                    last = body
            status, _, base = await _complete(s, url, "tiny", f"{PROMPT} question 1")
            assert status == 200
            status, _, missing = await _complete(s, url, "no-such-adapter", PROMPT)
            async with s.get(url + "/metrics") as r:
                metrics = await r.text()
            return served, last, base, status, missing, metrics

    served, last, base, status, missing, metrics = asyncio.run(main())
    assert served == {"sql": {holder["sql"]}, "chat": {holder["chat"]}}
    assert last["choices"][0]["text"] != base["choices"][0]["text"]  # the adapter changes the output
    # the second request of each prompt under an adapter hit its own cached blocks
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] >= 400
    assert status == 404 and missing["error"]["param"] == "model"
    assert "no-such-adapter" in missing["error"]["message"] and "`sql`" in missing["error"]["message"]
    assert _sample(metrics, "kvfleet_lora_routed_total", outcome="resident") == 12
    assert _sample(metrics, "kvfleet_lora_routed_total", outcome="load") == 0
    assert _sample(metrics, "kvfleet_lora_routed_total", outcome="unserved") == 1
    assert _sample(metrics, "kvfleet_replica_lora_adapters", replica=a.url) == 1


def test_replica_lists_adapters_and_keeps_their_blocks_apart(fleet):
    a, _ = fleet
    status, _, raw = http("GET", a.url + "/v1/models")
    data = json.loads(raw)["data"]
    assert status == 200 and [(m["id"], m["parent"]) for m in data] == [("tiny", None), ("sql", "tiny"),
                                                                         ("chat", "tiny")]
    assert data[1]["root"].endswith("sql.safetensors")
    prompt = "A prompt both adapters are sent word for word, twice each. " * 8
    cached = []
    for model in ("sql", "chat", "sql", "chat", "tiny"):
        status, _, raw = http("POST", a.url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1})
        assert status == 200, raw
        cached.append(json.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"])
    # each adapter hits only its own blocks (chat evicted sql's weights, not sql's KV); the base model none
    assert cached[0] == cached[1] == cached[4] == 0 and cached[2] > 0 and cached[3] > 0
    status, _, raw = http("GET", a.url + "/load")
    load = json.loads(raw)
    assert load["loras"] == ["chat"] and load["lora_load_s"] > 0
    status, _, raw = http("GET", a.url + "/metrics")
    text = raw.decode()
    assert _sample(text, "kvfleet_replica_lora_resident", lora_name="chat") == 1
    assert _sample(text, "kvfleet_replica_lora_resident", lora_name="sql") == 0
    assert _sample(text, "kvfleet_replica_lora_loads_total") >= 3
