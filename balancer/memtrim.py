"""Give freed heap memory back to the operating system after bursts of concurrency.

A burst of concurrent requests allocates per-connection buffers and per-request objects; when it
is over they are freed, but glibc's malloc keeps the freed pages inside its heap (only the top of
the heap is returned on its own), so the process's RSS ratchets up with every burst. That looks
like a leak to anyone watching RSS and is memory no other process can use. `malloc_trim(0)`
returns every whole free page to the kernel (glibc >= 2.8 also releases pages in the middle of the
heap, with madvise). It walks the heap, well under a millisecond at the balancer's size, so the
balancer calls it every `BalancerConfig.memory_trim_s` seconds.

Elsewhere than glibc (musl, macOS) there is no malloc_trim: `load_malloc_trim` returns None and
nothing runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("kvfleet.balancer")


def load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `int malloc_trim(size_t pad)`, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


async def trim_periodically(interval_s: float) -> None:
    """Call malloc_trim(0) every `interval_s` seconds until cancelled (no-op without glibc)."""
    trim = load_malloc_trim()
    if trim is None:
        log.info("malloc_trim is not available (not glibc): freed heap memory stays with the process")
        return
    while True:
        await asyncio.sleep(interval_s)
        trim(0)
