"""Paged attention: a torch reference that runs everywhere, and a Triton decode kernel for CUDA."""

from kernels.paged_attention import AttentionMetadata, attention, paged_attention, write_kv
from kernels.triton_paged_attention import paged_decode_attention, triton_available

__all__ = [
    "AttentionMetadata",
    "attention",
    "paged_attention",
    "paged_decode_attention",
    "triton_available",
    "write_kv",
]
