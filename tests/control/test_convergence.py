"""The convergence policy (`migrelay.control.convergence`), fed made-up snapshots.

The end-to-end runs with a real busy guest are in tests/e2e/test_convergence.py; here
each rule is checked on its own, with its documented default.
"""

from __future__ import annotations

import pytest

from migrelay.control.convergence import (
    ASSUMED_LINK_RATE,
    DEFAULT_MAX_DOWNTIME_MS,
    MAX_DOWNTIME_LIMIT_MS,
    WINDOW_PASSES,
    Cancel,
    ConvergencePolicy,
    ConvergenceWatch,
    DowntimeSteps,
    OnTimeout,
    SetDowntime,
    StartPostcopy,
    default_timeout,
)
from migrelay.control.qmp import MigrationInfo, MigrationStatus
from migrelay.units import GIB, MIB

PAGE = 4096


def snapshot(
    passes: int,
    remaining: int,
    *,
    status: MigrationStatus = MigrationStatus.ACTIVE,
    dirty_bytes_per_s: int = 60 * MIB,
    rate: float = 12 * MIB,
) -> MigrationInfo:
    return MigrationInfo(
        status=status,
        transferred=passes * 100 * MIB,
        remaining=remaining,
        total=256 * MIB,
        rate_bytes_per_s=rate,
        dirty_pages_rate=dirty_bytes_per_s // PAGE,
        dirty_sync_count=passes,
        page_size=PAGE,
    )


def feed(watch: ConvergenceWatch, sizes: list[int], start: float = 0.0) -> list[object]:
    """One snapshot per pass (pass 1 is all of RAM), a second apart; every action."""
    actions: list[object] = []
    for number, size in enumerate(sizes, start=1):
        actions += watch.observe(snapshot(number, size), start + number)
    return actions


def test_the_default_deadline_grows_with_ram_disks_and_a_slow_limit() -> None:
    assert default_timeout(1 * GIB) == pytest.approx(60 + 2 * 64)  # 188 s
    assert default_timeout(1 * GIB, 1 * GIB) == pytest.approx(60 + 4 * 64)
    # A --max-bandwidth below the assumed link rate lengthens it; above, it does not.
    assert default_timeout(1 * GIB, 0, 8 * MIB) == pytest.approx(60 + 2 * 128)
    assert default_timeout(1 * GIB, 0, 1 * GIB) == default_timeout(1 * GIB)
    assert ASSUMED_LINK_RATE == 16 * MIB
    policy = ConvergencePolicy().with_default_timeout(1 * GIB)
    assert policy.deadline_s == pytest.approx(188)
    assert ConvergencePolicy(timeout_s=5).with_default_timeout(1 * GIB).deadline_s == 5


def test_downtime_steps_rise_geometrically_to_the_ceiling() -> None:
    assert DowntimeSteps().limits() == [482, 775, 1245, DEFAULT_MAX_DOWNTIME_MS]
    assert DowntimeSteps(start_ms=300, ceiling_ms=1000).limits()[-1] == 1000
    assert DowntimeSteps(start_ms=3000).limits() == []  # already above the ceiling
    assert DowntimeSteps(steps=0).limits() == []


def test_a_shrinking_dirty_set_is_left_alone() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=1000), 0.0)
    sizes = [256 * MIB, 64 * MIB, 40 * MIB, 20 * MIB, 9 * MIB, 4 * MIB, 2 * MIB]
    assert feed(watch, sizes) == []
    assert watch.describe() is None


def test_a_dirty_set_that_does_not_shrink_raises_the_downtime_limit_step_by_step() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=1000), 0.0)
    # Pass 1 is RAM, pass 2 the best; WINDOW_PASSES more that do not shrink: stalled.
    sizes = [256 * MIB] + [64 * MIB] * (WINDOW_PASSES + 2)
    actions = feed(watch, sizes)
    assert len(actions) == 1
    step = actions[0]
    assert isinstance(step, SetDowntime) and step.limit_ms == 482
    assert step.reason.startswith("not converging: the guest dirties 60.0 MiB/s")
    assert "the link carries 12.0 MiB/s" in step.reason
    assert watch.describe() == "not converging"
    # One step per pass, never two in the same pass, up to the ceiling and no further.
    assert watch.observe(snapshot(len(sizes), 30 * MIB), 50.0) == []
    limits = []
    for number in range(len(sizes) + 1, len(sizes) + 8):
        for action in watch.observe(snapshot(number, 64 * MIB), float(number)):
            assert isinstance(action, SetDowntime)
            limits.append(action.limit_ms)
    assert limits == [775, 1245, 2000]
    assert watch.raised and watch.downtime_limit_ms == 2000


def test_at_the_deadline_the_default_cancels_and_names_the_cause() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=30), 100.0)
    feed(watch, [256 * MIB] + [64 * MIB] * 5, start=100.0)
    actions = watch.observe(snapshot(7, 64 * MIB), 130.0)
    assert len(actions) == 1 and isinstance(actions[0], Cancel)
    reason = actions[0].reason
    assert reason.startswith("not converging: the guest dirties 60.0 MiB/s, the link carries")
    assert actions[0].verdict == "not converging"
    assert reason.endswith(
        "cancelled at the 30 s deadline (--timeout); the source vm runs on as it was"
    )


def test_a_slow_migration_that_converges_still_ends_at_its_deadline() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=10), 0.0)
    actions = watch.observe(snapshot(1, 200 * MIB), 11.0)
    assert len(actions) == 1 and isinstance(actions[0], Cancel)
    assert actions[0].reason.startswith("not completed: 100.0 MiB sent in pass 1, 200.0 MiB left")
    assert actions[0].verdict == "deadline"  # not "not converging": it never stalled


def test_with_postcopy_a_stall_switches_at_once_and_the_deadline_no_longer_applies() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=30, postcopy=True), 0.0)
    actions = feed(watch, [256 * MIB] + [64 * MIB] * (WINDOW_PASSES + 2))
    assert len(actions) == 1 and isinstance(actions[0], StartPostcopy)
    assert actions[0].reason.startswith("not converging")
    assert watch.describe() == "postcopy"
    late = snapshot(9, 64 * MIB, status=MigrationStatus.POSTCOPY_ACTIVE)
    assert watch.observe(late, 1000.0) == []


def test_with_postcopy_the_deadline_switches_a_migration_that_has_not_stalled() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=30, postcopy=True), 0.0)
    actions = watch.observe(snapshot(1, 200 * MIB), 31.0)
    assert actions == [StartPostcopy("precopy reached the 30 s deadline (--timeout)")]


def test_on_timeout_pause_lifts_the_downtime_limit_once() -> None:
    policy = ConvergencePolicy(timeout_s=10, on_timeout=OnTimeout.PAUSE)
    watch = ConvergenceWatch(policy, 0.0)
    actions = watch.observe(snapshot(3, 64 * MIB), 10.0)
    assert len(actions) == 1 and isinstance(actions[0], SetDowntime)
    assert actions[0].limit_ms == MAX_DOWNTIME_LIMIT_MS
    assert watch.observe(snapshot(4, 64 * MIB), 11.0) == []


def test_on_timeout_postcopy_needs_postcopy() -> None:
    with pytest.raises(ValueError, match="needs --postcopy"):
        ConvergencePolicy(timeout_s=10, on_timeout=OnTimeout.POSTCOPY)
    with pytest.raises(ValueError, match="timeout must be positive"):
        ConvergencePolicy(timeout_s=0)


def test_the_cause_names_the_last_finished_pass_and_the_last_measured_rate() -> None:
    watch = ConvergenceWatch(ConvergencePolicy(timeout_s=1000), 0.0)
    feed(watch, [256 * MIB] + [64 * MIB] * (WINDOW_PASSES + 2))
    # A pass just begun, in which QEMU has measured no dirty rate yet.
    watch.observe(snapshot(7, 1 * MIB, dirty_bytes_per_s=0), 7.0)
    assert watch.cause() == (
        "the guest dirties 60.0 MiB/s, the link carries 12.0 MiB/s; each pass resends"
        " ~64.0 MiB, which would pause the guest ~5.33 s"
    )
