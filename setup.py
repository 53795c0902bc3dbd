"""The C extensions (everything else is in pyproject.toml): protocol._hashchain, the block-hash
chain, balancer._blocktable, the prefix index's hash table and longest-prefix walk,
balancer._rls, the step learner's least-squares update, and
kernels._cpu_decode, the CPU engine's paged decode attention.

`optional=True`: where they cannot be compiled (no C compiler, no Python headers) setuptools warns
and the install still succeeds; protocol/hashing.py then uses its pure-Python loop
(`protocol.hashing.NATIVE` is False) and balancer/prefix_index.py its dicts
(`balancer.prefix_index.NATIVE_TABLE` is False), balancer/step_learner.py its Python update
(`balancer.step_learner.NATIVE` is False) and the CPU engine its torch decode path
(`kernels.cpu_decode.NATIVE` is False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "protocol._hashchain",
            sources=["protocol/_hashchain.c"],
            # XXH3 from upstream xxHash's single header, vendored (protocol/vendor/LICENSE).
            include_dirs=["protocol/vendor"],
            depends=["protocol/vendor/xxhash.h"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "balancer._blocktable",
            sources=["balancer/_blocktable.c"],
            optional=True,
        ),
        Extension(
            "balancer._rls",
            sources=["balancer/_rls.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "kernels._cpu_decode",
            sources=["kernels/_cpu_decode.c"],
            # -O3 vectorises the per-head loops; `omp simd` lets it reorder the dot products'
            # sums (no OpenMP runtime is linked: -fopenmp-simd only reads the pragmas).
            extra_compile_args=["-O3", "-fopenmp-simd"],
            optional=True,
        ),
    ]
)
