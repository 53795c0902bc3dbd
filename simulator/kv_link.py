"""The link a prefill replica hands a prompt's KV over to a decode replica on (issue #19 part 3).

    hand-over time = latency + tokens × kv_bytes_per_token / (bandwidth × lanes)

`lanes`: links used in parallel. A tensor-parallel replica's GPUs each hold 1/TP of every
token's KV and each has its own NVLink ports and NIC (DGX H100: one 400 Gb/s ConnectX-7 per
GPU), so a TP4 replica moves its KV over 4 links at once (as vLLM's NIXL connector and Mooncake's
transfer engine do, GPU to GPU). A link carries one hand-over at a time per direction: a prefill
replica's hand-overs queue on its egress, a decode replica's on its ingress.

Presets give the nominal unidirectional bandwidth per GPU; real transfers reach a fraction of it
(block-sized RDMA writes, descriptors), so `efficiency` (0.8 by default, an assumption, not a
measurement) scales it. Latency is the fixed cost of a hand-over (RDMA set-up, the notification
that the KV is in); also an assumption, of the order NIXL/UCX report for small messages plus
the control round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class KvLink:
    name: str
    bandwidth_Bps: float  # nominal, one direction, per GPU (bytes/s)
    latency_s: float  # fixed cost per hand-over
    source: str = ""
    efficiency: float = 0.8  # achieved / nominal bandwidth (assumed)

    def __post_init__(self) -> None:
        if not self.bandwidth_Bps > 0:
            raise ValueError("kv link bandwidth must be positive (bytes/s)")
        if not self.latency_s >= 0:
            raise ValueError("kv link latency must be >= 0 (seconds)")
        if not 0 < self.efficiency <= 1:
            raise ValueError("kv link efficiency must be in (0, 1]")

    def seconds_per_token(self, kv_bytes_per_token: int, lanes: int = 1) -> float:
        return kv_bytes_per_token / (self.bandwidth_Bps * self.efficiency * lanes)

    def transfer_s(self, tokens: int, kv_bytes_per_token: int, lanes: int = 1) -> float:
        return self.latency_s + tokens * self.seconds_per_token(kv_bytes_per_token, lanes)


KV_LINKS = MappingProxyType({
    # NVIDIA H100 SXM datasheet: NVLink 4, 900 GB/s per GPU, both directions together (18 links
    # × 50 GB/s) -> 450 GB/s each way. Prefill and decode GPUs in one HGX node.
    "nvlink4": KvLink("nvlink4", 450e9, 10e-6, "NVIDIA H100 SXM datasheet: NVLink 900 GB/s bidirectional"),
    # NVIDIA ConnectX-7 / DGX H100: one 400 Gb/s NDR InfiniBand port per GPU = 50 GB/s each way.
    "ib-ndr": KvLink("ib-ndr", 50e9, 50e-6, "DGX H100: 400 Gb/s NDR InfiniBand (ConnectX-7) per GPU"),
    # A cloud RoCE v2 fabric at 200 Gb/s per GPU (e.g. 8 × 200 GbE per 8-GPU node) = 25 GB/s.
    "roce-200g": KvLink("roce-200g", 25e9, 100e-6, "RoCE v2, 200 Gb/s Ethernet per GPU"),
    # Plain TCP over a 25 GbE host NIC shared by the node (no GPUDirect): 3.125 GB/s, ~1 ms set-up.
    "tcp-25g": KvLink("tcp-25g", 3.125e9, 1e-3, "25 GbE host NIC, TCP, staged through host memory"),
})


# KV bytes per token of each step-time preset's model (replica/step_model.py), and the GPUs
# (links) they are spread over: bf16 K and V, per layer, per KV head, per head dim.
PRESET_KV = MappingProxyType({
    "llama3-70b-h100": (80 * 8 * 128 * 2 * 2, 4),  # 320 KiB, TP4: 80 KiB per GPU
    "llama3-8b-h100": (32 * 8 * 128 * 2 * 2, 1),  # 128 KiB, one GPU
    "tiny-cpu": (4 * 4 * 32 * 2 * 4, 1),  # the tiny torch preset: 4 layers, 4 KV heads × 32, fp32
})


def get_link(name: str) -> KvLink:
    try:
        return KV_LINKS[name]
    except KeyError:
        raise ValueError(f"unknown kv link {name!r}; choose one of {', '.join(KV_LINKS)}") from None


def preset_kv(preset_name: str) -> tuple[int, int]:
    """(KV bytes per token, lanes) of a preset; ValueError for one without KV dimensions here."""
    try:
        return PRESET_KV[preset_name]
    except KeyError:
        raise ValueError(f"no KV size known for preset {preset_name!r} (known: {', '.join(PRESET_KV)}); "
                         f"give FleetConfig.kv_bytes_per_token") from None
