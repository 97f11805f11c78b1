"""Human sizes: 64M, 1.5G, 4096."""

import re

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
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale and n % (scale // 1024 or 1) == 0:
            value = n / scale
            return f"{value:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}B"
