"""balancer/memtrim.py: the periodic malloc_trim task and its setting."""

from __future__ import annotations

import asyncio
import platform

import pytest

from balancer.config import BalancerConfig
from balancer.memtrim import load_malloc_trim, trim_periodically


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_trim_is_found_and_callable_on_glibc():
    trim = load_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was released, 0: none could be


def test_trim_task_runs_until_cancelled():
    async def main():
        task = asyncio.create_task(trim_periodically(0.001))
        await asyncio.sleep(0.05)
        assert not task.done()  # still looping (or returned at once where there is no glibc)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    if load_malloc_trim() is None:
        pytest.skip("no malloc_trim here: the task returns at once")
    asyncio.run(main())


def test_memory_trim_setting_is_validated():
    assert BalancerConfig().memory_trim_s > 0
    BalancerConfig(memory_trim_s=0)  # disabled
    with pytest.raises(ValueError, match="memory_trim_s"):
        BalancerConfig(memory_trim_s=-1)
