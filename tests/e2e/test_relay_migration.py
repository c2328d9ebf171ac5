"""Real QEMU migrations through ``migrelay connect`` and ``migrelay serve`` processes.

Every test ends with the destination's RAM file equal to the source's byte for byte,
checked once the destination itself reports ``completed`` and both QEMUs have quit.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.lab.vm import DisposableVM, first_difference
from tests.e2e.vms import VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

MIGRATION_TIMEOUT_S = 120.0 * FACTOR
RAM_BYTES = 64 << 20


async def _finish(src: DisposableVM, dst: DisposableVM, src_qmp: QMP, dst_qmp: QMP) -> None:
    final = await wait_destination_completed(dst_qmp, MIGRATION_TIMEOUT_S)
    assert final.status is MigrationStatus.COMPLETED
    assert (await src_qmp.query_migrate()).status is MigrationStatus.COMPLETED
    await src_qmp.quit()
    await dst_qmp.quit()
    assert await src.wait(30 * FACTOR) == 0
    assert await dst.wait(30 * FACTOR) == 0
    assert first_difference(src.ram_path, dst.ram_path) is None


def _relays(
    procs: MigrelayProcesses, sock_dir: Path, *serve_args: str
) -> tuple[MigrelayProcess, MigrelayProcess]:
    server = procs.serve("--target", str(sock_dir / "dest.sock"), *serve_args)
    client = procs.connect(f"{server.url}/", sock_dir / "source.sock")
    return server, client


def _closed_lines(process: MigrelayProcess) -> list[str]:
    return [line for line in process.log().splitlines() if " closed: " in line]


_CLOSED_LINE = re.compile(
    r"channel \S+ closed: (?P<how>[^;]+); sent (?P<sent>[\d.]+ \S+), received"
    r" (?P<received>[\d.]+ \S+) in (?P<seconds>[\d.]+) s \((?P<rate>[\d.]+ \S+)/s\);"
    r" close code (?P<code>.+)$"
)
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _size(text: str) -> float:
    number, unit = text.split()
    return float(number) * _UNITS[unit]


def _relayed(lines: list[str], field: str) -> float:
    """Sum of one byte count over the closed lines, which must all parse."""
    matches = [_CLOSED_LINE.search(line) for line in lines]
    assert all(matches), lines
    return sum(_size(match[field]) for match in matches if match)


@pytest.mark.parametrize("multifd", [None, 4], ids=["single-channel", "multifd4"])
def test_migration_through_the_tunnel_keeps_ram_identical(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    multifd: int | None,
) -> None:
    server, client = _relays(migrelay_procs, sock_dir)
    options = MigrationOptions(multifd_channels=multifd)

    async def scenario() -> None:
        async with vm_pair(RAM_BYTES) as (src, dst), QMP("src") as sq, QMP("dst") as dq:
            await sq.connect(str(src.qmp_path))
            await dq.connect(str(dst.qmp_path))
            await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
            await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
            await _finish(src, dst, sq, dq)

    run_e2e(scenario())
    channels = 1 + (multifd or 0)
    # One "closed" line per channel on each side, each saying it ended normally.
    for relay in (server, client):
        relay.wait_for_log(rf"(?s)(channel \S+ closed: ended by the .*){{{channels}}}")
        lines = _closed_lines(relay)
        assert len(lines) == channels, relay.log()
        assert all("close code 1000 normal" in line for line in lines), relay.log()
    # The lines tell how much went each way: the RAM (and QEMU's framing of it, a little
    # more) out of the source relay and into the server; the return path is small.
    assert RAM_BYTES <= _relayed(_closed_lines(client), "sent") < RAM_BYTES * 1.1
    assert RAM_BYTES <= _relayed(_closed_lines(server), "received") < RAM_BYTES * 1.1
    assert _relayed(_closed_lines(server), "sent") < 1 << 20
    # The server connected the channels to destination QEMU in the source's accept order.
    opened = [line.split("channel ")[1].split()[0] for line in server.log().splitlines()
              if " opened: " in line]  # fmt: skip
    assert [name.rsplit("/", 1)[1] for name in opened] == [str(n) for n in range(channels)]


def test_relays_started_after_migrate_incoming(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    options = MigrationOptions()

    async def scenario() -> None:
        async with vm_pair(RAM_BYTES) as (src, dst), QMP("src") as sq, QMP("dst") as dq:
            await sq.connect(str(src.qmp_path))
            await dq.connect(str(dst.qmp_path))
            await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
            # Only now do the relays start.
            _relays(migrelay_procs, sock_dir)
            await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
            await _finish(src, dst, sq, dq)

    run_e2e(scenario())


def test_migration_started_before_the_destination_listens_waits_for_it(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    # The original workflow may start the source before destination QEMU listens: the
    # server waits (bounded by --wait-target) for the destination socket to appear.
    server, _ = _relays(migrelay_procs, sock_dir, "--wait-target", "30")
    options = MigrationOptions()

    async def scenario() -> None:
        async with vm_pair(RAM_BYTES) as (src, dst), QMP("src") as sq, QMP("dst") as dq:
            await sq.connect(str(src.qmp_path))
            await dq.connect(str(dst.qmp_path))
            await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
            # The WebSocket is up and waiting on the server: no "opened" line yet.
            await asyncio.sleep(1.0)
            assert " opened: " not in server.log()
            assert (await sq.query_migrate()).status is not MigrationStatus.FAILED
            await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
            await _finish(src, dst, sq, dq)

    run_e2e(scenario())


def test_second_migration_through_the_same_relays_completes(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    # Without --once, connect serves migration after migration, each its own session.
    _, client = _relays(migrelay_procs, sock_dir)
    options = MigrationOptions()

    async def one(name: str) -> None:
        async with vm_pair(32 << 20, name=name) as (src, dst), QMP("s") as sq, QMP("d") as dq:
            await sq.connect(str(src.qmp_path))
            await dq.connect(str(dst.qmp_path))
            await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
            await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
            await _finish(src, dst, sq, dq)

    run_e2e(one("first"))
    run_e2e(one("second"))
    # The relay logs a session's end once its channels closed, a moment after QEMU quit.
    client.wait_for_log(r"(?s)(session \S+ ended.*){2}")
    sessions = [
        line for line in client.log().splitlines() if "session " in line and "ended" in line
    ]
    assert len(sessions) == 2 and all(line.endswith("closed cleanly") for line in sessions), (
        client.log()
    )
