"""The ``Migrelay-Migration`` handshake header (`migrelay.control.commands`)."""

from __future__ import annotations

import pytest

from migrelay.control.commands import announcement, parse_announcement, resume_announcement
from migrelay.control.migration import MigrationOptions


@pytest.mark.parametrize(
    "options",
    [
        MigrationOptions(),
        MigrationOptions(multifd_channels=4),
        MigrationOptions(postcopy=True),
        MigrationOptions(multifd_channels=255, postcopy=True),
    ],
)
def test_announcement_round_trips_the_shared_capabilities(options: MigrationOptions) -> None:
    assert parse_announcement(announcement(options)) == options


def test_announcement_spells_both_keys() -> None:
    assert announcement(MigrationOptions(multifd_channels=4)) == "multifd=4,postcopy=0"
    assert announcement(MigrationOptions()) == "multifd=0,postcopy=0"


def test_source_limits_are_not_announced() -> None:
    # Bandwidth and downtime are the source's own business; QEMU does not compare them.
    options = MigrationOptions(max_bandwidth=1024, downtime_limit_ms=50)
    assert parse_announcement(announcement(options)) == MigrationOptions()


def test_no_header_means_the_defaults() -> None:
    assert parse_announcement(None) == MigrationOptions()


def test_spaces_around_items_are_accepted() -> None:
    assert parse_announcement(" multifd = 2 , postcopy=1 ") == MigrationOptions(
        multifd_channels=2, postcopy=True
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("multifd", "'multifd' is not key=number"),
        ("multifd=four", "'multifd=four' is not key=number"),
        ("multifd=4,xbzrle=1", "unknown capability 'xbzrle'"),
        ("postcopy=2", "postcopy must be 0 or 1, not 2"),
        ("multifd=256", "multifd channels must be 1..255, got 256"),
        ("multifd=1," * 40, "longer than 200 characters"),
    ],
)
def test_a_bad_announcement_is_refused_with_the_reason(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_announcement(value)


@pytest.mark.parametrize(
    ("postcopy", "running", "keep_paused", "resume"),
    [
        (False, True, False, None),  # precopy: QEMU carries the source's runstate
        (False, False, False, None),
        (False, True, True, False),
        (True, True, False, True),  # postcopy carries none: say it
        (True, False, False, False),
        (True, True, True, False),
    ],
)
def test_resume_is_announced_when_the_destination_cannot_know(
    postcopy: bool, running: bool, keep_paused: bool, resume: bool | None
) -> None:
    options = MigrationOptions(postcopy=postcopy)
    assert resume_announcement(options, running, keep_paused) is resume
