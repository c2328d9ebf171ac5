"""Sizes, rates and durations (`migrelay.units`): one table per function."""

from __future__ import annotations

import pytest

from migrelay.units import (
    GIB,
    KIB,
    MIB,
    format_bytes,
    format_duration,
    format_rate,
    parse_link_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("67108864", 64 * MIB),
        ("64M", 64 * MIB),
        ("64m", 64 * MIB),
        ("512MiB", 512 * MIB),
        ("1G", GIB),
        ("1GB", GIB),
        ("4K", 4 * KIB),
        ("2T", 2 << 40),
        (" 8M ", 8 * MIB),
    ],
)
def test_parse_size_reads_binary_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5G", "1X", "²", "1²M", "١٢M", "0x10"])
def test_parse_size_refuses_what_is_not_an_ascii_size(text: str) -> None:
    # "²" and Arabic-Indic digits pass str.isdigit() but are no size: a clear error,
    # never int()'s own ValueError text or a crash further on.
    with pytest.raises(ValueError, match=r"^not a size: "):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "bits_per_s"),
    [
        ("10gbit", 10_000_000_000),
        ("800mbit", 800_000_000),
        ("1gbps", 8_000_000_000),
        ("100kbit", 100_000),
        ("1.5gbit", 1_500_000_000),
    ],
)
def test_parse_link_rate_reads_tc_rates(text: str, bits_per_s: int) -> None:
    assert parse_link_rate(text) == bits_per_s


@pytest.mark.parametrize("text", ["", "10", "fast", "10 gigabit", "-1mbit"])
def test_parse_link_rate_refuses_what_tc_would(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not a rate: "):
        parse_link_rate(text)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (None, "?"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 * KIB, "1.5 MiB"),
        (64 * GIB, "64.0 GiB"),
        (3 << 40, "3.0 TiB"),
        (5000 << 40, "5000.0 TiB"),
        (3 * 1024**5, "3072.0 TiB"),
    ],
)
def test_format_bytes_uses_binary_units(count: int | None, text: str) -> None:
    assert format_bytes(count) == text


def test_format_rate_appends_per_second() -> None:
    assert format_rate(118.25 * MIB) == "118.2 MiB/s"
    assert format_rate(None) == "?"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "?"),
        (float("nan"), "?"),
        (float("inf"), "?"),
        (0.42, "0.42 s"),
        (0.4219, "0.42 s"),
        (12.4, "12 s"),
        (185, "3m05s"),
        (3720, "1h02m"),
    ],
)
def test_format_duration_reads_naturally(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text
