"""The one C extension, protocol._hashchain (everything else is in pyproject.toml).

`optional=True`: where it cannot be compiled (no C compiler, no Python headers) setuptools warns
and the install still succeeds; protocol/hashing.py then uses its pure-Python loop
(`protocol.hashing.NATIVE` is False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "protocol._hashchain",
            sources=["protocol/_hashchain.c"],
            optional=True,
        )
    ]
)
