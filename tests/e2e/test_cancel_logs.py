"""What the relays log for a migration cancelled at the source, real QEMU.

QEMU's ``migrate_cancel`` shuts the source's migration socket down; the destination QEMU
reads the end of the stream and fails its incoming migration. Neither relay can tell that
from a completed migration (both QEMUs end their streams the same way), so neither may
say ``completed``: each says who ended the stream, and ``migrate``/``status`` say that
the migration was cancelled.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from migrelay.control.qmp import MigrationStatus
from migrelay.units import MIB
from tests.e2e.cli_helpers import SLOW_BANDWIDTH, Commands, serve_qmp_dir, source_state
from tests.e2e.vms import DEFAULT_RAM_BYTES, VMPairFactory
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

CLOSED = re.compile(r"channel \S+/0 (closed: [^\n]*)")
ENDED_BY_THE_SOURCE = "closed: ended by the source, then by the destination; "


def test_a_cancelled_migration_is_not_logged_as_completed_by_either_relay(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    source_sock = sock_dir / "source.sock"

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            connect = migrelay_procs.connect(f"{serve.url}/{dst.name}", source_sock)
            started = await commands.run(
                "migrate", "--qmp", str(src.qmp_path), "--socket", str(source_sock),
                "--no-wait", "--max-bandwidth", SLOW_BANDWIDTH,
            )  # fmt: skip
            assert started.popen.returncode == 0, started.describe()
            while True:  # under way end to end, and far from done
                _runstate, info = await source_state(src)
                assert info.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE), info
                if (info.transferred or 0) >= 4 * MIB:
                    break
                await asyncio.sleep(0.05)
            cancel = await commands.run("cancel", "--qmp", str(src.qmp_path))
            assert cancel.popen.returncode == 0, cancel.describe()
            _runstate, info = await source_state(src)
            assert info.status is MigrationStatus.CANCELLED
            # Each relay: one closing line, clean (nothing lost on the way), saying who
            # ended the stream, never "completed".
            for relay in (serve, connect):
                await asyncio.to_thread(relay.wait_for_log, CLOSED.pattern)
                lines = CLOSED.findall(relay.log())
                assert len(lines) == 1, relay.log()
                assert lines[0].startswith(ENDED_BY_THE_SOURCE), lines
                assert lines[0].endswith("; close code 1000 normal"), lines
                assert "completed" not in relay.log(), relay.log()
            await asyncio.to_thread(connect.wait_for_log, r"session \S+ ended: ")
            assert re.search(
                r"session \S+ ended: 1 channel\(s\), closed cleanly$", connect.log(), re.M
            )

    run_e2e(main())
