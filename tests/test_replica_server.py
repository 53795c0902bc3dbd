"""The replica as a real subprocess on loopback, driven by the official `openai` client and by
raw HTTP for malformed input."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import urllib.error
import urllib.request

import openai
import pytest

from harness import procs

pytestmark = pytest.mark.slow

REPLICA_ARGS = ["replica", "--port", "0", "--model", "tiny", "--num-blocks", "512", "--threads", "1",
                "--max-model-len", "2048"]


@pytest.fixture(scope="module")
def replica():
    proc = procs.start(REPLICA_ARGS)
    yield proc
    assert proc.stop() == 0


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return r.status == 200


def client(replica) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{replica.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_completions_and_chat(replica):
    c = client(replica)
    r = c.completions.create(model="tiny", prompt="Hello, world", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len("Hello, world".encode()) + 1  # + BOS
    assert r.usage.completion_tokens >= 1
    again = c.completions.create(model="tiny", prompt="Hello, world", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic

    chunks = list(c.completions.create(model="tiny", prompt="Hello, world", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_prompt_as_token_ids_and_cached_tokens(replica):
    c = client(replica)
    prompt = list(range(1, 200))
    first = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    second = c.completions.create(model="tiny", prompt=prompt + [7, 8, 9], max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == 199
    assert second.usage.prompt_tokens_details.cached_tokens >= 192


def test_a_non_streamed_answer_carries_its_usage_in_a_header_too(replica):
    """X-Kvfleet-Usage: the body's usage object, for an endpoint picker that reads it from the
    headers and asks its gateway for no body (balancer/picker/ext_proc.py)."""
    prompt = list(range(1, 100))
    for path, body in (("/v1/completions", {"prompt": prompt}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}]})):
        req = urllib.request.Request(f"{replica.url}{path}", data=json.dumps(
            {"model": "tiny", "max_tokens": 3, "temperature": 0, **body}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            header, answer = r.headers.get("X-Kvfleet-Usage"), json.loads(r.read())
        assert header is not None and json.loads(header) == answer["usage"]
        assert answer["usage"]["completion_tokens"] == 3


def test_twenty_concurrent_streams(replica):
    async def one(c, i):
        text = ""
        finish = None
        stream = await c.completions.create(model="tiny", prompt=f"request {i}: ", max_tokens=16, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        async for ch in stream:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        return finish

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{replica.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(c, i) for i in range(20)))

    assert asyncio.run(main()) == ["length"] * 20
    assert healthy(replica.url)


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"\xff\xfe\x00", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": 42}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "ten"}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "temperature": 9}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x" * 3000}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 5000}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": [1, 2, 99999]}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": 5}]}).encode(), 400),
    ],
)
def test_bad_input_gets_4xx_error_body(replica, path, body, status):
    code, err = post(replica.url + path, body)
    assert code == status
    assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["message"]
    assert healthy(replica.url)


def test_openai_client_sees_errors(replica):
    c = client(replica)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", max_tokens=-3)


def test_auxiliary_routes(replica):
    code, tok = post(f"{replica.url}/tokenize", json.dumps({"model": "tiny", "prompt": "abc"}).encode())
    assert code == 200 and tok["count"] == 4 and tok["max_model_len"] == 2048
    with urllib.request.urlopen(f"{replica.url}/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    with urllib.request.urlopen(f"{replica.url}/load") as r:
        load = json.loads(r.read())
        assert load["total_blocks"] == 512 and load["block_size"] == 16
    with urllib.request.urlopen(f"{replica.url}/metrics") as r:
        text = r.read().decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_bucket"):
        assert name in text


def test_sigterm_during_stream_lets_it_finish():
    proc = procs.start(REPLICA_ARGS)
    body = json.dumps({"model": "tiny", "prompt": "drain me", "max_tokens": 200, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{proc.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    lines = []
    first = threading.Event()

    def reader():
        with urllib.request.urlopen(req, timeout=120) as r:
            for raw in r:
                if raw.strip():
                    lines.append(raw.decode().strip())
                    first.set()

    t = threading.Thread(target=reader)
    t.start()
    assert first.wait(60)
    proc.popen.send_signal(signal.SIGTERM)
    t.join(120)
    assert proc.popen.wait(60) == 0
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------- one config, one start function


def _flags_to_config(argv: list[str]):
    from kvfleet.cli import build_parser
    from kvfleet.cmd_replica import replica_config

    return replica_config(build_parser().parse_args(["replica", *argv]))


def test_the_flags_make_one_frozen_replica_config():
    import dataclasses

    from replica.config import ReplicaConfig
    from replica.step_model import get_preset

    cfg = _flags_to_config(["--engine", "sim", "--preset", "tiny-cpu", "--port", "0", "--api-key", "k1",
                            "--api-key", "k2", "--drain-timeout", "2", "--step-log", "7", "--time-scale", "4"])
    assert isinstance(cfg, ReplicaConfig) and cfg.kind == "sim"
    preset = get_preset("tiny-cpu")
    assert cfg.sim_preset == preset and cfg.time_scale == 4 and cfg.step_log == 7
    # a sim replica's batch limits default to its preset's
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens) == (preset.max_num_seqs,
                                                                           preset.max_num_batched_tokens)
    assert (cfg.server.port, cfg.server.api_keys, cfg.server.drain_timeout_s) == (0, ("k1", "k2"), 2.0)
    assert cfg.publisher is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.step_log = 1
    torch_cfg = _flags_to_config(["--kv-events-endpoint", "tcp://127.0.0.1:0"])
    assert torch_cfg.kind == "torch" and torch_cfg.sim_preset is None
    assert torch_cfg.publisher.endpoint == "tcp://127.0.0.1:0" and torch_cfg.publisher.bind


def test_engine_flags_give_back_the_engine_config():
    from kvfleet.cmd_replica import engine_flags
    from replica.config import EngineConfig
    from replica.lora import parse_lora_modules

    for engine in (EngineConfig(),
                   EngineConfig(model="small", served_model_name="m", weights="w.safetensors",
                                model_config_path="config.json", tokenizer="tokenizer.json", seed=3, block_size=32,
                                num_blocks=99, kv_cache_memory_bytes=1 << 20, enable_prefix_caching=False,
                                max_num_seqs=5, max_num_batched_tokens=256, max_model_len=1024, device="cuda",
                                threads=2, lora_modules=parse_lora_modules(["a=/x/a.safetensors", "b=b.st"], "m"),
                                max_loras=2, lora_load_s=0.5)):
        assert _flags_to_config(engine_flags(engine)).engine == engine


@pytest.mark.parametrize("argv, says", [
    (["--step-log", "-1"], "--step-log"),
    (["--engine", "sim", "--time-scale", "0"], "time_scale must be positive"),
    (["--port", "70000"], "port must be in [0, 65535]"),
    (["--engine", "sim", "--preset-file", "/nonexistent.json"], "kvfleet calibrate --out"),
])
def test_a_bad_flag_is_refused_before_anything_starts(capsys, argv, says):
    from kvfleet.cli import main as cli_main

    assert cli_main(["replica", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvfleet replica: ") and says in err


def test_run_replica_serves_in_process_until_stopped(capsys):
    """The start function the CLI calls, in this process: listens, prints the ready line,
    serves, and drains and returns 0 when told to stop."""
    from aiohttp import ClientSession

    from replica.app import run_replica

    cfg = _flags_to_config(["--engine", "sim", "--preset", "tiny-cpu", "--time-scale", "100", "--port", "0",
                            "--served-model-name", "mini", "--max-model-len", "300", "--num-blocks", "64",
                            "--api-key", "secret"])

    async def main():
        stop, listening = asyncio.Event(), asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_replica(cfg, stop=stop, ready=listening.set_result))
        urls = await asyncio.wait_for(listening, 30)
        auth = {"Authorization": "Bearer secret"}
        async with ClientSession() as http:
            async with http.get(f"{urls[0]}/v1/models", headers=auth) as r:
                models = (await r.json())["data"]
            async with http.post(f"{urls[0]}/v1/completions", headers=auth,
                                 json={"model": "mini", "prompt": "hello", "max_tokens": 4}) as r:
                completion = await r.json()
            async with http.post(f"{urls[0]}/v1/completions", json={"model": "mini", "prompt": "x"}) as r:
                unauthorized = r.status
        stop.set()
        return urls, models, completion, unauthorized, await asyncio.wait_for(task, 30)

    urls, models, completion, unauthorized, status = asyncio.run(main())
    assert status == 0
    assert [(m["id"], m["max_model_len"]) for m in models] == [("mini", 300)]
    assert completion["model"] == "mini" and completion["usage"]["completion_tokens"] == 4
    assert unauthorized == 401
    ready = capsys.readouterr().out
    assert f"kvfleet replica ready: engine=sim model=mini blocks=64 block_size=16 listening on {urls[0]}" in ready


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples in the replica's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_n_samples_share_one_prefill_and_seeds_spread_as_vllm(replica):
    c = client(replica)
    prompt = "A long shared prompt that several samples continue. " * 6  # 313 tokens: 19 full blocks
    hits = metric(replica.url, "vllm:prefix_cache_hits_total")
    r = c.completions.create(model="tiny", prompt=prompt, n=4, max_tokens=6, temperature=1.0, seed=11,
                             extra_body={"ignore_eos": True})
    full = (r.usage.prompt_tokens // 16) * 16
    # The prompt was computed once: samples 1-3 found its full blocks in the prefix cache.
    assert metric(replica.url, "vllm:prefix_cache_hits_total") - hits >= 3 * full
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(prompt.encode()) + 1  # counted once, as vLLM does
    assert r.usage.completion_tokens == 4 * 6
    texts = [ch.text for ch in r.choices]
    assert len(set(texts)) > 1  # seed + j per sample (vLLM's ParentRequest): they differ
    again = c.completions.create(model="tiny", prompt=prompt, n=4, max_tokens=6, temperature=1.0, seed=11,
                                 extra_body={"ignore_eos": True})
    assert [ch.text for ch in again.choices] == texts  # and each is reproducible
    one = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=12,
                               extra_body={"ignore_eos": True})
    assert one.choices[0].text == texts[1]  # sample 1 is the request with seed + 1


def test_batched_prompts_and_echo(replica):
    c = client(replica)
    r = c.completions.create(model="tiny", prompt=["Hello there", [5, 6, 7, 8]], n=2, max_tokens=4, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    alone = [c.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in ("Hello there", [5, 6, 7, 8])]
    assert [ch.text for ch in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.prompt_tokens == len(b"Hello there") + 1 + 4
    echoed = c.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello there" + alone[0]
    chunks = list(c.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=3, temperature=0, stream=True,
                                       echo=True))
    by_index = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] += choice.text
    assert by_index[0].startswith("ab") and by_index[1].startswith("cd")


def test_logprobs_in_the_completions_and_chat_shapes(replica):
    c = client(replica)
    r = c.completions.create(model="tiny", prompt="Logprobs please", max_tokens=5, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Keyed by text, so two tokens that read the same (bytes no character yet) share a key.
        assert value <= 0 and 1 <= len(top) <= 4 and top[token] >= value
        assert value == max(top.values())  # greedy took the most likely token
    assert lp.text_offset == sorted(lp.text_offset)
    msgs = [{"role": "user", "content": "Hi"}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                     top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert [t.logprob for t in content] == [t.top_logprobs[0].logprob for t in content]
    streamed = [t for ch in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                                      logprobs=True, stream=True, extra_body={"ignore_eos": True})
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    code, err = post(replica.url + "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": msgs, "top_logprobs": 2}).encode())
    assert code == 400 and err["error"]["param"] == "top_logprobs"


def test_what_the_replica_cannot_do_is_refused_clearly(replica):
    for body, param in (({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
                        ({"prompt": "x", "best_of": 3}, "best_of"),
                        ({"prompt": "x", "logprobs": 21}, "logprobs"),
                        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
                        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
                        ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
                        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools")):
        code, err = post(replica.url + "/v1/completions", json.dumps({"model": "tiny", **body}).encode())
        assert code == 400 and err["error"]["param"] == param, (body, err)


def test_a_load_report_counts_the_prompts_still_in_the_inbox_as_queued_prefill():
    """Requests that arrived during a step wait in the engine loop's inbox until it ends; the
    report made then counts them as waiting and their prompts as queued prefill tokens, so a
    balancer that sent them before the report (and so stops counting them itself) still sees
    their work (issue #15: a short prompt was routed behind a long one nobody counted)."""
    from replica.config import EngineConfig
    from replica.engine import build_engine
    from replica.metrics import ReplicaMetrics
    from replica.request import SamplingParams
    from replica.service import EngineService

    engine = build_engine(EngineConfig(model="tiny", num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32,
                                       threads=1))

    async def main():
        service = EngineService(engine, ReplicaMetrics("tiny"))  # its loop not started: the inbox holds it
        stream = service.generate("r1", list(range(1, 41)), SamplingParams(max_tokens=2))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the generator has queued its request
        load = service.load()
        first.cancel()
        return load

    load = asyncio.run(main())
    assert load.num_waiting == 1
    assert load.queued_prefill_tokens == 40
