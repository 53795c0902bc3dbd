"""kvfleet's own traces: scaled multi-tenant agentic workloads, written as Mooncake JSONL.

The structure is what KV-aware routing is about: every tenant has its own system prompt that all
of its sessions share; a session is several user turns; within a turn an agent loop makes
repeated tool-call requests, each extending the same context by the last tool call and the tool's
result, before the final answer. Hash ids have Mooncake's meaning (one id per 512-token block,
equal id = equal content), so any Mooncake reader can replay the file; kvfleet's reader also
picks up the extra `session_id`, `turn` and `tenant` keys. Deterministic for a given seed.

`kind="chat"` is the same without tool calls (plain multi-turn chat). `kind="hot"` is one hot
shared prompt: single-turn requests, a share `hot_share` of them on tenant 0's system prompt and
the rest spread over the other tenants, each with its own user text — the shape that invites
hot-spotting (every cache-aware policy wants the replica holding the hot prompt); use
`burstiness` < 1 for bursts.

Default sizes follow the orders of magnitude of public agentic/coding traces (tens of thousands
of context tokens, short tool-call outputs); shrink them for a tiny model with
`--scale-input` at replay time (e.g. 1/32 turns a 512-token block into 16 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadgen.arrivals import gamma_arrivals
from loadgen.synthetic import BlockIds, LengthDist, zipf_weights
from loadgen.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, write_mooncake

KINDS = ("agentic", "chat", "hot")
BUNDLED = Path(__file__).resolve().parent / "data" / "agentic_small.jsonl"


@dataclass(frozen=True)
class GenerateConfig:
    kind: str = "agentic"
    num_requests: int = 300
    session_rate: float = 0.5  # new sessions per second (Poisson unless burstiness != 1)
    burstiness: float = 1.0
    tenants: int = 4
    tenant_zipf_s: float = 1.0  # tenant k gets sessions with weight 1/(k+1)**s
    system_prompt_tokens: LengthDist = field(default_factory=lambda: LengthDist("uniform", 2048, 8192))
    turns: LengthDist = field(default_factory=lambda: LengthDist("uniform", 1, 4))
    user_tokens: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 600, 400))
    tool_steps: LengthDist = field(default_factory=lambda: LengthDist("uniform", 0, 5, minimum=0))
    tool_call_tokens: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 80, 40))
    tool_result_tokens: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 1500, 1000))
    answer_tokens: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 300, 200))
    tool_time_s: float = 1.0  # mean tool execution time between agent steps (exponential)
    think_time_s: float = 10.0  # mean user think time between turns (exponential)
    decode_s_per_token: float = 0.02  # the generation time assumed before the next request of a session
    max_context_tokens: int = 128 * 1024  # a session ends once its context would pass this
    hot_share: float = 0.9  # kind "hot": the share of requests on tenant 0's prompt
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if not self.session_rate > 0:
            raise ValueError(f"session_rate must be positive, got {self.session_rate}")
        if self.tenants < 1:
            raise ValueError(f"tenants must be at least 1, got {self.tenants}")
        if min(self.tool_time_s, self.think_time_s, self.decode_s_per_token) < 0:
            raise ValueError("tool_time_s, think_time_s and decode_s_per_token must not be negative")
        if self.kind == "hot" and not (0 <= self.hot_share <= 1 and (self.tenants > 1 or self.hot_share == 1)):
            raise ValueError("hot_share must be in [0, 1], and below 1 only with at least 2 tenants")
        if self.block_tokens < 1 or self.max_context_tokens < self.block_tokens:
            raise ValueError("block_tokens must be positive and max_context_tokens at least one block")


def generate(cfg: GenerateConfig) -> list[TraceRequest]:
    """The workload as TraceRequests sorted by arrival (exactly cfg.num_requests of them)."""
    rng = np.random.default_rng(cfg.seed)
    bt = cfg.block_tokens
    ids = BlockIds()
    sys_len = [int(x) for x in cfg.system_prompt_tokens.sample(rng, cfg.tenants)]
    sys_ids = [ids.fresh(math.ceil(n / bt)) for n in sys_len]
    weights = zipf_weights(cfg.tenants, cfg.tenant_zipf_s)
    agentic = cfg.kind == "agentic"
    out: list[TraceRequest] = []
    # enough session starts for the requests; more are drawn if sessions end up short
    starts = list(gamma_arrivals(cfg.num_requests, cfg.session_rate, cfg.burstiness, rng))
    s = 0
    while len(out) < cfg.num_requests:
        if s == len(starts):
            starts += list(starts[-1] + gamma_arrivals(cfg.num_requests, cfg.session_rate, cfg.burstiness, rng))
        hot = cfg.kind == "hot"
        if hot:
            tenant = 0 if rng.random() < cfg.hot_share else int(rng.integers(1, cfg.tenants))
        else:
            tenant = int(rng.choice(cfg.tenants, p=weights))
        hids, length, t = sys_ids[tenant], sys_len[tenant], float(starts[s])
        pending = 0  # tokens appended since the last request (answer, tool call, tool result)
        for turn in range(1 if hot else int(cfg.turns.sample(rng, 1)[0])):
            new = pending + int(cfg.user_tokens.sample(rng, 1)[0])
            steps = int(cfg.tool_steps.sample(rng, 1)[0]) if agentic else 0
            for step in range(steps + 1):
                if len(out) == cfg.num_requests or length + new > cfg.max_context_tokens:
                    break
                final = step == steps
                n_out = int((cfg.answer_tokens if final else cfg.tool_call_tokens).sample(rng, 1)[0])
                hids = ids.extend(hids, length, new, bt)
                length += new
                out.append(TraceRequest(arrival_s=t, input_length=length, output_length=n_out, hash_ids=hids,
                                        hash_block_tokens=bt, session_id=f"t{tenant}-s{s}", turn=turn,
                                        tenant=f"tenant{tenant}"))
                t += n_out * cfg.decode_s_per_token
                if final:
                    pending = n_out
                    t += float(rng.exponential(cfg.think_time_s)) if cfg.think_time_s else 0.0
                else:
                    new = n_out + int(cfg.tool_result_tokens.sample(rng, 1)[0])
                    t += float(rng.exponential(cfg.tool_time_s)) if cfg.tool_time_s else 0.0
        s += 1
    out.sort(key=lambda r: r.arrival_s)
    return out


def generate_file(path: str | Path, cfg: GenerateConfig) -> int:
    """Generate and write a Mooncake JSONL trace; returns the number of requests written."""
    return write_mooncake(path, generate(cfg))
