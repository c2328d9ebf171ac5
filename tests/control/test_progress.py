"""Progress rendering (`migrelay.control.progress`): every form, from typed snapshots."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pytest

from migrelay.control.progress import (
    DiskSummary,
    JsonProgress,
    LineProgress,
    ProgressRenderer,
    Summary,
    TerminalProgress,
    bar_line,
    disk_bar_line,
    disk_line,
    eta_seconds,
    fit_fields,
    progress_line,
    renderer_for,
    snapshot_document,
)
from migrelay.control.qmp import DiskProgress, MigrationInfo, MigrationStatus

MIB = 1024 * 1024
README = Path(__file__).resolve().parents[2] / "README.md"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def active(transferred: int, remaining: int, passes: int = 1) -> MigrationInfo:
    return MigrationInfo(
        status=MigrationStatus.ACTIVE,
        transferred=transferred,
        remaining=remaining,
        total=64 * MIB,
        rate_bytes_per_s=32 * MIB,
        dirty_pages_rate=256,
        dirty_sync_count=passes,
        page_size=4096,
        total_time_ms=1000,
    )


COMPLETED = MigrationInfo(
    status=MigrationStatus.COMPLETED,
    transferred=64 * MIB,
    remaining=0,
    total=64 * MIB,
    rate_bytes_per_s=40 * MIB,
    dirty_pages_rate=0,
    dirty_sync_count=3,
    page_size=4096,
    total_time_ms=2000,
    downtime_ms=12,
    setup_time_ms=1,
)

#: What QEMU 7.2 reports for a failed migration: the status and the error, no figures.
FAILED = MigrationInfo(
    status=MigrationStatus.FAILED, error_desc="Unable to write to socket: Broken pipe"
)


def test_eta_is_remaining_over_rate_and_unknown_without_a_rate() -> None:
    assert eta_seconds(active(32 * MIB, 32 * MIB)) == pytest.approx(1.0)
    assert eta_seconds(MigrationInfo(status=MigrationStatus.SETUP, remaining=10)) is None


def test_progress_line_names_every_figure() -> None:
    line = progress_line(active(16 * MIB, 48 * MIB, passes=2))
    assert line == (
        "active  25% transferred 16.0 MiB remaining 48.0 MiB rate 32.0 MiB/s"
        " eta 1.50 s dirty 1.0 MiB/s pass 2"
    )


def test_progress_line_of_setup_has_only_the_status() -> None:
    assert progress_line(MigrationInfo(status=MigrationStatus.SETUP)) == "setup"


def test_dirty_rate_is_in_pages_when_the_page_size_is_unknown() -> None:
    info = MigrationInfo(status=MigrationStatus.ACTIVE, dirty_pages_rate=7)
    assert progress_line(info) == "active dirty 7 pages/s"


def test_bar_fills_with_the_pass() -> None:
    line = bar_line(active(48 * MIB, 16 * MIB, passes=1))
    assert line.startswith("[###############-----]  75% active  48.0 MiB sent  16.0 MiB left")
    assert line.endswith("pass 1")


#: The snapshot the README's "What the operator sees" shows.
README_SNAPSHOT = MigrationInfo(
    status=MigrationStatus.ACTIVE,
    transferred=170 * MIB + 300 * 1024,
    remaining=86 * MIB + 512 * 1024,
    total=256 * MIB,
    rate_bytes_per_s=127 * MIB + 400 * 1024,
    dirty_pages_rate=0,
    dirty_sync_count=1,
    page_size=4096,
)


@pytest.mark.parametrize("width", range(19, 140))
def test_the_bar_leaves_out_whole_figures_to_fit_the_terminal(width: int) -> None:
    full = bar_line(README_SNAPSHOT, width=None).split("  ")
    line = bar_line(README_SNAPSHOT, width=width)
    assert len(line) <= width
    # Figures appear whole and in order, from the first: a prefix of the full line's.
    shown = line.split("  ")
    if line.startswith("["):
        assert shown == full[: len(shown)], line
    else:  # too narrow for the bar: the percentage and status lead
        assert shown[0] == "66% active", line
        assert shown[1:] == full[2 : 1 + len(shown)], line
    if width >= len("  ".join(full)):
        assert line == "  ".join(full)


def test_fit_fields_cuts_only_a_first_field_wider_than_the_terminal() -> None:
    assert fit_fields(["abcdef", "gh"], 4) == "abcd"
    assert fit_fields(["ab", "cd", "ef"], 6) == "ab  cd"
    assert fit_fields(["ab", "cd"], None) == "ab  cd"


def test_the_readme_shows_the_terminal_and_the_lines_as_printed() -> None:
    readme = README.read_text(encoding="utf-8")
    # An 80-column terminal: the bar in 79 cells (the last one would wrap).
    assert f"\n{bar_line(README_SNAPSHOT, width=79)}\n" in readme
    assert f"\n{progress_line(README_SNAPSHOT)}\n" in readme
    completed = Summary(
        status="completed",
        elapsed_s=2.3,
        total_time_ms=2190,
        setup_time_ms=12,
        downtime_ms=172,
        transferred_bytes=256 * MIB + 700 * 1024,
        total_bytes=256 * MIB,
        average_rate_bytes_per_s=117 * MIB + 200 * 1024,
        passes=3,
        error=None,
        aftermath="source stopped (postmigrate)",
    )
    assert f"\n{completed.text()}\n" in readme
    failed = Summary.build(MigrationInfo(status=MigrationStatus.FAILED), 0.53)
    assert f"\n{failed.text()}\n" in readme


def test_line_progress_prints_at_most_one_line_a_second_and_every_status_change() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = LineProgress(out, clock)
    renderer.update(MigrationInfo(status=MigrationStatus.SETUP))
    renderer.update(active(1 * MIB, 63 * MIB))  # status changed: printed at once
    clock.now += 0.5
    renderer.update(active(2 * MIB, 62 * MIB))  # same status, too soon: skipped
    clock.now += 0.5
    renderer.update(active(3 * MIB, 61 * MIB))  # a second later: printed
    clock.now += 0.1
    renderer.update(COMPLETED)
    summary = renderer.finish()
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [
        "setup",
        "active",
        "active",
        "completed",
        "completed",
    ]
    assert "transferred 3.0 MiB" in lines[2]
    assert lines[-1] == "completed in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes"
    assert summary.status == "completed"


def test_terminal_progress_redraws_one_line_in_place_then_prints_the_summary() -> None:
    out = TTY()
    renderer = TerminalProgress(out, FakeClock(), columns=60)
    renderer.update(active(16 * MIB, 48 * MIB))
    renderer.update(active(32 * MIB, 32 * MIB))
    renderer.update(COMPLETED)
    renderer.finish()
    text = out.getvalue()
    assert "\n" not in text[:-1]  # a single line until the summary
    draws = text.split("\r")[1:]
    assert len(draws) == 4  # three redraws and the erase before the summary
    for draw in draws[:3]:
        assert draw.endswith("\x1b[K")
        assert len(draw.removesuffix("\x1b[K")) <= 59  # never wraps
    assert draws[1].startswith("[##########----------]  50% active")
    assert (
        draws[3] == "\x1b[Kcompleted in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes\n"
    )


def test_terminal_progress_clear_is_a_no_op_before_the_first_draw() -> None:
    out = TTY()
    renderer = TerminalProgress(out, FakeClock())
    renderer.clear()
    assert out.getvalue() == ""


def test_json_progress_prints_one_document_at_the_end_only() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = JsonProgress(out, clock)
    renderer.update(active(16 * MIB, 48 * MIB))
    renderer.update(COMPLETED)
    assert out.getvalue() == ""
    clock.now += 2.5
    renderer.finish()
    document = json.loads(out.getvalue())
    assert document == {
        "status": "completed",
        "elapsed_s": 2.5,
        "total_time_ms": 2000,
        "setup_time_ms": 1,
        "downtime_ms": 12,
        "transferred_bytes": 64 * MIB,
        "total_bytes": 64 * MIB,
        "average_rate_bytes_per_s": 32 * MIB,
        "passes": 3,
        "error": None,
    }


def test_failed_migration_keeps_the_last_figures_and_qemus_error() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = JsonProgress(out, clock)
    renderer.update(active(16 * MIB, 48 * MIB, passes=1))
    clock.now += 2.0
    renderer.update(FAILED)
    renderer.finish()
    document = json.loads(out.getvalue())
    assert document["status"] == "failed"
    assert document["error"] == "Unable to write to socket: Broken pipe"
    assert document["transferred_bytes"] == 16 * MIB
    assert document["passes"] == 1
    assert document["total_time_ms"] is None
    # No total time from QEMU: the rate is over the time this command watched.
    assert document["average_rate_bytes_per_s"] == 8 * MIB


def test_an_explicit_error_wins_over_the_snapshot() -> None:
    summary = Summary.build(FAILED, 1.0, "cannot open websocket")
    assert summary.error == "cannot open websocket"


def test_summary_without_any_snapshot_says_none() -> None:
    summary = Summary.build(None, 0.25, "qmp socket unreachable")
    assert summary.status == "none"
    assert summary.transferred_bytes is None
    assert summary.text() == "none in 0.25 s: no RAM sent"


def test_summary_text_says_one_pass() -> None:
    info = MigrationInfo(status=MigrationStatus.COMPLETED, transferred=MIB, dirty_sync_count=1)
    assert Summary.build(info, 1.0).text() == "completed in 1.00 s: 1.0 MiB at 1.0 MiB/s, 1 pass"


def test_renderer_for_picks_json_then_terminal_then_lines() -> None:
    assert isinstance(renderer_for(TTY(), json_output=True), JsonProgress)
    assert isinstance(renderer_for(TTY(), json_output=False), TerminalProgress)
    assert isinstance(renderer_for(io.StringIO(), json_output=False), LineProgress)


def test_snapshot_document_carries_runstate_and_listeners() -> None:
    info = MigrationInfo(status=MigrationStatus.NONE, socket_addresses=("unix:/tmp/d.sock",))
    document = snapshot_document(info, "inmigrate")
    assert document["runstate"] == "inmigrate"
    assert document["status"] == "none"
    assert document["listening"] == ["unix:/tmp/d.sock"]
    json.dumps(document)  # serialisable as it is


# A migration without disks: the whole output, byte for byte, as it was before disks.


def play_ram_migration(renderer: ProgressRenderer, clock: FakeClock) -> None:
    renderer.update(MigrationInfo(status=MigrationStatus.SETUP))
    clock.now += 0.5
    renderer.update(active(16 * MIB, 48 * MIB, passes=1))
    clock.now += 1.0
    renderer.update(active(32 * MIB, 32 * MIB, passes=2))
    clock.now += 1.0
    renderer.update(COMPLETED)
    renderer.finish()


def test_terminal_output_without_disks_is_unchanged() -> None:
    out, clock = TTY(), FakeClock()
    play_ram_migration(TerminalProgress(out, clock), clock)
    # 80 columns: the figures that fit in 79 cells, each whole; the rest left out.
    assert out.getvalue() == (
        "\r[--------------------]   ?% setup  ? sent  ? left  ?  eta ?  dirty ?  pass ?\x1b[K"
        "\r[#####---------------]  25% active  16.0 MiB sent  48.0 MiB left  32.0 MiB/s\x1b[K"
        "\r[##########----------]  50% active  32.0 MiB sent  32.0 MiB left  32.0 MiB/s\x1b[K"
        "\r[####################] 100% completed  64.0 MiB sent  0 B left  40.0 MiB/s\x1b[K"
        "\r\x1b[Kcompleted in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes\n"
    )


def test_lines_output_without_disks_is_unchanged() -> None:
    out, clock = io.StringIO(), FakeClock()
    play_ram_migration(LineProgress(out, clock), clock)
    assert out.getvalue() == (
        "setup\n"
        "active  25% transferred 16.0 MiB remaining 48.0 MiB rate 32.0 MiB/s eta 1.50 s"
        " dirty 1.0 MiB/s pass 1\n"
        "active  50% transferred 32.0 MiB remaining 32.0 MiB rate 32.0 MiB/s eta 1.00 s"
        " dirty 1.0 MiB/s pass 2\n"
        "completed 100% transferred 64.0 MiB remaining 0 B rate 40.0 MiB/s eta 0.00 s"
        " dirty 0 B/s pass 3\n"
        "completed in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes\n"
    )


def test_json_output_without_disks_is_unchanged() -> None:
    out, clock = io.StringIO(), FakeClock()
    play_ram_migration(JsonProgress(out, clock), clock)
    assert out.getvalue() == (
        '{"status": "completed", "elapsed_s": 2.5, "total_time_ms": 2000, "setup_time_ms": 1,'
        ' "downtime_ms": 12, "transferred_bytes": 67108864, "total_bytes": 67108864,'
        ' "average_rate_bytes_per_s": 33554432.0, "passes": 3, "error": null}\n'
    )


def test_snapshot_document_without_disks_has_no_disks_key() -> None:
    assert list(snapshot_document(active(16 * MIB, 48 * MIB), "running")) == [
        "runstate",
        "status",
        "transferred_bytes",
        "remaining_bytes",
        "total_bytes",
        "rate_bytes_per_s",
        "dirty_pages_rate",
        "page_size",
        "passes",
        "expected_downtime_ms",
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "listening",
        "error",
    ]


# A migration with disks (--copy-storage): the disks are mirrored first, then RAM moves
# while the mirrors, ready, follow the guest's writes.


def mirror(
    disk: str,
    copied: int,
    total: int = 32 * MIB,
    status: str = "running",
    rate: float | None = 50 * MIB,
) -> DiskProgress:
    return DiskProgress(
        disk=disk, status=status, copied=copied, total=total, rate_bytes_per_s=rate
    )


def disk_phase(*disks: DiskProgress) -> MigrationInfo:
    """A snapshot while the disks are copied and the RAM migration has not started."""
    return MigrationInfo(status=MigrationStatus.NONE, disks=disks)


def with_disks(info: MigrationInfo, *disks: DiskProgress) -> MigrationInfo:
    return dataclasses.replace(info, disks=disks)


DISK0_READY = mirror("disk0", 32 * MIB, status="ready")
DISK1_READY = mirror("disk1", 48 * MIB, 48 * MIB, status="ready", rate=24 * MIB)

#: (seconds since the previous snapshot, snapshot): disk0 is copied in one second at
#: 32 MiB/s, disk1 (48 MiB) in two at 24 MiB/s; RAM then moves while the guest writes
#: 1 MiB to disk0, which its mirror follows.
STORAGE_MIGRATION: list[tuple[float, MigrationInfo]] = [
    (0.0, disk_phase(mirror("disk0", 0), mirror("disk1", 0, 48 * MIB, rate=None))),
    (
        0.5,
        disk_phase(mirror("disk0", 16 * MIB), mirror("disk1", 12 * MIB, 48 * MIB, rate=24 * MIB)),
    ),
    (0.5, disk_phase(DISK0_READY, mirror("disk1", 24 * MIB, 48 * MIB, rate=24 * MIB))),
    (1.0, disk_phase(DISK0_READY, DISK1_READY)),
    (0.2, with_disks(MigrationInfo(status=MigrationStatus.SETUP), DISK0_READY, DISK1_READY)),
    (
        1.0,
        with_disks(
            active(32 * MIB, 32 * MIB),
            mirror("disk0", 33 * MIB, 33 * MIB, status="ready"),
            DISK1_READY,
        ),
    ),
    (
        1.0,
        with_disks(
            COMPLETED,
            mirror("disk0", 33 * MIB, 33 * MIB, status="concluded"),
            mirror("disk1", 48 * MIB, 48 * MIB, status="concluded"),
        ),
    ),
]


def play(
    renderer: ProgressRenderer, clock: FakeClock, snapshots: list[tuple[float, MigrationInfo]]
) -> None:
    for seconds, info in snapshots:
        clock.now += seconds
        renderer.update(info)


def test_disk_line_while_copying_ready_and_done() -> None:
    assert disk_line(mirror("disk0", 12 * MIB)) == (
        "disk disk0: 38% copied 12.0 MiB of 32.0 MiB rate 50.0 MiB/s eta 0.40 s"
    )
    assert disk_line(DISK0_READY) == "disk disk0: ready, 32.0 MiB copied, following writes"
    assert disk_line(mirror("disk0", 32 * MIB, status="concluded")) == (
        "disk disk0: done, 32.0 MiB copied"
    )


def test_disk_line_names_an_unusual_status_and_leaves_out_unknown_figures() -> None:
    assert disk_line(mirror("disk0", 0, 0, status="created", rate=None)) == (
        "disk disk0: created copied 0 B of 0 B"
    )
    assert disk_line(mirror("disk0", 8 * MIB, status="paused", rate=None)) == (
        "disk disk0: paused 25% copied 8.0 MiB of 32.0 MiB"
    )


def test_disk_bar_is_as_wide_as_the_ram_bar() -> None:
    assert disk_bar_line(mirror("disk0", 16 * MIB)) == (
        "[##########----------]  50% disk0  16.0 MiB of 32.0 MiB  50.0 MiB/s  eta 0.32 s"
    )
    assert disk_bar_line(DISK0_READY) == (
        "[####################] 100% disk0  ready  32.0 MiB, following writes"
    )
    assert disk_bar_line(mirror("disk0", 0, 0, rate=None)) == (
        "[--------------------]   ?% disk0  0 B of 0 B  ?  eta ?"
    )


class Screen:
    """What a terminal shows after the text `TerminalProgress` writes to it.

    It plays the only controls the renderer may use: ``\\r``, ``\\n``, erase to the end
    of the line and cursor up; any other escape fails the test.
    """

    _TOKEN = re.compile(r"\x1b\[(\d*)([AK])|(\r)|(\n)|([^\x1b\r\n]+)|(.)", re.DOTALL)

    def __init__(self) -> None:
        # A command line already on the screen: the block must never climb over it.
        self.rows = ["$ migrelay migrate --copy-storage", ""]
        self.row, self.col = 1, 0

    def play(self, text: str) -> None:
        for match in self._TOKEN.finditer(text):
            count, command, cr, newline, printable, other = match.groups()
            assert other is None, f"unexpected control {other!r}"
            if command == "A":
                self.row = max(self.row - int(count or "1"), 0)
            elif command == "K":
                self.rows[self.row] = self.rows[self.row][: self.col]
            elif cr:
                self.col = 0
            elif newline:
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.rows):
                    self.rows.append("")
            elif printable:
                line = self.rows[self.row].ljust(self.col)
                self.rows[self.row] = (
                    line[: self.col] + printable + line[self.col + len(printable) :]
                )
                self.col += len(printable)

    def shown(self) -> list[str]:
        """The rows below the command line, without the empty ones at the bottom."""
        rows = self.rows[1:]
        while rows and not rows[-1]:
            rows.pop()
        return rows


def test_terminal_draws_a_line_per_disk_and_redraws_them_in_place() -> None:
    out, clock, screen = TTY(), FakeClock(), Screen()
    renderer = TerminalProgress(out, clock, columns=60)
    written = 0
    screens: list[list[str]] = []
    for seconds, info in STORAGE_MIGRATION:
        clock.now += seconds
        renderer.update(info)
        draw = out.getvalue()[written:]
        written = len(out.getvalue())
        for line in re.split(r"\n", draw):
            # What lands on a row, escapes aside, never wraps.
            assert len(re.sub(r"\x1b\[\d*[AK]|\r", "", line)) <= 59
        if screens:  # every redraw goes back up to the block's first line
            assert draw.startswith("\x1b[2A\r")
        screen.play(draw)
        screens.append(screen.shown())
        assert len(screens[-1]) == 3  # disk0, disk1, ram
        assert all(len(row) <= 59 for row in screens[-1])
    first, ready, ram = screens[0], screens[3], screens[5]
    # Each line with the figures that fit whole in the 59 cells of this terminal.
    assert first == [
        "[--------------------]   0% disk0  0 B of 32.0 MiB",
        "[--------------------]   0% disk1  0 B of 48.0 MiB  ?",
        "ram: waits for the disks",
    ]
    assert ready == [
        "[####################] 100% disk0  ready",
        "[####################] 100% disk1  ready",
        "ram: waits for the disks",
    ]
    assert ram[2].startswith("[##########----------]  50% active  32.0 MiB sent")
    assert screens[1][0].startswith("[##########----------]  50% disk0  16.0 MiB of 32.0 MiB")
    renderer.finish()
    screen.play(out.getvalue()[written:])
    # The summary takes the first line of the block; the other two are erased.
    assert screen.shown() == [
        "completed in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes;"
        " disks: disk0 33.0 MiB, disk1 48.0 MiB copied"
    ]
    assert out.getvalue()[written:].startswith("\r\x1b[K\x1b[1A\r\x1b[K\x1b[1A\r\x1b[K")


def test_terminal_clear_erases_every_line_it_drew() -> None:
    out, screen = TTY(), Screen()
    renderer = TerminalProgress(out, FakeClock(), columns=60)
    renderer.update(disk_phase(mirror("disk0", 0), mirror("disk1", 0)))
    renderer.clear()
    screen.play(out.getvalue())
    assert screen.shown() == []
    assert (screen.row, screen.col) == (1, 0)  # where the block began
    renderer.clear()  # nothing more to erase
    assert out.getvalue().count("\x1b[K") == 3 + 3


def test_terminal_erases_the_lines_a_shorter_redraw_no_longer_uses() -> None:
    out, screen = TTY(), Screen()
    renderer = TerminalProgress(out, FakeClock(), columns=60)
    renderer.update(disk_phase(mirror("disk0", 0), mirror("disk1", 0)))
    renderer.update(FAILED)  # a final snapshot that no longer lists the disks
    screen.play(out.getvalue())
    assert screen.shown() == [bar_line(FAILED, width=59)]
    drawn = len(out.getvalue())
    renderer.finish()
    screen.play(out.getvalue()[drawn:])
    assert screen.shown() == [
        "failed in 0.00 s: no RAM sent; disks: disk0 0 B of 32.0 MiB, disk1 0 B of 32.0 MiB copied"
    ]


def test_lines_give_each_disk_a_line_and_ram_its_line_once_it_started() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = LineProgress(out, clock)
    play(renderer, clock, STORAGE_MIGRATION)
    renderer.finish()
    assert out.getvalue().splitlines() == [
        # t=0: the first snapshot
        "disk disk0: 0% copied 0 B of 32.0 MiB rate 50.0 MiB/s eta 0.64 s",
        "disk disk1: 0% copied 0 B of 48.0 MiB",
        # t=0.5: not a second later, no status changed: nothing
        # t=1.0: a second later, and disk0 turned ready
        "disk disk0: ready, 32.0 MiB copied, following writes",
        "disk disk1: 50% copied 24.0 MiB of 48.0 MiB rate 24.0 MiB/s eta 1.00 s",
        # t=2.0: disk1 turned ready
        "disk disk0: ready, 32.0 MiB copied, following writes",
        "disk disk1: ready, 48.0 MiB copied, following writes",
        # t=2.2: the RAM migration started
        "disk disk0: ready, 32.0 MiB copied, following writes",
        "disk disk1: ready, 48.0 MiB copied, following writes",
        "setup",
        # t=3.2
        "disk disk0: ready, 33.0 MiB copied, following writes",
        "disk disk1: ready, 48.0 MiB copied, following writes",
        "active  50% transferred 32.0 MiB remaining 32.0 MiB rate 32.0 MiB/s eta 1.00 s"
        " dirty 1.0 MiB/s pass 1",
        # t=4.2
        "disk disk0: done, 33.0 MiB copied",
        "disk disk1: done, 48.0 MiB copied",
        "completed 100% transferred 64.0 MiB remaining 0 B rate 40.0 MiB/s eta 0.00 s"
        " dirty 0 B/s pass 3",
        "completed in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes;"
        " disks: disk0 33.0 MiB, disk1 48.0 MiB copied",
    ]


def test_lines_print_at_once_when_a_disk_turns_ready() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = LineProgress(out, clock)
    renderer.update(disk_phase(mirror("disk0", 30 * MIB)))
    clock.now += 0.1
    renderer.update(disk_phase(mirror("disk0", 31 * MIB)))  # too soon: skipped
    clock.now += 0.1
    renderer.update(disk_phase(DISK0_READY))  # ready: printed at once
    assert out.getvalue().splitlines() == [
        "disk disk0: 94% copied 30.0 MiB of 32.0 MiB rate 50.0 MiB/s eta 0.04 s",
        "disk disk0: ready, 32.0 MiB copied, following writes",
    ]


def test_json_lists_the_disks_with_their_average_rate_until_ready() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = JsonProgress(out, clock)
    play(renderer, clock, STORAGE_MIGRATION)
    assert out.getvalue() == ""
    renderer.finish()
    document = json.loads(out.getvalue())
    # The keys of a migration without disks, in their order, then the disks.
    assert list(document) == [
        "status",
        "elapsed_s",
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "transferred_bytes",
        "total_bytes",
        "average_rate_bytes_per_s",
        "passes",
        "error",
        "disks",
    ]
    assert document["status"] == "completed"
    assert document["elapsed_s"] == pytest.approx(4.2)
    assert document["disks"] == [
        # 32 MiB from t=0 to ready at t=1; the 1 MiB it followed afterwards is the
        # guest's pace, not the copy's, and is left out of the rate.
        {
            "disk": "disk0",
            "status": "concluded",
            "copied_bytes": 33 * MIB,
            "total_bytes": 33 * MIB,
            "average_rate_bytes_per_s": 32 * MIB,
        },
        {
            "disk": "disk1",
            "status": "concluded",
            "copied_bytes": 48 * MIB,
            "total_bytes": 48 * MIB,
            "average_rate_bytes_per_s": 24 * MIB,
        },
    ]


def test_a_disk_that_never_got_ready_is_averaged_until_last_seen() -> None:
    out, clock = io.StringIO(), FakeClock()
    renderer = JsonProgress(out, clock)
    renderer.update(disk_phase(mirror("disk0", 4 * MIB)))  # already under way when first seen
    clock.now += 2.0
    renderer.update(disk_phase(mirror("disk0", 12 * MIB)))
    clock.now += 0.5
    renderer.update(FAILED)  # the final snapshot no longer lists the disks
    summary = renderer.finish("mirror of disk0 failed")
    assert summary.disks == (DiskSummary("disk0", "running", 12 * MIB, 32 * MIB, 4 * MIB),)
    assert json.loads(out.getvalue())["disks"][0]["average_rate_bytes_per_s"] == 4 * MIB
    assert summary.text().endswith("; disks: disk0 12.0 MiB of 32.0 MiB copied")


def test_a_disk_first_seen_ready_has_no_average() -> None:
    renderer = JsonProgress(io.StringIO(), FakeClock())
    renderer.update(disk_phase(DISK0_READY))
    assert renderer.summary().disks[0].average_rate_bytes_per_s is None


def test_summary_text_names_the_disks_copied() -> None:
    disks = (
        DiskSummary("disk0", "concluded", 32 * MIB, 32 * MIB, 32 * MIB),
        DiskSummary("disk1", "ready", 48 * MIB, 48 * MIB, 24 * MIB),
    )
    assert Summary.build(COMPLETED, 2.0, disks=disks).text() == (
        "completed in 2.00 s: 64.0 MiB at 32.0 MiB/s, downtime 12 ms, 3 passes;"
        " disks: disk0 32.0 MiB, disk1 48.0 MiB copied"
    )


def test_snapshot_document_lists_the_disks_when_there_are_some() -> None:
    info = with_disks(active(16 * MIB, 48 * MIB), DISK0_READY, mirror("disk1", 8 * MIB, 48 * MIB))
    document = snapshot_document(info, "running")
    assert list(document)[-1] == "disks"
    assert document["disks"] == [
        {
            "disk": "disk0",
            "status": "ready",
            "copied_bytes": 32 * MIB,
            "total_bytes": 32 * MIB,
            "rate_bytes_per_s": 50 * MIB,
        },
        {
            "disk": "disk1",
            "status": "running",
            "copied_bytes": 8 * MIB,
            "total_bytes": 48 * MIB,
            "rate_bytes_per_s": 50 * MIB,
        },
    ]
    json.dumps(document)


# -- the convergence policy, the throttle and the bytes on the wire ----------------------


def busy(throttle: int | None = 40) -> MigrationInfo:
    return dataclasses.replace(
        active(200 * MIB, 20 * MIB, passes=9),
        convergence="not converging",
        throttle_percent=throttle,
        downtime_limit_ms=775,
        wire_bytes=150 * MIB,
    )


def test_the_lines_and_the_bar_say_what_the_policy_does_and_the_bytes_on_the_wire() -> None:
    line = progress_line(busy())
    assert line.startswith("active, not converging, throttle 40%, downtime limit 775 ms ")
    assert line.endswith("pass 9 wire 150.0 MiB")
    bar = bar_line(busy(throttle=None))
    assert "active, not converging, downtime limit 775 ms  " in bar
    assert bar.endswith("pass 9  wire 150.0 MiB")
    # A migration the policy has nothing to say about looks as before.
    assert progress_line(active(1 * MIB, 63 * MIB)).startswith("active  ")
    assert snapshot_document(busy())["throttle_percent"] == 40


def test_the_summary_keeps_the_wire_bytes_the_most_throttle_and_the_policy_word() -> None:
    clock = FakeClock()
    renderer = JsonProgress(io.StringIO(), clock)
    renderer.update(busy(throttle=60))
    renderer.update(busy(throttle=30))
    cancelled = MigrationInfo(status=MigrationStatus.CANCELLED, convergence="not converging")
    renderer.update(cancelled)
    summary = renderer.finish("not converging: …")
    document = json.loads(summary.to_json())
    assert document["wire_bytes"] == 150 * MIB
    assert document["max_throttle_percent"] == 60
    assert document["convergence"] == "not converging"
    assert summary.text().endswith(
        ", 150.0 MiB on the wire, guest throttled up to 60% (not converging)"
    )
    # A plain migration's document keeps exactly its keys.
    plain = JsonProgress(io.StringIO(), clock)
    plain.update(COMPLETED)
    assert set(json.loads(plain.finish().to_json())) == {
        "status", "elapsed_s", "total_time_ms", "setup_time_ms", "downtime_ms",
        "transferred_bytes", "total_bytes", "average_rate_bytes_per_s", "passes", "error",
    }  # fmt: skip


def test_a_completed_summary_says_who_does_what_and_a_failed_one_does_not() -> None:
    clock = FakeClock()
    renderer = LineProgress(io.StringIO(), clock)
    renderer.aftermath = "source stopped (postmigrate)"
    renderer.update(COMPLETED)
    summary = renderer.finish()
    assert summary.text().endswith("3 passes; source stopped (postmigrate)")
    assert json.loads(summary.to_json())["aftermath"] == "source stopped (postmigrate)"
    failed = LineProgress(io.StringIO(), clock)
    failed.aftermath = "source stopped (postmigrate)"
    failed.update(FAILED)
    assert "source stopped" not in failed.finish().text()
