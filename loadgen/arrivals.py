"""Arrival processes: when each request of a workload arrives.

As `vllm bench serve` (vllm/benchmarks/serve.py, `get_request`): inter-arrival times are
gamma-distributed with shape `burstiness` and scale `1 / (rate * burstiness)`, so the mean is
`1 / rate`; burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular, inf
perfectly regular. As vLLM does, the cumulative times are then rescaled so the last request
arrives at exactly `n / rate` (it removes the 1-2 % run-to-run spread of the total).

Used by the synthetic workloads (synthetic.py), kvfleet's generated traces (generate.py) and the
ShareGPT reader, whose file has no timestamps (traces.py).
"""

from __future__ import annotations

import math

import numpy as np


def gamma_arrivals(n: int, rate: float, burstiness: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """n arrival times (s) with gamma inter-arrivals of mean 1/rate (vllm bench serve)."""
    if n <= 0:
        return np.zeros(0)
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = rng or np.random.default_rng(0)
    if math.isinf(burstiness):
        delays = np.full(n, 1.0 / rate)
    else:
        delays = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    t = np.cumsum(delays)
    return t * ((n / rate) / t[-1])
