"""The simulated fleet's KV offload tiers: how much each replica holds below its device pool,
and how fast it loads from there.

Capacities are FleetConfig's `host_kv_blocks` / `disk_kv_blocks` (0: no such tier), the same
tiers a live replica gets from `--kv-offload-host-blocks` / `--kv-offload-disk-blocks`
(replica/kv_offload.py). The transfer cost is the preset's own `SimPreset.tier_cost` (PCIe
Gen5 to host memory, a local NVMe SSD below it: replica/step_model.py gives the sources), or,
with `host_link`, one of the host links below instead of PCIe Gen5, per GPU of the preset:

| link        | per direction | source |
|-------------|---------------|--------|
| pcie4       | 32 GB/s × 0.8 | PCIe Gen4 x16, 16 GT/s × 16 lanes; NVIDIA A100 datasheet "PCIe Gen4: 64 GB/s" (both directions) |
| pcie5       | 64 GB/s × 0.8 | PCIe Gen5 x16, 32 GT/s × 16 lanes; NVIDIA H100 datasheet "PCIe Gen5: 128 GB/s" (both directions) |
| nvlink-c2c  | 450 GB/s × 0.8 | GH200 Grace Hopper: NVLink-C2C between Grace's LPDDR5X and the H100, 900 GB/s both directions (NVIDIA GH200 datasheet) |

× 0.8: achievable with pinned host memory, the derating replica/step_model.py applies to PCIe.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from replica.engine import sim_tier_cost
from replica.kv_offload import TierSpec, tier_specs
from replica.step_model import SimPreset, TierCost

HOST_LINKS = MappingProxyType({
    "pcie4": 32e9 * 0.8,
    "pcie5": 64e9 * 0.8,
    "nvlink-c2c": 450e9 * 0.8,
})


def fleet_tiers(host_kv_blocks: int, disk_kv_blocks: int) -> tuple[TierSpec, ...]:
    """The tiers below each replica's device pool (ValueError on a bad combination)."""
    return tier_specs(host_kv_blocks, disk_kv_blocks)


def fleet_tier_cost(preset: SimPreset, block_size: int, host_link: str = "") -> TierCost:
    """The preset's transfer costs for blocks of `block_size` tokens, with the host link
    replaced by `host_link` (one of HOST_LINKS, per GPU: a preset whose host bandwidth is k ×
    PCIe Gen5, e.g. TP4, gets k × the link); "" keeps the preset's."""
    cost = sim_tier_cost(preset, block_size)
    if not host_link:
        return cost
    try:
        link = HOST_LINKS[host_link]
    except KeyError:
        raise ValueError(f"unknown host link {host_link!r}; choose one of {sorted(HOST_LINKS)}") from None
    gpus = max(1, round(cost.host_bytes_per_s / HOST_LINKS["pcie5"])) if cost.host_bytes_per_s else 1
    return dataclasses.replace(cost, host_bytes_per_s=gpus * link)
