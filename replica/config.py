"""Engine configuration: frozen, validated, derived into CLI flags by kvfleet/cli.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a preset name from replica.model_config.PRESETS
    served_model_name: str | None = None  # the name clients use; defaults to `model`
    weights: str | None = None  # local safetensors file (Llama tensor naming); None = seeded init
    model_config_path: str | None = None  # HF config.json to go with `weights`
    tokenizer: str | None = None  # None/"byte" = built-in byte tokenizer, else a tokenizer.json path
    seed: int = 0  # weight init and default sampling seed
    block_size: int = 16
    num_blocks: int | None = None  # KV blocks; None = from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 64 * 1024 * 1024
    enable_prefix_caching: bool = True
    cache_salt: str | None = None  # separates caches (and hashes) of otherwise equal models
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be at least 2")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
