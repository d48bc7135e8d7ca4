"""Human units exactly as etcd's tools print them (go-humanize)."""
from __future__ import annotations

import math

_SIZES = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def humanize_bytes(n: int) -> str:
    """go-humanize's Bytes(): SI units, one decimal below 10 ("2.1 MB", "20 kB")."""
    if n < 10:
        return f"{n} B"
    e = math.floor(math.log(n) / math.log(1000))
    e = min(e, len(_SIZES) - 1)
    val = math.floor(n / 1000 ** e * 10 + 0.5) / 10
    return f"{val:.0f} {_SIZES[e]}" if val >= 10 else f"{val:.1f} {_SIZES[e]}"


def humanize_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes} min {s} s"
