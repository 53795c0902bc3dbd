"""The C extensions (everything else is in pyproject.toml): protocol._hashchain, the block-hash
chain, and balancer._blocktable, the prefix index's hash table and longest-prefix walk.

`optional=True`: where they cannot be compiled (no C compiler, no Python headers) setuptools warns
and the install still succeeds; protocol/hashing.py then uses its pure-Python loop
(`protocol.hashing.NATIVE` is False) and balancer/prefix_index.py its dicts
(`balancer.prefix_index.NATIVE_TABLE` is False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "protocol._hashchain",
            sources=["protocol/_hashchain.c"],
            optional=True,
        ),
        Extension(
            "balancer._blocktable",
            sources=["balancer/_blocktable.c"],
            optional=True,
        ),
    ]
)
