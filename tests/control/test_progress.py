"""Progress rendering (`migrelay.control.progress`): every form, from typed snapshots."""

from __future__ import annotations

import io
import json

import pytest

from migrelay.control.progress import (
    JsonProgress,
    LineProgress,
    Summary,
    TerminalProgress,
    bar_line,
    eta_seconds,
    progress_line,
    renderer_for,
    snapshot_document,
)
from migrelay.control.qmp import MigrationInfo, MigrationStatus

MIB = 1024 * 1024


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
    assert summary.text() == "none in 0.25 s: ? at ?"


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
