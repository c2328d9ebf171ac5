"""Sizes, rates and durations: parsed from flags, formatted for people.

One module for every layer (the CLI's ``--max-bandwidth 500M``, the relays' log lines,
the progress bar, the bench's tables), so that ``1.5 MiB`` means the same everywhere.
Binary units throughout, as QEMU reports them; link rates (``tc``) are the exception and
are bits per second, as ``tc`` writes them.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = [
    "GIB",
    "KIB",
    "MIB",
    "format_bytes",
    "format_duration",
    "format_rate",
    "parse_link_rate",
    "parse_size",
]

KIB: Final = 1 << 10
MIB: Final = 1 << 20
GIB: Final = 1 << 30

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")
_SIZE_SUFFIXES: Final = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a size such as ``64M``, ``1G``, ``512MiB`` or ``67108864`` into bytes.

    Args:
        text: a number with an optional binary suffix (K, M, G, T; ``iB``/``B`` optional).

    Returns:
        The size in bytes.

    Raises:
        ValueError: the text is not a size.
    """
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    number = value[: len(value) - len(suffix)]
    # isascii: str.isdigit() accepts "²", which int() refuses.
    if not (number.isascii() and number.isdigit()):
        raise ValueError(f"not a size: {text!r} (expected e.g. 64M, 1G or a byte count)")
    return int(number) * _SIZE_SUFFIXES[suffix]


def parse_link_rate(text: str) -> int:
    """Parse a ``tc`` rate such as ``10gbit``, ``800mbit`` or ``1gbps`` into bits per second.

    Raises:
        ValueError: the text is not a rate.
    """
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)", text.strip().lower())
    if not match:
        raise ValueError(f"not a rate: {text!r} (examples: 10gbit, 800mbit, 1gbps)")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
    return int(value * (8 if match.group(3) == "bps" else 1))


def format_bytes(count: float | None) -> str:
    """Format a byte count with a binary unit: ``512 B``, ``1.5 MiB``, ``64.0 GiB``."""
    if count is None:
        return "?"
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(bytes_per_s: float | None) -> str:
    """Format a rate in bytes per second: ``118.2 MiB/s``."""
    if bytes_per_s is None:
        return "?"
    return f"{format_bytes(bytes_per_s)}/s"


def format_duration(seconds: float | None) -> str:
    """Format a duration for people: ``0.42 s``, ``12 s``, ``3m05s``, ``1h02m``."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.2f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
