"""Human sizes: 64M, 1.5G, 4096."""

import re
from decimal import Decimal

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` (binary suffixes K, M, G, T, P; KiB and KB mean the same)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use a number with K, M, G or T, e.g. 64M)")
    number, unit = match.groups()
    value = Decimal(number) * _UNITS[unit.upper()]
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Short and exact: 64M, 1.5G, 1025K, 513B (one decimal at most)."""
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale:
            if n % scale == 0:
                return f"{n // scale}{unit}"
            if (n * 10) % scale == 0:
                return f"{n * 10 // scale / 10:.1f}{unit}"
    return f"{n}B"
