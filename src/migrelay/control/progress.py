"""Render a migration's progress for people and for programs.

Three forms, all fed the same typed ``query-migrate`` snapshots (`MigrationInfo`) and
none of them speaking QMP:

- `TerminalProgress`: one line redrawn in place (``\\r``) on a terminal: a bar, bytes
  transferred and remaining, rate, ETA, dirty-page rate and pass number; then a summary.
- `LineProgress`: one plain line per second when stdout is a pipe or a file (logs, CI),
  then the same summary.
- `JsonProgress`: nothing while the migration runs, then one JSON document (`Summary`).

Each renderer is told `update(info)` for every snapshot and `finish(error)` once. The
clock is injected so that the throttling and the elapsed time are testable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from migrelay.control.qmp import MigrationInfo, MigrationStatus
from migrelay.units import format_bytes, format_duration, format_rate

__all__ = [
    "JsonProgress",
    "LineProgress",
    "ProgressRenderer",
    "Summary",
    "TerminalProgress",
    "progress_line",
    "renderer_for",
    "snapshot_document",
]

#: Seconds between two lines of `LineProgress`: what a person tailing a log reads, and
#: few enough lines that a long migration does not flood a CI log.
LINE_INTERVAL_S = 1.0

#: Width of the terminal bar in cells.
BAR_CELLS = 20

#: ANSI "erase to end of line": a shorter redraw must not leave the tail of a longer one.
_ERASE_LINE = "\x1b[K"


def eta_seconds(info: MigrationInfo) -> float | None:
    """Seconds until this pass is sent at the current rate, or ``None`` if unknown.

    It is the end of the current pass, not of the migration: a busy guest dirties pages
    that need another pass, which no estimate made now can know about.
    """
    if info.remaining is None or not info.rate_bytes_per_s:
        return None
    return info.remaining / info.rate_bytes_per_s


def fraction_done(info: MigrationInfo) -> float | None:
    """How much of this pass is sent (0..1), from ``total`` and ``remaining``."""
    if not info.total or info.remaining is None:
        return None
    return min(max((info.total - info.remaining) / info.total, 0.0), 1.0)


def dirty_rate_text(info: MigrationInfo) -> str:
    """The guest's dirty-page rate, in bytes/s when the page size is known."""
    if info.dirty_pages_rate is None:
        return "?"
    if info.page_size:
        return format_rate(info.dirty_pages_rate * info.page_size)
    return f"{info.dirty_pages_rate} pages/s"


def progress_line(info: MigrationInfo) -> str:
    """One plain line for a snapshot (the `LineProgress` form, no bar, no escapes)."""
    parts = [str(info.status)]
    fraction = fraction_done(info)
    if fraction is not None:
        parts.append(f"{fraction * 100:3.0f}%")
    if info.transferred is not None:
        parts.append(f"transferred {format_bytes(info.transferred)}")
    if info.remaining is not None:
        parts.append(f"remaining {format_bytes(info.remaining)}")
    if info.rate_bytes_per_s is not None:
        parts.append(f"rate {format_rate(info.rate_bytes_per_s)}")
    if info.remaining is not None:
        parts.append(f"eta {format_duration(eta_seconds(info))}")
    if info.dirty_pages_rate is not None:
        parts.append(f"dirty {dirty_rate_text(info)}")
    if info.dirty_sync_count is not None:
        parts.append(f"pass {info.dirty_sync_count}")
    return " ".join(parts)


def bar_line(info: MigrationInfo, cells: int = BAR_CELLS) -> str:
    """The terminal form of a snapshot: a bar and the same figures, shorter labels."""
    fraction = fraction_done(info)
    filled = round((fraction or 0.0) * cells)
    bar = "#" * filled + "-" * (cells - filled)
    percent = f"{fraction * 100:3.0f}%" if fraction is not None else "  ?%"
    return (
        f"[{bar}] {percent} {info.status}"
        f"  {format_bytes(info.transferred)} sent"
        f"  {format_bytes(info.remaining)} left"
        f"  {format_rate(info.rate_bytes_per_s)}"
        f"  eta {format_duration(eta_seconds(info))}"
        f"  dirty {dirty_rate_text(info)}"
        f"  pass {info.dirty_sync_count if info.dirty_sync_count is not None else '?'}"
    )


def snapshot_document(info: MigrationInfo, runstate: str | None = None) -> dict[str, object]:
    """A snapshot as ``status --json`` prints it (bytes in bytes, times in ms)."""
    return {
        "runstate": runstate,
        "status": str(info.status),
        "transferred_bytes": info.transferred,
        "remaining_bytes": info.remaining,
        "total_bytes": info.total,
        "rate_bytes_per_s": info.rate_bytes_per_s,
        "dirty_pages_rate": info.dirty_pages_rate,
        "page_size": info.page_size,
        "passes": info.dirty_sync_count,
        "expected_downtime_ms": info.expected_downtime_ms,
        "total_time_ms": info.total_time_ms,
        "setup_time_ms": info.setup_time_ms,
        "downtime_ms": info.downtime_ms,
        "listening": list(info.socket_addresses),
        "error": info.error_desc,
    }


@dataclass(frozen=True, slots=True)
class Summary:
    """How a migration ended, as ``--json`` prints it and the text summary says it.

    Attributes:
        status: the last status seen (``completed``, ``failed``, ``cancelled`` …).
        elapsed_s: wall-clock seconds this command followed the migration.
        total_time_ms: QEMU's total time (it reports none for a failed migration).
        setup_time_ms: time spent in ``setup``.
        downtime_ms: how long the VM was stopped, once completed.
        transferred_bytes: RAM bytes sent.
        total_bytes: the guest's RAM size.
        average_rate_bytes_per_s: ``transferred_bytes`` over the total time.
        passes: dirty-bitmap syncs (passes over RAM).
        error: why it did not complete (QEMU's own text when QEMU gave one), else ``None``.
    """

    status: str
    elapsed_s: float
    total_time_ms: int | None
    setup_time_ms: int | None
    downtime_ms: int | None
    transferred_bytes: int | None
    total_bytes: int | None
    average_rate_bytes_per_s: float | None
    passes: int | None
    error: str | None

    @classmethod
    def build(
        cls,
        last: MigrationInfo | None,
        elapsed_s: float,
        error: str | None = None,
        progress: MigrationInfo | None = None,
    ) -> Summary:
        """Summarise from the last snapshot; ``progress`` is the last one with RAM figures.

        A failed migration's final ``query-migrate`` carries only the status and the
        error, so the byte counts come from the last snapshot that had them.
        """
        figures = last if last is not None and last.transferred is not None else progress
        status = str(last.status) if last is not None else str(MigrationStatus.NONE)
        transferred = figures.transferred if figures is not None else None
        total_time_ms = last.total_time_ms if last is not None else None
        seconds = total_time_ms / 1000 if total_time_ms else elapsed_s
        rate = transferred / seconds if transferred is not None and seconds > 0 else None
        if error is None and last is not None and last.status is MigrationStatus.FAILED:
            error = last.error_desc or "migration failed (qemu gave no reason)"
        return cls(
            status=status,
            elapsed_s=round(elapsed_s, 3),
            total_time_ms=total_time_ms,
            setup_time_ms=last.setup_time_ms if last is not None else None,
            downtime_ms=last.downtime_ms if last is not None else None,
            transferred_bytes=transferred,
            total_bytes=figures.total if figures is not None else None,
            average_rate_bytes_per_s=round(rate, 1) if rate is not None else None,
            passes=figures.dirty_sync_count if figures is not None else None,
            error=error,
        )

    def to_json(self) -> str:
        """The document ``migrate --json`` prints: one object, keys in a fixed order."""
        return json.dumps(
            {
                "status": self.status,
                "elapsed_s": self.elapsed_s,
                "total_time_ms": self.total_time_ms,
                "setup_time_ms": self.setup_time_ms,
                "downtime_ms": self.downtime_ms,
                "transferred_bytes": self.transferred_bytes,
                "total_bytes": self.total_bytes,
                "average_rate_bytes_per_s": self.average_rate_bytes_per_s,
                "passes": self.passes,
                "error": self.error,
            }
        )

    def text(self) -> str:
        """One line for people: ``completed in 1.23 s: 64.1 MiB at 52.0 MiB/s, …``."""
        seconds = self.total_time_ms / 1000 if self.total_time_ms else self.elapsed_s
        line = (
            f"{self.status} in {format_duration(seconds)}:"
            f" {format_bytes(self.transferred_bytes)}"
            f" at {format_rate(self.average_rate_bytes_per_s)}"
        )
        if self.downtime_ms is not None:
            line += f", downtime {self.downtime_ms} ms"
        if self.passes is not None:
            line += f", {self.passes} pass{'es' if self.passes != 1 else ''}"
        return line


class ProgressRenderer:
    """Collects snapshots and writes one form of progress to ``stream``.

    Args:
        stream: where to write (stdout).
        clock: monotonic seconds, injectable for tests.
    """

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.started = clock()
        #: The last snapshot seen.
        self.last: MigrationInfo | None = None
        #: The last snapshot that had RAM figures (a failed one has none).
        self.last_progress: MigrationInfo | None = None

    def update(self, info: MigrationInfo) -> None:
        """Take a snapshot (call it for every ``query-migrate``, the final one included)."""
        self.last = info
        if info.transferred is not None:
            self.last_progress = info
        self.draw(info)

    def draw(self, info: MigrationInfo) -> None:
        """Show a snapshot; the base class shows nothing."""

    def summary(self, error: str | None = None) -> Summary:
        """The summary of what was seen so far."""
        return Summary.build(self.last, self.clock() - self.started, error, self.last_progress)

    def finish(self, error: str | None = None) -> Summary:
        """Write the summary (text forms) or the document (JSON form) and return it.

        Args:
            error: why the migration did not complete, if it did not; the text form
                leaves errors to the caller's stderr and prints only the summary.
        """
        summary = self.summary(error)
        self.stream.write(summary.text() + "\n")
        self.stream.flush()
        return summary


class LineProgress(ProgressRenderer):
    """One plain line per `LINE_INTERVAL_S`, and on every status change."""

    def __init__(
        self,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        interval: float = LINE_INTERVAL_S,
    ) -> None:
        super().__init__(stream, clock)
        self.interval = interval
        self._last_line_at: float | None = None
        self._last_status: MigrationStatus | None = None

    def draw(self, info: MigrationInfo) -> None:
        """Write a line if a second has passed or the status changed."""
        now = self.clock()
        due = self._last_line_at is None or now - self._last_line_at >= self.interval
        if not due and info.status is self._last_status:
            return
        self._last_line_at = now
        self._last_status = info.status
        self.stream.write(progress_line(info) + "\n")
        self.stream.flush()


class TerminalProgress(ProgressRenderer):
    """A single line redrawn in place; the summary replaces it at the end.

    Args:
        stream: a terminal.
        clock: monotonic seconds.
        columns: the terminal's width; the line is cut to fit, because a line that
            wraps cannot be redrawn with ``\\r``.
    """

    def __init__(
        self, stream: TextIO, clock: Callable[[], float] = time.monotonic, columns: int = 80
    ) -> None:
        super().__init__(stream, clock)
        self.columns = max(columns, 20)
        self._drawn = False

    def draw(self, info: MigrationInfo) -> None:
        """Redraw the line."""
        line = bar_line(info)[: self.columns - 1]
        self.stream.write(f"\r{line}{_ERASE_LINE}")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar, so that a message can be printed on a clean line."""
        if self._drawn:
            self.stream.write(f"\r{_ERASE_LINE}")
            self.stream.flush()
            self._drawn = False

    def finish(self, error: str | None = None) -> Summary:
        """Replace the bar with the summary line."""
        self.clear()
        return super().finish(error)


class JsonProgress(ProgressRenderer):
    """Silent while the migration runs; one JSON document (`Summary`) at the end."""

    def finish(self, error: str | None = None) -> Summary:
        """Write the document, errors included."""
        summary = self.summary(error)
        self.stream.write(summary.to_json() + "\n")
        self.stream.flush()
        return summary


def renderer_for(stream: TextIO, *, json_output: bool, columns: int = 80) -> ProgressRenderer:
    """Pick the form: JSON if asked, a bar on a terminal, lines otherwise."""
    if json_output:
        return JsonProgress(stream)
    if stream.isatty():
        return TerminalProgress(stream, columns=columns)
    return LineProgress(stream)
