"""A request inside the engine: its tokens, sampling parameters and progress.

The scheduler speaks only in token counts; the runner reads `token_ids` and
`num_computed_tokens`; nothing here knows about tensors except the optional per-request
sampling generator, which the runner creates lazily.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from replica.lora import LoraTag


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(frozen=True)
class SamplingParams:
    """What the client asked for. Temperature below 1e-5 means greedy (as in vLLM)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per output token (0: the sampled token's alone)
    # The LoRA adapter to run with (None: the base model). vLLM passes a LoRARequest beside the
    # params; here it rides with them so that a request's n choices and the service's inbox
    # carry it unchanged.
    lora_name: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class Request:
    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "params",
        "arrival_time",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_handed_tokens",
        "num_preemptions",
        "first_token_time",
        "generator",
        "eos_token_id",
        "new_logprobs",
        "lora",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        eos_token_id: int | None = None,
        lora: LoraTag | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        # Prompt KV a prefill replica handed over (`Scheduler.add_prefilled`), past the local hit:
        # vLLM's num_external_computed_tokens. Reported as cached, as vLLM reports them.
        self.num_handed_tokens = 0
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        self.generator: Any = None  # per-request torch.Generator when params.seed is set
        self.eos_token_id = eos_token_id
        # The newest sampled token's (logprob, ((token id, logprob), ...) top alternatives), set by
        # the runner when params.logprobs is set and taken by the engine's output.
        self.new_logprobs: tuple[float, tuple[tuple[int, float], ...]] | None = None
        self.lora = lora  # its LoRA adapter (None: the base model)

    @property
    def lora_name(self) -> str | None:
        return None if self.lora is None else self.lora.name

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
