"""Keep refusal logging bounded: a token bucket for log lines, and one-line-safe text.

A client that is refused a thousand times a second must not write a thousand log lines
a second, nor put its own text, escape sequences and newlines into them. Pure: the
clock is a callable returning seconds (`time.monotonic` unless a test passes another).

::

    limiter = LogLimiter(rate_per_s=10, burst=20)
    if limiter.allow():
        dropped = limiter.take_suppressed()
        note = f" ({dropped} refusals not logged)" if dropped else ""
        logger.warning("refused %s from %s%s", clip(path), peer, note)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["LogLimiter", "clip"]

#: Rounding slack: a clock read in decimal steps (0.05 + 0.05) must earn a whole token.
_EPSILON: Final = 1e-9


class LogLimiter:
    """A token bucket: ``burst`` lines at once, then ``rate_per_s`` lines a second.

    The bucket starts full. Each `allow` that finds a whole token takes it and says
    True; otherwise it counts one suppressed line and says False. A clock that goes
    backwards adds nothing.

    Raises:
        ValueError: ``rate_per_s`` is not positive or ``burst`` is below 1.
    """

    def __init__(
        self,
        rate_per_s: float = 10.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_s > 0:  # also refuses NaN
            raise ValueError(f"rate_per_s must be positive, not {rate_per_s!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate_per_s = float(rate_per_s)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._suppressed = 0

    def allow(self) -> bool:
        """Whether one more line may be logged now (takes a token when it may)."""
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
            self._last = now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        self._suppressed += 1
        return False

    @property
    def suppressed(self) -> int:
        """Lines refused since the last `take_suppressed`."""
        return self._suppressed

    def take_suppressed(self) -> int:
        """How many lines were refused since the last call; resets the count to 0."""
        count, self._suppressed = self._suppressed, 0
        return count


_ESCAPES: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if 0x20 <= code < 0x7F:
        return char
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clip(text: str, limit: int = 80) -> str:
    """``text`` made safe for one log line: printable ASCII, at most about ``limit`` long.

    Backslash, control characters (newlines included) and everything beyond ASCII are
    written as Python escapes (``\\\\``, ``\\n``, ``\\x1b``, ``\\u202e``), so a peer
    cannot start a new line, move the cursor or hide text. When the escaped text is
    longer than ``limit`` characters it is cut there, at an escape's boundary, and ends
    with ``...`` and the original length: ``GET /aaaa... (5000 chars)``.

    Raises:
        ValueError: ``limit`` is negative.
    """
    if limit < 0:
        raise ValueError(f"limit must not be negative, not {limit!r}")
    pieces: list[str] = []
    size = 0
    # An escaped character is at least one character long: looking at the first
    # limit + 1 characters is enough to know whether to cut, whatever the input's size.
    for char in text[: limit + 1]:
        piece = _escape(char)
        if size + len(piece) > limit:
            return "".join(pieces) + f"... ({len(text)} chars)"
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)
