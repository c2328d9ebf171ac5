"""Render a migration's progress for people and for programs.

Three forms, all fed the same typed ``query-migrate`` snapshots (`MigrationInfo`) and
none of them speaking QMP:

- `TerminalProgress`: one line redrawn in place (``\\r``) on a terminal: a bar, bytes
  transferred and remaining, rate, ETA, dirty-page rate and pass number; then a summary.
- `LineProgress`: one plain line per second when stdout is a pipe or a file (logs, CI),
  then the same summary.
- `JsonProgress`: nothing while the migration runs, then one JSON document (`Summary`).

With ``--copy-storage`` the snapshots also carry the disks' mirror jobs
(`MigrationInfo.disks`): first a disk phase (status ``none``, no RAM migration yet),
then the RAM phase while the mirrors, ready, follow the guest's writes. The terminal
then redraws a block of lines (one per disk, then RAM) instead of one line, the lines
form writes a line per disk with each update, and the summary and the JSON document
gain the disks (`DiskSummary`). A migration without disks is rendered exactly as
before: scripts parse this output.

Each renderer is told `update(info)` for every snapshot and `finish(error)` once. The
clock is injected so that the throttling, the elapsed time and the disks' average
rates are testable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from migrelay.control.qmp import DiskProgress, MigrationInfo, MigrationStatus
from migrelay.units import format_bytes, format_duration, format_rate

__all__ = [
    "DiskSummary",
    "JsonProgress",
    "LineProgress",
    "ProgressRenderer",
    "Summary",
    "TerminalProgress",
    "disk_line",
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

#: What the RAM line of the terminal says while the disks are copied first.
RAM_WAITS_FOR_DISKS = "ram: waits for the disks"


def _cursor_up(lines: int) -> str:
    """ANSI "cursor up", or nothing: ``\\x1b[0A`` would move up one line, not zero."""
    return f"\x1b[{lines}A" if lines > 0 else ""


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


def policy_text(info: MigrationInfo) -> str:
    """What the convergence policy adds to a line: ``, not converging, throttle 40%``.

    Empty while there is nothing to say, so that a migration that converges on its own
    is shown as before.
    """
    parts = []
    if info.convergence is not None:
        parts.append(info.convergence)
    if info.throttle_percent:
        parts.append(f"throttle {info.throttle_percent}%")
    if info.downtime_limit_ms is not None:
        parts.append(f"downtime limit {info.downtime_limit_ms} ms")
    return "".join(f", {part}" for part in parts)


def progress_line(info: MigrationInfo) -> str:
    """One plain line for a snapshot (the `LineProgress` form, no bar, no escapes)."""
    parts = [f"{info.status}{policy_text(info)}"]
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
    if info.wire_bytes is not None:
        parts.append(f"wire {format_bytes(info.wire_bytes)}")
    return " ".join(parts)


def fit_fields(fields: list[str], width: int | None) -> str:
    """Join ``fields`` with two spaces, as many as fit in ``width`` cells, whole.

    A field that does not fit is left out with every field after it, so a narrow
    terminal shows the first figures whole instead of a line cut in the middle of one.
    The first field is always shown; only a terminal narrower than it cuts it.
    """
    line = fields[0]
    for field in fields[1:]:
        if width is not None and len(line) + 2 + len(field) > width:
            break
        line += f"  {field}"
    return line if width is None else line[:width]


def _bar_head(fraction: float | None, cells: int, what: str, width: int | None) -> str:
    """``[####----]  50% WHAT``: the bar goes first when even this would not fit."""
    filled = round((fraction or 0.0) * cells)
    bar = "#" * filled + "-" * (cells - filled)
    percent = f"{fraction * 100:3.0f}%" if fraction is not None else "  ?%"
    head = f"[{bar}] {percent} {what}"
    if width is not None and len(head) > width:
        return f"{percent.strip()} {what}"
    return head


def bar_line(info: MigrationInfo, cells: int = BAR_CELLS, width: int | None = None) -> str:
    """The terminal form of a snapshot: a bar and the same figures, shorter labels.

    Args:
        info: the snapshot.
        cells: the bar's width.
        width: the cells the line may take (`fit_fields`); None: all of it.
    """
    fields = [
        _bar_head(fraction_done(info), cells, f"{info.status}{policy_text(info)}", width),
        f"{format_bytes(info.transferred)} sent",
        f"{format_bytes(info.remaining)} left",
        format_rate(info.rate_bytes_per_s),
        f"eta {format_duration(eta_seconds(info))}",
        f"dirty {dirty_rate_text(info)}",
        f"pass {info.dirty_sync_count if info.dirty_sync_count is not None else '?'}",
    ]
    if info.wire_bytes is not None:
        fields.append(f"wire {format_bytes(info.wire_bytes)}")
    return fit_fields(fields, width)


def disk_fraction(disk: DiskProgress) -> float | None:
    """How much of a disk is copied (0..1); 1 once ready, ``None`` while the size is unknown.

    A ready mirror counts as whole even when the guest's latest writes are still on their
    way: it is in sync, and only that matters for the switchover.
    """
    if disk.ready:
        return 1.0
    if disk.total <= 0:
        return None
    return min(max(disk.copied / disk.total, 0.0), 1.0)


def disk_line(disk: DiskProgress) -> str:
    """One plain line for a disk's mirror (the `LineProgress` form)."""
    if disk.ready and disk.status == "concluded":
        return f"disk {disk.disk}: done, {format_bytes(disk.copied)} copied"
    if disk.status == "ready":
        return f"disk {disk.disk}: ready, {format_bytes(disk.copied)} copied, following writes"
    parts = [f"disk {disk.disk}:"]
    if disk.status != "running":
        parts.append(disk.status)
    fraction = disk_fraction(disk)
    if fraction is not None:
        parts.append(f"{fraction * 100:.0f}%")
    parts.append(f"copied {format_bytes(disk.copied)} of {format_bytes(disk.total)}")
    if disk.rate_bytes_per_s is not None:
        parts.append(f"rate {format_rate(disk.rate_bytes_per_s)}")
    eta = disk.eta_s
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " ".join(parts)


def disk_bar_line(disk: DiskProgress, cells: int = BAR_CELLS, width: int | None = None) -> str:
    """The terminal form of a disk's mirror: a bar as wide as the RAM bar, so they align;
    ``width`` as for `bar_line`."""
    head = _bar_head(disk_fraction(disk), cells, disk.disk, width)
    if disk.ready and disk.status == "concluded":
        return fit_fields([head, "done", f"{format_bytes(disk.copied)} copied"], width)
    if disk.status == "ready":
        return fit_fields([head, "ready", f"{format_bytes(disk.copied)}, following writes"], width)
    status = [disk.status] if disk.status != "running" else []
    return fit_fields(
        [
            head,
            *status,
            f"{format_bytes(disk.copied)} of {format_bytes(disk.total)}",
            format_rate(disk.rate_bytes_per_s),
            f"eta {format_duration(disk.eta_s)}",
        ],
        width,
    )


def terminal_lines(
    info: MigrationInfo, cells: int = BAR_CELLS, width: int | None = None
) -> list[str]:
    """The terminal's block for a snapshot: a line per disk, then the RAM line, each
    fitted to ``width`` (`fit_fields`)."""
    lines = [disk_bar_line(disk, cells, width) for disk in info.disks]
    if info.disks and info.status is MigrationStatus.NONE:
        lines.append(RAM_WAITS_FOR_DISKS if width is None else RAM_WAITS_FOR_DISKS[:width])
    else:
        lines.append(bar_line(info, cells, width))
    return lines


def snapshot_document(info: MigrationInfo, runstate: str | None = None) -> dict[str, object]:
    """A snapshot as ``status --json`` prints it (bytes in bytes, times in ms).

    ``disks`` (each mirror's status, bytes copied and to copy, current rate) is there
    only when the snapshot has disks.
    """
    document: dict[str, object] = {
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
    if info.throttle_percent is not None:
        document["throttle_percent"] = info.throttle_percent
    # Only with disks: a migration without them keeps the document it always had.
    if info.disks:
        document["disks"] = [
            {
                "disk": disk.disk,
                "status": disk.status,
                "copied_bytes": disk.copied,
                "total_bytes": disk.total,
                "rate_bytes_per_s": disk.rate_bytes_per_s,
            }
            for disk in info.disks
        ]
    return document


@dataclass(frozen=True, slots=True)
class DiskSummary:
    """How one disk's copy went, as the ``--json`` document's ``disks`` list says it.

    Attributes:
        disk: the disk's device id.
        status: the mirror job's last status seen (``concluded``, ``ready`` …).
        copied_bytes: bytes copied, as last seen.
        total_bytes: bytes to copy, as last seen.
        average_rate_bytes_per_s: bytes copied from the first snapshot that showed the
            disk to the first that showed it ready (or the last one, if it never was),
            over the time between them; ``None`` if no time passed between them.
    """

    disk: str
    status: str
    copied_bytes: int
    total_bytes: int
    average_rate_bytes_per_s: float | None

    def to_document(self) -> dict[str, object]:
        """The entry of the ``disks`` list, keys in a fixed order."""
        return {
            "disk": self.disk,
            "status": self.status,
            "copied_bytes": self.copied_bytes,
            "total_bytes": self.total_bytes,
            "average_rate_bytes_per_s": self.average_rate_bytes_per_s,
        }

    def text(self) -> str:
        """``disk0 32.0 MiB``, or ``disk0 12.0 MiB of 32.0 MiB`` when not all was copied."""
        if self.copied_bytes >= self.total_bytes:
            return f"{self.disk} {format_bytes(self.copied_bytes)}"
        return f"{self.disk} {format_bytes(self.copied_bytes)} of {format_bytes(self.total_bytes)}"


@dataclass(slots=True)
class _DiskWatch:
    """What a renderer remembers of one disk to average its rate."""

    first: DiskProgress
    first_at: float
    last: DiskProgress
    last_at: float
    ready: DiskProgress | None = None
    ready_at: float | None = None

    def see(self, disk: DiskProgress, now: float) -> None:
        self.last, self.last_at = disk, now
        if disk.ready and self.ready is None:
            self.ready, self.ready_at = disk, now

    def summary(self) -> DiskSummary:
        # The bulk copy ends when the mirror is first ready; what it copies afterwards
        # follows the guest's writes, at the guest's pace, and would only dilute the rate.
        end, end_at = (
            (self.ready, self.ready_at)
            if self.ready is not None and self.ready_at is not None
            else (self.last, self.last_at)
        )
        seconds = end_at - self.first_at
        rate = (end.copied - self.first.copied) / seconds if seconds > 0 else None
        return DiskSummary(
            disk=self.last.disk,
            status=self.last.status,
            copied_bytes=self.last.copied,
            total_bytes=self.last.total,
            average_rate_bytes_per_s=round(rate, 1) if rate is not None else None,
        )


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
        disks: the disks copied first (``--copy-storage``), empty without them.
        wire_bytes: bytes the in-process relay sent (``migrate --to``), else ``None``:
            with multifd compression, fewer than ``transferred_bytes``.
        max_throttle_percent: the most ``auto-converge`` slowed the guest, if it did.
        convergence: the policy's last word (``not converging``, ``postcopy``), if any.
        aftermath: who does what now that it has completed (``source stopped
            (postmigrate), destination resumes the guest if it ran here``), if said.
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
    disks: tuple[DiskSummary, ...] = ()
    wire_bytes: int | None = None
    max_throttle_percent: int | None = None
    convergence: str | None = None
    aftermath: str | None = None

    @classmethod
    def build(
        cls,
        last: MigrationInfo | None,
        elapsed_s: float,
        error: str | None = None,
        progress: MigrationInfo | None = None,
        disks: tuple[DiskSummary, ...] = (),
        *,
        wire_bytes: int | None = None,
        max_throttle_percent: int | None = None,
        convergence: str | None = None,
        aftermath: str | None = None,
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
            disks=disks,
            wire_bytes=wire_bytes,
            max_throttle_percent=max_throttle_percent,
            convergence=convergence,
            aftermath=aftermath if status == str(MigrationStatus.COMPLETED) else None,
        )

    def to_json(self) -> str:
        """The document ``migrate --json`` prints: one object, keys in a fixed order.

        ``disks``, ``wire_bytes``, ``max_throttle_percent`` and ``convergence`` come
        last and only when there is something to say, so that the document of a plain
        migration keeps its keys.
        """
        document: dict[str, object] = {
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
        if self.disks:
            document["disks"] = [disk.to_document() for disk in self.disks]
        if self.wire_bytes is not None:
            document["wire_bytes"] = self.wire_bytes
        if self.max_throttle_percent:
            document["max_throttle_percent"] = self.max_throttle_percent
        if self.convergence is not None:
            document["convergence"] = self.convergence
        if self.aftermath is not None:
            document["aftermath"] = self.aftermath
        return json.dumps(document)

    def text(self) -> str:
        """One line for people: ``completed in 1.23 s: 64.1 MiB at 52.0 MiB/s, …``, or
        ``failed in 0.30 s: no RAM sent`` when QEMU reported no RAM figures.

        With disks it ends with ``; disks: disk0 32.0 MiB, disk1 48.0 MiB copied``.
        """
        seconds = self.total_time_ms / 1000 if self.total_time_ms else self.elapsed_s
        if self.transferred_bytes is None:
            # QEMU reports RAM figures from ``active`` on: it ended before sending RAM.
            line = f"{self.status} in {format_duration(seconds)}: no RAM sent"
        else:
            line = (
                f"{self.status} in {format_duration(seconds)}:"
                f" {format_bytes(self.transferred_bytes)}"
                f" at {format_rate(self.average_rate_bytes_per_s)}"
            )
        if self.downtime_ms is not None:
            line += f", downtime {self.downtime_ms} ms"
        if self.passes is not None:
            line += f", {self.passes} pass{'es' if self.passes != 1 else ''}"
        if self.wire_bytes is not None:
            line += f", {format_bytes(self.wire_bytes)} on the wire"
        if self.max_throttle_percent:
            line += f", guest throttled up to {self.max_throttle_percent}%"
        if self.convergence is not None and (
            self.status != MigrationStatus.COMPLETED or self.convergence == "postcopy"
        ):
            line += f" ({self.convergence})"
        if self.disks:
            line += f"; disks: {', '.join(disk.text() for disk in self.disks)} copied"
        if self.aftermath is not None:
            line += f"; {self.aftermath}"
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
        #: Every disk seen, by id, in the order they first appeared: a later snapshot
        #: (a failed one) may no longer list them.
        self._disks: dict[str, _DiskWatch] = {}
        self._wire_bytes: int | None = None
        self._max_throttle: int | None = None
        self._convergence: str | None = None
        #: Who does what once the migration has completed, for the summary (set by
        #: the command, which knows its options); said only if it completed.
        self.aftermath: str | None = None

    def update(self, info: MigrationInfo) -> None:
        """Take a snapshot (call it for every ``query-migrate``, the final one included)."""
        self.last = info
        if info.transferred is not None:
            self.last_progress = info
        if info.wire_bytes is not None:
            self._wire_bytes = info.wire_bytes
        if info.throttle_percent:
            self._max_throttle = max(self._max_throttle or 0, info.throttle_percent)
        if info.convergence is not None:
            self._convergence = info.convergence
        if info.disks:
            now = self.clock()
            for disk in info.disks:
                watch = self._disks.setdefault(disk.disk, _DiskWatch(disk, now, disk, now))
                watch.see(disk, now)
        self.draw(info)

    def draw(self, info: MigrationInfo) -> None:
        """Show a snapshot; the base class shows nothing."""

    def summary(self, error: str | None = None) -> Summary:
        """The summary of what was seen so far."""
        return Summary.build(
            self.last,
            self.clock() - self.started,
            error,
            self.last_progress,
            tuple(watch.summary() for watch in self._disks.values()),
            wire_bytes=self._wire_bytes,
            max_throttle_percent=self._max_throttle,
            convergence=self._convergence,
            aftermath=self.aftermath,
        )

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
    """One plain line per `LINE_INTERVAL_S`, and on every status change.

    With disks, each of those updates is a line per disk and then, once the RAM
    migration has started, the RAM line; a disk's mirror changing status (turning
    ready) counts as a status change.
    """

    def __init__(
        self,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        interval: float = LINE_INTERVAL_S,
    ) -> None:
        super().__init__(stream, clock)
        self.interval = interval
        self._last_line_at: float | None = None
        self._last_statuses: tuple[MigrationStatus, tuple[tuple[str, str], ...]] | None = None

    def draw(self, info: MigrationInfo) -> None:
        """Write the lines if a second has passed or a status changed."""
        now = self.clock()
        due = self._last_line_at is None or now - self._last_line_at >= self.interval
        statuses = (info.status, tuple((disk.disk, disk.status) for disk in info.disks))
        if not due and statuses == self._last_statuses:
            return
        self._last_line_at = now
        self._last_statuses = statuses
        lines = [disk_line(disk) for disk in info.disks]
        # Status "none" with disks: the disks are copied first and RAM has not started,
        # so there are no RAM figures to print.
        if not info.disks or info.status is not MigrationStatus.NONE:
            lines.append(progress_line(info))
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()


class TerminalProgress(ProgressRenderer):
    """A line redrawn in place (a block of lines with disks); the summary replaces it.

    Between draws the cursor rests on the block's last line; a redraw moves it up to
    the first line and rewrites each line.

    Args:
        stream: a terminal.
        clock: monotonic seconds.
        columns: the terminal's width; every line is fitted to it, whole figures left
            out from the end (`fit_fields`), because a line that wraps takes two rows
            and the cursor would no longer go back to the top.
    """

    def __init__(
        self, stream: TextIO, clock: Callable[[], float] = time.monotonic, columns: int = 80
    ) -> None:
        super().__init__(stream, clock)
        self.columns = max(columns, 20)
        #: How many lines the last draw left on the terminal (0: none, or cleared).
        self._drawn_lines = 0

    def draw(self, info: MigrationInfo) -> None:
        """Redraw the block: a line per disk, then the RAM line."""
        # Never the last column: a line that reaches it wraps on many terminals.
        lines = terminal_lines(info, width=self.columns - 1)
        text = _cursor_up(self._drawn_lines - 1)
        text += "\n".join(f"\r{line}{_ERASE_LINE}" for line in lines)
        # Fewer lines than last time (a final snapshot without its disks): erase the
        # rest, then come back up, so the cursor rests on the last line drawn.
        stale = self._drawn_lines - len(lines)
        if stale > 0:
            text += f"\n\r{_ERASE_LINE}" * stale + _cursor_up(stale)
        self.stream.write(text)
        self.stream.flush()
        self._drawn_lines = len(lines)

    def clear(self) -> None:
        """Erase the block, leaving the cursor at the start of its first line.

        A message (or the summary) printed next then takes the block's place.
        """
        if self._drawn_lines:
            text = f"\r{_ERASE_LINE}" + f"{_cursor_up(1)}\r{_ERASE_LINE}" * (self._drawn_lines - 1)
            self.stream.write(text)
            self.stream.flush()
            self._drawn_lines = 0

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
