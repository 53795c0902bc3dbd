"""KV offload tiers in the engines: the torch engine's greedy output with a prefix loaded back from
host memory (or disk) is token-identical to recompute; the sim engine prices a load by the
preset's bytes per block and link bandwidth; a real replica process evicts a prefix into its host
tier, reports it cached when the prompt comes back, and publishes BlockStored medium CPU on its
ZMQ PUB socket."""

from __future__ import annotations

import json
import random
import time
import urllib.request

import pytest
import zmq

from kvfleet.procs import start
from protocol.events import BlockRemoved, BlockStored, decode_batch, split_message
from protocol.digest import DEFAULT_DIGEST_TOPIC
from protocol.load import DEFAULT_LOAD_TOPIC
from protocol.hashing import hash_blocks, root_hash
from protocol.tokenizer import ByteTokenizer
from replica.config import EngineConfig
from replica.engine import LLMEngine, build_engine, build_sim_engine
from replica.request import SamplingParams
from replica.step_model import get_preset, features_of

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(length)] for _ in range(n)]


def _run(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    engine.add_request(rid, prompt, GREEDY)
    out: list[int] = []
    cached = -1
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
            cached = o.num_cached_tokens
        engine.kv.check_integrity()
    return out, cached


def _evict_then_repeat(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[int], int]:
    """Run every prompt once (the later ones push the first out of the device pool), then the first again."""
    for i, p in enumerate(prompts):
        _run(engine, f"r{i}", p)
    return _run(engine, "again", prompts[0])


def _tiny(**kw) -> LLMEngine:
    return build_engine(EngineConfig(model="tiny", num_blocks=24, max_num_seqs=4, max_num_batched_tokens=64,
                                     threads=1, **kw))


def test_prefix_loaded_from_host_or_disk_is_token_identical_to_recompute(tmp_path) -> None:
    prompts = _prompts(3, 3, 150)  # 10 blocks each (9 full); the pool holds 24
    recompute, cached = _evict_then_repeat(_tiny(enable_prefix_caching=False), prompts)
    assert cached == 0

    host = _tiny(host_kv_blocks=64)
    out, cached = _evict_then_repeat(host, prompts)
    assert out == recompute
    # All 9 full blocks: the pool evicted the first prompt tail first, so its first 4 blocks are
    # still on the device and the next 5 come back from the host tier.
    assert cached == 144
    tier = host.kv.offload.tier("CPU")
    assert tier.stats.loaded_blocks == 5 and host.scheduler.external_hit_tokens == 80
    assert host.kv.offload.totals.blocks["CPU_to_GPU"] == 5
    # The step that loaded them says so in its sample (load reports carry it to the balancer).
    assert [s.loaded_tokens for s in host.steps if s.loaded_tokens] == [80]

    # A 4-block host tier: most of the prefix went on down to the disk tier's file.
    disk = _tiny(host_kv_blocks=4, disk_kv_blocks=64, disk_kv_path=str(tmp_path / "kv.bin"))
    out, cached = _evict_then_repeat(disk, prompts)
    assert out == recompute and cached == 144
    assert disk.kv.offload.tier("STORAGE").stats.loaded_blocks > 0
    assert (tmp_path / "kv.bin").stat().st_size == 64 * disk.executor.tier_store.block_bytes


def test_the_loaded_kv_is_what_the_output_depends_on() -> None:
    """The control: wipe the host tier's bytes before the load and the output changes, so the
    equality above holds because the right KV came back, not because it was never read."""
    prompts = _prompts(3, 3, 150)
    recompute, _ = _evict_then_repeat(_tiny(enable_prefix_caching=False), prompts)
    engine = _tiny(host_kv_blocks=64)
    for i, p in enumerate(prompts):
        _run(engine, f"r{i}", p)
    store = engine.executor.tier_store
    store.apply(engine.kv.take_transfers())  # the spills of the last step, then garbage
    store._media["CPU"].normal_()
    out, cached = _run(engine, "again", prompts[0])
    assert cached == 144 and out != recompute


def test_sim_engine_prices_a_load_by_block_bytes_over_bandwidth() -> None:
    preset = get_preset("llama3-8b-h100")
    cfg = EngineConfig(model="sim", num_blocks=40, host_kv_blocks=100, max_num_batched_tokens=8192)
    engine = build_sim_engine(cfg, preset, time_scale=1e9)
    prompts = _prompts(5, 3, 320)  # 20 blocks each; the pool holds 40
    for i, p in enumerate(prompts):
        _run(engine, f"r{i}", p)
    engine.add_request("again", prompts[0], GREEDY)
    out = engine.scheduler.schedule()
    (req, num_new, _), = out.scheduled
    assert req.num_computed_tokens == 304 and num_new == 16  # 19 blocks loaded, one computed
    pending = engine.kv.offload.num_pending_transfers
    engine.executor.execute(out)
    load = 19 * preset.tier_cost.block_bytes / preset.tier_cost.host_bytes_per_s
    assert engine.executor.last_duration == pytest.approx(preset.model.duration(features_of(out.scheduled)) + load)
    assert pending >= 19 and engine.kv.offload.totals.blocks["CPU_to_GPU"] == 19
    assert engine.kv.offload.totals.seconds["CPU_to_GPU"] == pytest.approx(load)


# --- a real replica process -------------------------------------------------------------------

def _complete(url: str, prompt: str) -> dict:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


@pytest.mark.slow
def test_replica_process_offloads_to_host_reports_cached_and_publishes_medium_cpu() -> None:
    proc = start(["replica", "--port", "0", "--model", "tiny", "--threads", "1", "--num-blocks", "40",
                  "--max-num-batched-tokens", "256", "--kv-offload-host-blocks", "128",
                  "--kv-events-endpoint", "tcp://127.0.0.1:0"])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(proc.events)
        time.sleep(0.3)  # the SUB's subscription reaches the PUB before the first event
        first = "The offloaded prefix. " * 20 + "tail one"  # BOS + 448 bytes: 28 full blocks of 16
        assert _complete(proc.url, first)["usage"].get("prompt_tokens_details") in (None, {"cached_tokens": 0})
        for i in range(2):  # push the first prompt out of the 40-block device pool
            _complete(proc.url, f"Unrelated filler {i}. " * 25)
        again = _complete(proc.url, first)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 28 * 16

        events = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sub.poll(200):
                frames = sub.recv_multipart()
                if frames[0] in (DEFAULT_LOAD_TOPIC, DEFAULT_DIGEST_TOPIC):  # kvfleet's extras beside the KV topic
                    continue
                _, _, payload = split_message(frames)
                events.extend(decode_batch(payload).events)
            elif events:
                break
        first_hashes = hash_blocks(ByteTokenizer().encode(first)[: 28 * 16], 16, root_hash("tiny"))
        stored_cpu = {h for e in events if isinstance(e, BlockStored) and e.medium == "CPU" for h in e.block_hashes}
        removed_gpu = {h for e in events if isinstance(e, BlockRemoved) and e.medium == "GPU" for h in e.block_hashes}
        assert set(first_hashes) <= stored_cpu and set(first_hashes) <= removed_gpu
        stored_gpu_again = [e for e in events if isinstance(e, BlockStored) and e.medium == "GPU"
                            and e.block_hashes[0] == first_hashes[0]]
        assert len(stored_gpu_again) == 2  # computed, then loaded back

        with urllib.request.urlopen(proc.url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert _metric(metrics, "kvfleet_replica_kv_offload_hits_total", medium="CPU") == 28 * 16
        assert _metric(metrics, "vllm:external_prefix_cache_hits_total") == 28 * 16
        assert _metric(metrics, "vllm:kv_offload_total_bytes_total", transfer_type="CPU_to_GPU") > 0
        with urllib.request.urlopen(proc.url + "/load", timeout=30) as r:
            (tier,) = json.loads(r.read())["tiers"]
        assert tier["medium"] == "CPU" and tier["capacity"] == 128 and tier["blocks"] >= 28
    finally:
        sub.close(0)
        ctx.term()
        proc.stop()
