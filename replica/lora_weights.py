"""LoRA adapter weights (torch): one safetensors file, and their use in the forward pass.

An adapter adds a low-rank update to some of the base model's projections (Hu et al. 2021,
"LoRA"; the scale alpha / r is PEFT's `lora_alpha / r`):

    W' = W + (alpha / r) · B · A        A: [r, in], B: [out, r]
    y  = x W'ᵀ = x Wᵀ + (alpha / r) · (x Aᵀ) Bᵀ      (computed as the right side: W is shared)

The file uses PEFT's tensor names, `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.
lora_A.weight` / `lora_B.weight` (`mlp.{gate,up,down}_proj` for the MLP), and carries `r` and
`lora_alpha` in its safetensors metadata (PEFT keeps them in adapter_config.json beside the
file; one file is simpler to pass as `--lora-modules name=path`). Projections an adapter does
not name are left as they are.

`LoraBatch` applies the adapters of one step's flat batch: each token row runs under its
request's adapter (or none); per adapter, its rows are gathered, updated and written back, so
a batch may mix adapters and the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from replica.model_config import ModelConfig

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN_PROJECTIONS + MLP_PROJECTIONS


def tensor_name(layer: int, proj: str, which: str) -> str:
    """PEFT's name for a layer's lora_A / lora_B of one projection."""
    block = "self_attn" if proj in ATTN_PROJECTIONS else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{which}.weight"


def projection_shape(config: ModelConfig, proj: str) -> tuple[int, int]:
    """(out features, in features) of a projection of the base model."""
    d, i = config.hidden_size, config.intermediate_size
    return {"q_proj": (config.q_size, d), "k_proj": (config.kv_size, d), "v_proj": (config.kv_size, d),
            "o_proj": (d, config.q_size), "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}[proj]


@dataclass(frozen=True)
class LoraWeights:
    name: str
    rank: int
    alpha: float
    # per layer: projection -> (A [r, in], B [out, r])
    layers: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def save_lora(path: str | Path, config: ModelConfig, rank: int, alpha: float,
              projections: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0, std: float = 0.05) -> None:
    """Write a random adapter for `config` (tests and demos make theirs with it). B is not zero
    (PEFT initialises it to zero, which would make a fresh adapter a no-op)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj in projections:
            out_f, in_f = projection_shape(config, proj)
            tensors[tensor_name(layer, proj, "A")] = torch.randn(rank, in_f, generator=g) * std
            tensors[tensor_name(layer, proj, "B")] = torch.randn(out_f, rank, generator=g) * std
    save_file(tensors, str(path), metadata={"r": str(rank), "lora_alpha": str(alpha)})


def load_lora(name: str, path: str | Path, config: ModelConfig, dtype: torch.dtype,
              device: str | torch.device = "cpu") -> LoraWeights:
    """Read an adapter file for `config`; ValueError naming what does not fit."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"LoRA adapter {name!r}: no file at {p}; give --lora-modules {name}=PATH.safetensors")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        try:
            rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
        except (KeyError, ValueError):
            raise ValueError(f"LoRA adapter {name!r} ({p}): its metadata must give `r` and `lora_alpha`") from None
        if rank < 1:
            raise ValueError(f"LoRA adapter {name!r}: rank r must be >= 1, got {rank}")
        keys = set(f.keys())
        layers = []
        for layer in range(config.num_layers):
            mods = {}
            for proj in PROJECTIONS:
                a_key, b_key = tensor_name(layer, proj, "A"), tensor_name(layer, proj, "B")
                if a_key not in keys and b_key not in keys:
                    continue
                if a_key not in keys or b_key not in keys:
                    raise ValueError(f"LoRA adapter {name!r}: layer {layer} {proj} has only one of lora_A / lora_B")
                a, b = f.get_tensor(a_key), f.get_tensor(b_key)
                out_f, in_f = projection_shape(config, proj)
                if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
                    raise ValueError(f"LoRA adapter {name!r}: layer {layer} {proj} is A{tuple(a.shape)} B{tuple(b.shape)}, "
                                     f"the model needs A({rank}, {in_f}) B({out_f}, {rank}): was it made for this model?")
                mods[proj] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
            layers.append(mods)
        unused = keys - {tensor_name(i, pr, w) for i in range(config.num_layers) for pr in PROJECTIONS for w in "AB"}
        if unused:
            raise ValueError(f"LoRA adapter {name!r}: tensors this model has no place for, e.g. {sorted(unused)[0]}")
    return LoraWeights(name, rank, alpha, tuple(layers))


class LoraBatch:
    """The adapters of one flat batch: `token_adapter[t]` indexes `adapters` (-1: the base model)."""

    __slots__ = ("adapters", "token_adapter", "groups")

    def __init__(self, adapters: Sequence[LoraWeights], token_adapter: torch.Tensor) -> None:
        # token_adapter: [T] int64
        self.adapters = adapters
        self.token_adapter = token_adapter
        self.groups = []  # (adapter, row indices [n]) for each adapter with rows here
        for g, a in enumerate(adapters):
            rows = (token_adapter == g).nonzero().squeeze(1)
            if rows.numel():
                self.groups.append((a, rows))

    def select(self, rows: torch.Tensor) -> "LoraBatch":
        """The same batch restricted to `rows` (the last layer's sampled rows)."""
        return LoraBatch(self.adapters, self.token_adapter[rows])

    def add(self, layer: int, proj: str, x: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
        """out[:, start:end] += scale · (x Aᵀ) Bᵀ for each adapter's rows; x: [T, in], out: [T, *]."""
        for a, rows in self.groups:
            ab = a.layers[layer].get(proj)
            if ab is not None:
                lo_a, lo_b = ab
                out[rows, start:end] += ((x[rows] @ lo_a.T) @ lo_b.T) * a.scale
