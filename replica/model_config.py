"""The shape of a Llama-style model: a frozen config, named presets, and HF config.json reading.

Torch-free, so that the simulator and capacity planning can size KV caches without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

DTYPE_BYTES = MappingProxyType({"float32": 4, "bfloat16": 2, "float16": 2})


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (HF `rope_type: "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"need 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor}, {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("original_max_position_embeddings must be positive")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: derived as hidden_size // num_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    rope_scaling: RopeScaling | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim}")
        if self.max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings must be positive, got {self.max_position_embeddings}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, i = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        layer = attn + 3 * d * i + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with some fields replaced (e.g. dtype="bfloat16")."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """Read a HF transformers config.json (a file, or a directory holding one).

        Raises ValueError for features this model does not implement (biases, sliding window,
        activations other than SiLU, RoPE scaling other than "llama3").
        """
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        with open(p, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected a JSON object")
        return cls.from_hf_dict(raw, source=str(p))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        def need(key: str) -> Any:
            if key not in raw:
                raise ValueError(f"{source}: missing {key!r}")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported")
        if raw.get("sliding_window") is not None and raw.get("use_sliding_window", True):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        # Newer transformers versions move rope_theta / rope_scaling into `rope_parameters`.
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        num_heads = int(need("num_attention_heads"))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            intermediate_size=int(need("intermediate_size")),
            head_dim=int(raw.get("head_dim") or 0),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=str(dtype),
            rope_scaling=scaling,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A HF LlamaConfig-shaped dict (what a benchmark writes next to saved weights)."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **{f.name: getattr(self.rope_scaling, f.name) for f in fields(RopeScaling)}}
        return out


PRESETS: MappingProxyType[str, ModelConfig] = MappingProxyType(
    {
        # The CI / demo model: byte-level vocabulary (protocol.tokenizer.ByteTokenizer).
        "tiny": ModelConfig(
            vocab_size=512,
            hidden_size=256,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            head_dim=32,
            intermediate_size=768,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            dtype="float32",
        ),
        # About 104M parameters, byte-level vocabulary: big enough for step times to depend
        # on batch shape the way a real model's do, small enough for one CPU core.
        "small": ModelConfig(
            vocab_size=512,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            num_kv_heads=4,
            head_dim=64,
            intermediate_size=3072,
            max_position_embeddings=8192,
            rope_theta=10000.0,
            dtype="float32",
        ),
        # The shape of Meta-Llama-3-8B (its config.json on the HF hub), for GPU runs with
        # random or loaded weights.
        "llama3-8b": ModelConfig(
            vocab_size=128256,
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=14336,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ),
    }
)

