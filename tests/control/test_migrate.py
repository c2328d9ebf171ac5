"""`migrelay.control.migration` against a fake QMP server: exact command sequences, errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    Progress,
    cancel_outgoing,
    check_prepared_for,
    follow_migration,
    prepare_incoming,
    require,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, UNLIMITED_BANDWIDTH, MigrationStatus, RunState
from migrelay.errors import MigrationError, StateError, UnsupportedError
from tests.control.fake_qmp import QEMU_7_2_CAPABILITIES, FakeQMP, QMPFail, Reply, against
from tests.helpers import FACTOR
from tests.loops import AsyncRunner


def status(state: str) -> dict[str, object]:
    return {"status": state, "running": state == "running"}


def test_require_names_state_and_required_state(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"query-status": status("postmigrate")})

    async def body(qmp: QMP) -> None:
        with pytest.raises(StateError) as info:
            await require(qmp, RunState.RUNNING)
        assert info.value.state is RunState.POSTMIGRATE
        assert str(info.value) == "state is postmigrate, but running is required"
        assert await require(qmp, {RunState.POSTMIGRATE, RunState.PAUSED}) is RunState.POSTMIGRATE

    run_async(against(fake, sock_dir, body))


def test_prepare_incoming_refuses_a_vm_not_started_with_incoming(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-status": status("running")})

    async def body(qmp: QMP) -> None:
        with pytest.raises(StateError) as info:
            await prepare_incoming(qmp, "unix:/tmp/x.sock", MigrationOptions())
        assert str(info.value) == (
            "state is running, but inmigrate is required:"
            " start the destination qemu with -incoming defer to receive a migration"
        )

    run_async(against(fake, sock_dir, body))
    assert fake.commands == ["query-status"]  # nothing changed


def test_prepare_incoming_refuses_a_vm_that_already_listens(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    listening = {"socket-address": [{"type": "inet", "host": "0.0.0.0", "port": "4444"}]}
    fake = FakeQMP(replies={"query-status": status("inmigrate"), "query-migrate": listening})

    async def body(qmp: QMP) -> None:
        with pytest.raises(StateError, match=r"already listening on tcp:0\.0\.0\.0:4444"):
            await prepare_incoming(qmp, "unix:/tmp/x.sock", MigrationOptions())

    run_async(against(fake, sock_dir, body))
    assert fake.commands == ["query-status", "query-migrate"]


def test_prepare_incoming_sets_the_source_capabilities_then_listens(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    after = {"socket-address": [{"type": "unix", "path": "/tmp/x.sock"}]}
    fake = FakeQMP(replies={"query-status": status("inmigrate"), "query-migrate": [{}, after]})

    async def body(qmp: QMP) -> None:
        info = await prepare_incoming(
            qmp, "unix:/tmp/x.sock", MigrationOptions(multifd_channels=4, postcopy=True)
        )
        assert info.socket_addresses == ("unix:/tmp/x.sock",)

    run_async(against(fake, sock_dir, body))
    assert fake.received == [
        ("query-status", {}),
        ("query-migrate", {}),
        ("query-migrate-capabilities", {}),
        (
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "multifd", "state": True},
                    {"capability": "postcopy-ram", "state": True},
                ]
            },
        ),
        ("migrate-set-parameters", {"multifd-channels": 4}),
        # A QEMU that reports no multifd-compression (this fake) compresses nothing.
        ("query-migrate-parameters", {}),
        ("migrate-incoming", {"uri": "unix:/tmp/x.sock"}),
        ("query-migrate", {}),
    ]


def test_start_migration_lifts_the_default_bandwidth_limit(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-status": status("running"), "query-migrate": {}})

    async def body(qmp: QMP) -> None:
        await start_migration(qmp, "tcp:10.0.0.2:4444", MigrationOptions())

    run_async(against(fake, sock_dir, body))
    assert fake.received[2:] == [
        ("query-migrate-capabilities", {}),
        (
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "multifd", "state": False},
                    {"capability": "postcopy-ram", "state": False},
                    # Off on purpose: a reused VM keeps what an earlier run set.
                    {"capability": "xbzrle", "state": False},
                    {"capability": "auto-converge", "state": False},
                    {"capability": "return-path", "state": False},
                    # A VM that kept this on from an earlier storage migration would
                    # wait in pre-switchover for good.
                    {"capability": "pause-before-switchover", "state": False},
                ]
            },
        ),
        # The downtime limit explicitly QEMU's default: the convergence policy may
        # have raised it in an earlier migration of this VM.
        ("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 300}),
        ("migrate", {"uri": "tcp:10.0.0.2:4444"}),
    ]


#: What QEMU 3.1 lists: no multifd yet (it came in 4.0 as x-multifd before that).
QEMU_3_1_CAPABILITIES = [c for c in QEMU_7_2_CAPABILITIES if c["capability"] != "multifd"]
QEMU_3_1_VERSION = {"qemu": {"major": 3, "minor": 1, "micro": 0}, "package": ""}


def test_a_qemu_without_multifd_is_told_so_before_anything_changes(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    """Fake QMP only: a QEMU 3.1 (no multifd) cannot run here; only 7.2 installs
    (Debian), so the fake plays the old QEMU's capability list and version."""
    fake = FakeQMP(
        replies={
            "query-status": status("running"),
            "query-migrate": {},
            "query-migrate-capabilities": [QEMU_3_1_CAPABILITIES],
            "query-version": QEMU_3_1_VERSION,
        }
    )

    async def body(qmp: QMP) -> None:
        with pytest.raises(UnsupportedError) as info:
            await start_migration(qmp, "unix:/tmp/s.sock", MigrationOptions(multifd_channels=4))
        assert (
            str(info.value) == "qemu 3.1.0 of vm cannot migrate with multifd (qemu 4.0 or later)"
        )

    run_async(against(fake, sock_dir, body))
    assert "migrate-set-capabilities" not in fake.commands
    assert "migrate" not in fake.commands


def test_a_capability_the_qemu_lacks_is_left_out_when_it_is_off(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    """Fake QMP only: QEMU 3.1 played by the fake (only 7.2 installs here)."""
    # The same QEMU 3.1 migrates without multifd: "multifd off" is not sent at all.
    fake = FakeQMP(
        replies={
            "query-status": status("running"),
            "query-migrate": {},
            "query-migrate-capabilities": [QEMU_3_1_CAPABILITIES],
        }
    )

    async def body(qmp: QMP) -> None:
        await start_migration(qmp, "unix:/tmp/s.sock", MigrationOptions())

    run_async(against(fake, sock_dir, body))
    assert (
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": False},
                {"capability": "xbzrle", "state": False},
                {"capability": "auto-converge", "state": False},
                {"capability": "return-path", "state": False},
                {"capability": "pause-before-switchover", "state": False},
            ]
        },
    ) in fake.received
    assert fake.commands[-1] == "migrate"


def capabilities(**on: bool) -> list[dict[str, object]]:
    return [
        {"capability": c["capability"], "state": on.get(str(c["capability"]), False)}
        for c in QEMU_7_2_CAPABILITIES
    ]


@pytest.mark.parametrize(
    ("listening", "channels", "announced", "message"),
    [
        (
            {},
            2,
            MigrationOptions(multifd_channels=4),
            "state is listening with no multifd, no postcopy, but multifd 4 channels,"
            " no postcopy (as the source announced)",
        ),
        (
            {"multifd": True},
            2,
            MigrationOptions(multifd_channels=4),
            "state is listening with multifd 2 channels, no postcopy, but multifd 4"
            " channels, no postcopy (as the source announced)",
        ),
        (
            {"multifd": True, "postcopy-ram": True},
            4,
            MigrationOptions(),
            "state is listening with multifd 4 channels, postcopy, but no multifd,"
            " no postcopy (as the source announced)",
        ),
    ],
    ids=["multifd-only-at-source", "channel-counts-differ", "multifd-and-postcopy-only-here"],
)
def test_a_destination_prepared_otherwise_than_announced_is_refused_in_one_sentence(
    run_async: AsyncRunner,
    sock_dir: Path,
    listening: dict[str, bool],
    channels: int,
    announced: MigrationOptions,
    message: str,
) -> None:
    fake = FakeQMP(
        replies={
            "query-migrate-capabilities": [capabilities(**listening)],
            "query-migrate-parameters": {"multifd-channels": channels},
        }
    )

    async def body(qmp: QMP) -> None:
        with pytest.raises(StateError) as info:
            await check_prepared_for(qmp, announced)
        assert str(info.value) == (
            f"{message} is required:"
            " prepare the destination with the same --multifd, --compress and --postcopy"
            " as migrate"
        )

    run_async(against(fake, sock_dir, body))


def test_a_destination_prepared_as_announced_passes(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(
        replies={
            "query-migrate-capabilities": [capabilities(multifd=True, events=True)],
            "query-migrate-parameters": {"multifd-channels": 4},
        }
    )

    async def body(qmp: QMP) -> None:
        await check_prepared_for(qmp, MigrationOptions(multifd_channels=4))

    run_async(against(fake, sock_dir, body))
    assert fake.commands == ["query-migrate-capabilities", "query-migrate-parameters"]


def test_start_migration_keeps_given_limits(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"query-status": status("paused"), "query-migrate": {}})
    options = MigrationOptions(multifd_channels=2, max_bandwidth=1000, downtime_limit_ms=50)

    async def body(qmp: QMP) -> None:
        await start_migration(qmp, "unix:/tmp/s.sock", options)

    run_async(against(fake, sock_dir, body))
    assert (
        "migrate-set-parameters",
        {"multifd-channels": 2, "max-bandwidth": 1000, "downtime-limit": 50},
    ) in fake.received


def test_start_migration_refuses_an_incoming_vm(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"query-status": status("inmigrate")})

    async def body(qmp: QMP) -> None:
        with pytest.raises(StateError, match=r"^state is inmigrate, but paused or postmigrate"):
            await start_migration(qmp, "unix:/tmp/s.sock", MigrationOptions())

    run_async(against(fake, sock_dir, body))
    assert fake.commands == ["query-status"]


def test_start_migration_refuses_while_a_migration_runs(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(
        replies={"query-status": status("running"), "query-migrate": {"status": "active"}}
    )

    async def body(qmp: QMP) -> None:
        with pytest.raises(StateError, match=r"^state is migration active"):
            await start_migration(qmp, "unix:/tmp/s.sock", MigrationOptions())

    run_async(against(fake, sock_dir, body))
    assert "migrate" not in fake.commands


def _ram(transferred: int, remaining: int, passes: int) -> dict[str, object]:
    return {
        "total": 64 << 20,
        "transferred": transferred,
        "remaining": remaining,
        "mbps": 800.0,
        "dirty-sync-count": passes,
        "dirty-pages-rate": 0,
    }


def test_follow_migration_reports_every_snapshot_and_the_result(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    sequence: list[Reply] = [
        {"status": "setup"},
        {"status": "active", "total-time": 100, "ram": _ram(10 << 20, 54 << 20, 1)},
        {
            "status": "completed",
            "total-time": 500,
            "downtime": 20,
            "setup-time": 1,
            "ram": _ram(64 << 20, 0, 2),
        },
    ]
    fake = FakeQMP(replies={"query-migrate": sequence})
    seen: list[Progress] = []

    async def body(qmp: QMP) -> None:
        result = await follow_migration(qmp, seen.append, interval=0.01)
        assert result.status is MigrationStatus.COMPLETED
        assert (result.total_time_ms, result.downtime_ms, result.passes) == (500, 20, 2)
        assert result.rate_bytes_per_s == pytest.approx((64 << 20) / 0.5)

    run_async(against(fake, sock_dir, body))
    assert [p.status for p in seen] == ["setup", "active", "completed"]
    assert seen[1].rate_bytes_per_s == 100_000_000.0


def test_follow_migration_raises_qemus_error_text_whole(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    text = "Unable to write to socket: Broken pipe"
    fake = FakeQMP(
        replies={"query-migrate": [{"status": "active"}, {"status": "failed", "error-desc": text}]}
    )

    async def body(qmp: QMP) -> None:
        with pytest.raises(MigrationError) as info:
            await follow_migration(qmp, interval=0.01)
        assert str(info.value) == text

    run_async(against(fake, sock_dir, body))


def test_follow_migration_switches_to_postcopy_once(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    sequence: list[Reply] = [
        {"status": "active", "ram": _ram(1, 1, 1)},
        {"status": "active", "ram": _ram(2, 1, 2)},
        {"status": "postcopy-active", "ram": _ram(3, 1, 3)},
        {"status": "completed", "ram": _ram(4, 0, 3)},
    ]
    fake = FakeQMP(replies={"query-migrate": sequence})

    async def body(qmp: QMP) -> None:
        await follow_migration(qmp, interval=0.01, postcopy_after_passes=2)

    run_async(against(fake, sock_dir, body))
    assert fake.commands.count("migrate-start-postcopy") == 1
    assert fake.commands.index("migrate-start-postcopy") == 2


def test_a_stream_that_moves_no_data_for_the_stall_timeout_is_yanked(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    broken = "Unable to write to socket: Broken pipe"
    fake = FakeQMP()

    def query_migrate(_: object) -> object:
        # Progress at first, then none (a relay that stopped reading), until yanked.
        polls = fake.commands.count("query-migrate")
        if "yank" in fake.commands:
            return {"status": "failed", "error-desc": broken}
        return {"status": "active", "ram": _ram(min(polls, 3) << 20, 60 << 20, 1)}

    fake.replies["query-migrate"] = query_migrate
    stall = 0.3

    async def body(qmp: QMP) -> None:
        started = time.monotonic()
        with pytest.raises(MigrationError) as info:
            await follow_migration(qmp, interval=0.02, stall_timeout=stall)
        assert stall <= time.monotonic() - started < stall + 1.0 * FACTOR
        assert str(info.value) == (
            "no data moved for 0.3 s, so the stuck stream was shut down"
            f" (a frozen relay or peer?); qemu: {broken}"
        )

    run_async(against(fake, sock_dir, body))
    assert fake.commands.count("yank") == 1
    assert fake.received[fake.commands.index("yank")] == (
        "yank",
        {"instances": [{"type": "migration"}]},
    )


def test_a_slow_stream_that_still_moves_is_never_yanked(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP()

    def query_migrate(_: object) -> object:
        polls = fake.commands.count("query-migrate")
        if polls > 40:
            return {"status": "completed", "ram": _ram(64 << 20, 0, 2)}
        return {"status": "active", "ram": _ram(polls, 60 << 20, 1)}  # a byte a poll

    fake.replies["query-migrate"] = query_migrate

    async def body(qmp: QMP) -> None:
        result = await follow_migration(qmp, interval=0.02, stall_timeout=0.1)
        assert result.status is MigrationStatus.COMPLETED

    run_async(against(fake, sock_dir, body))
    assert "yank" not in fake.commands


def test_wait_destination_completed_times_out_with_the_status(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-migrate": {"status": "active"}})

    async def body(qmp: QMP) -> None:
        with pytest.raises(TimeoutError, match=r"not completed within 0\.3 s \(status active\)"):
            await wait_destination_completed(qmp, 0.3)

    run_async(against(fake, sock_dir, body))


def test_cancel_waits_for_cancelled(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"query-migrate": [{"status": "cancelling"}, {"status": "cancelled"}]})

    async def body(qmp: QMP) -> None:
        info = await cancel_outgoing(qmp)
        assert info.status is MigrationStatus.CANCELLED

    run_async(against(fake, sock_dir, body))
    assert fake.commands == ["migrate_cancel", "query-migrate", "query-migrate"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"multifd_channels": 0}, "multifd channels must be 1..255, got 0"),
        ({"max_bandwidth": 0}, "max bandwidth must be positive, got 0"),
        ({"downtime_limit_ms": -1}, "downtime limit must be >= 0, got -1"),
    ],
)
def test_migration_options_reject_values_qemu_would_refuse(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        MigrationOptions(**kwargs)


# -- multifd compression and XBZRLE (only QEMU 7.2 installs here: older QEMUs and a
# QEMU built without zstd are played by the fake) -----------------------------------------

QEMU_4_2_VERSION = {"qemu": {"major": 4, "minor": 2, "micro": 1}, "package": ""}


def test_compression_on_a_qemu_without_it_is_refused_naming_its_version(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    """Fake QMP only: QEMU 4.2 (multifd, no compression) played by the fake (only 7.2
    installs here)."""
    # QEMU 4.2 has multifd but no multifd-compression parameter (it came in 5.0).
    fake = FakeQMP(
        replies={
            "query-status": status("running"),
            "query-migrate": {},
            "query-migrate-parameters": {"multifd-channels": 2, "downtime-limit": 300},
            "query-version": QEMU_4_2_VERSION,
        }
    )
    options = MigrationOptions(multifd_channels=2, compress="zstd")

    async def body(qmp: QMP) -> None:
        with pytest.raises(UnsupportedError) as info:
            await start_migration(qmp, "unix:/tmp/s.sock", options)
        assert str(info.value) == (
            "qemu 4.2.1 of vm cannot compress multifd pages (qemu 5.0 or later)"
        )

    run_async(against(fake, sock_dir, body))
    assert "migrate" not in fake.commands


def test_a_qemu_built_without_zstd_is_refused_with_its_own_words(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    """Fake QMP only: Debian's QEMU 7.2 is built with zstd, so its refusal is played by
    the fake, in QEMU's own words."""
    refusal = QMPFail("Parameter 'multifd-compression' does not accept value 'zstd'")
    fake = FakeQMP(
        replies={
            "query-status": status("running"),
            "query-migrate": {},
            "query-migrate-parameters": {"multifd-compression": "none"},
            "migrate-set-parameters": [{}, refusal],
        }
    )
    options = MigrationOptions(multifd_channels=2, compress="zstd", compress_level=3)

    async def body(qmp: QMP) -> None:
        with pytest.raises(UnsupportedError) as info:
            await start_migration(qmp, "unix:/tmp/s.sock", options)
        assert str(info.value) == (
            "qemu 7.2.22 of vm cannot compress with zstd:"
            " Parameter 'multifd-compression' does not accept value 'zstd'"
        )

    run_async(against(fake, sock_dir, body))
    assert (
        "migrate-set-parameters",
        {"multifd-compression": "zstd", "multifd-zstd-level": 3},
    ) in (fake.received)
    assert "migrate" not in fake.commands


def test_compression_is_set_on_both_sides_and_xbzrle_on_the_source(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(
        replies={
            "query-status": status("running"),
            "query-migrate": {},
            "query-migrate-parameters": {"multifd-compression": "none"},
        }
    )

    async def body(qmp: QMP) -> None:
        await start_migration(
            qmp, "unix:/tmp/s.sock", MigrationOptions(multifd_channels=2, compress="zlib")
        )

    run_async(against(fake, sock_dir, body))
    assert ("migrate-set-parameters", {"multifd-compression": "zlib"}) in fake.received
    assert fake.commands[-1] == "migrate"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compress": "zstd"}, "compression needs multifd"),
        ({"multifd_channels": 2, "compress": "lz4"}, "compression must be one of zlib, zstd"),
        (
            {"multifd_channels": 2, "compress": "zlib", "compress_level": 10},
            "zlib level must be 0..9",
        ),
        ({"compress_level": 3}, "a compression level needs a compression method"),
        ({"multifd_channels": 2, "xbzrle_cache": 64 << 20}, "xbzrle does nothing with multifd"),
    ],
)
def test_impossible_compression_options_are_refused_before_qemu_is_asked(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MigrationOptions(**options)
