"""mirrorpool: a software storage array serving mirrored logical units over NBD."""

__version__ = "0.1.0"
