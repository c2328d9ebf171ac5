"""`migrelay.aio.ratelimit`: the refusal-log token bucket and one-line-safe text."""

from __future__ import annotations

import pytest

from migrelay.aio.ratelimit import LogLimiter, clip


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def allowed(limiter: LogLimiter, count: int) -> int:
    return sum(limiter.allow() for _ in range(count))


def test_burst_then_suppressed() -> None:
    clock = FakeClock()
    limiter = LogLimiter(rate_per_s=10, burst=20, clock=clock)
    assert allowed(limiter, 20) == 20
    assert not limiter.allow()
    assert allowed(limiter, 99) == 0
    assert limiter.suppressed == 100
    assert limiter.take_suppressed() == 100
    assert limiter.take_suppressed() == 0


def test_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = LogLimiter(rate_per_s=10, burst=20, clock=clock)
    allowed(limiter, 25)
    clock.now += 0.05  # half a token
    assert not limiter.allow()
    clock.now += 0.05
    assert limiter.allow()
    assert not limiter.allow()
    clock.now += 1.0
    assert allowed(limiter, 15) == 10
    assert limiter.take_suppressed() == 5 + 1 + 1 + 5


def test_refill_is_capped_at_the_burst() -> None:
    clock = FakeClock()
    limiter = LogLimiter(rate_per_s=10, burst=3, clock=clock)
    clock.now += 3600
    assert allowed(limiter, 10) == 3


def test_a_steady_flood_gets_the_rate() -> None:
    clock = FakeClock()
    limiter = LogLimiter(rate_per_s=10, burst=20, clock=clock)
    logged = 0
    for _ in range(10_000):  # 1000 refusals a second for 10 s
        clock.now += 0.001
        logged += limiter.allow()
    assert 20 + 100 - 2 <= logged <= 20 + 100 + 1
    assert limiter.take_suppressed() == 10_000 - logged


def test_clock_going_backwards_adds_nothing() -> None:
    clock = FakeClock()
    limiter = LogLimiter(rate_per_s=1, burst=1, clock=clock)
    assert limiter.allow()
    clock.now -= 100
    assert not limiter.allow()
    clock.now += 100.5  # back where it was, and half a second more
    assert not limiter.allow()
    clock.now += 0.5
    assert limiter.allow()


def test_fractional_rate() -> None:
    clock = FakeClock()
    limiter = LogLimiter(rate_per_s=0.1, burst=1, clock=clock)
    assert limiter.allow()
    clock.now += 9.9
    assert not limiter.allow()
    clock.now += 0.1
    assert limiter.allow()


def test_default_clock_works() -> None:
    limiter = LogLimiter()
    assert limiter.allow()


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("nan"), 1), (1, 0), (1, -5)])
def test_invalid_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        LogLimiter(rate_per_s=rate, burst=burst, clock=FakeClock())


# -- clip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "clipped"),
    [
        ("", ""),
        ("/vm1", "/vm1"),
        ("a\nb", "a\\nb"),
        ("a\r\nX-Injected: 1", "a\\r\\nX-Injected: 1"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("tab\there", "tab\\there"),
        ("back\\slash", "back\\\\slash"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("caf\u00e9", "caf\\xe9"),
        ("\u202eevil", "\\u202eevil"),
        ("\U0001f600", "\\U0001f600"),
        ("\udcff", "\\udcff"),  # a surrogate from surrogateescape decoding
        ("\u2028", "\\u2028"),
        ("x" * 80, "x" * 80),
    ],
)
def test_clip_escapes(text: str, clipped: str) -> None:
    assert clip(text) == clipped


def test_clip_truncates_with_the_original_length() -> None:
    assert clip("x" * 81) == "x" * 80 + "... (81 chars)"
    assert clip("x" * 5000, 10) == "x" * 10 + "... (5000 chars)"
    assert clip("abc", 0) == "... (3 chars)"
    assert clip("", 0) == ""


def test_clip_cuts_at_an_escape_boundary() -> None:
    # Nine characters, then an escape of four that would not fit in ten.
    assert clip("x" * 9 + "\x1b" + "y", 10) == "x" * 9 + "... (11 chars)"
    assert clip("\u202e" * 2, 12) == "\\u202e" * 2
    assert clip("\u202e" * 3, 12) == "\\u202e" * 2 + "... (3 chars)"
    assert clip("\u202e" * 3, 17) == "\\u202e" * 2 + "... (3 chars)"


@pytest.mark.parametrize(
    "text",
    ["\x00" * 1000, "\n" * 10, "é" * 300, "\U0001f600" * 100, "a\x85b\u2029c", "x" * 10**6],
)
@pytest.mark.parametrize("limit", [0, 1, 5, 80, 200])
def test_clip_output_is_one_printable_ascii_line(text: str, limit: int) -> None:
    out = clip(text, limit)
    assert out.isascii() and out.isprintable()
    assert len(out.splitlines()) <= 1
    if out.endswith(" chars)"):
        assert len(out) <= limit + len(f"... ({len(text)} chars)")
    else:
        assert len(out) <= limit


def test_clip_negative_limit() -> None:
    with pytest.raises(ValueError):
        clip("x", -1)
