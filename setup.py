"""Build glue for the one C extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: without a C compiler the same copies run in Python, slower
        Extension("mirrorpool.store._chunkcopy", ["src/mirrorpool/store/_chunkcopy.c"],
                  optional=True),
    ],
)
