"""A destination prepared with other capabilities than ``migrate --to`` announces is refused
before a byte moves, with real QEMUs (the three mismatches of
``tests/control/test_migrate.py``, which plays them against the fake QMP server).

The operator prepared the destination by hand (``migrelay incoming``), then migrates
with ``migrate --to`` to ``serve --qmp-dir``, which compares what the source announces
(``Migrelay-Migration``) with what destination QEMU 7.2 really listens with. Left to
QEMU, a mismatch fails mid-stream or hangs (README, "The original four steps"). The
first mismatch, multifd at the source only, is in ``test_cli_migration.py``; here are
the other two: both sides with multifd but different channel counts, and multifd and
postcopy at the destination only. Each is refused with 409 in one line, serve's log says
what differs, neither VM changes, and the migration prepared for then completes.

The VMs live on tmpfs: a destination listening with postcopy needs RAM that userfaultfd
can register (see ``test_postcopy_recovery.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.e2e.cli_helpers import (
    Commands,
    assert_one_line_error,
    check_migrated,
    serve_qmp_dir,
    source_state,
)
from tests.helpers import short_temp_dir
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

RAM_BYTES = 64 * MIB


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    with short_temp_dir("/dev/shm") as path:
        yield path


@pytest.mark.parametrize(
    ("prepared", "migrated", "difference"),
    [
        (
            ("--multifd", "2"),
            ("--multifd", "4"),
            "state is listening with multifd 2 channels, no postcopy, but multifd 4"
            " channels, no postcopy (as the source announced) is required",
        ),
        (
            ("--multifd", "4", "--postcopy"),
            (),
            "state is listening with multifd 4 channels, postcopy, but no multifd,"
            " no postcopy (as the source announced) is required",
        ),
    ],
    ids=["channel-counts-differ", "multifd-and-postcopy-only-here"],
)
def test_a_destination_prepared_otherwise_is_refused_and_the_one_prepared_for_completes(
    prepared: tuple[str, ...],
    migrated: tuple[str, ...],
    difference: str,
    run_e2e: AsyncRunner,
    shm_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    src = DisposableVM(shm_dir, "src", RAM_BYTES)
    dst = DisposableVM(shm_dir, "dst", RAM_BYTES, incoming=True)

    async def main() -> None:
        async with src, dst:
            serve = serve_qmp_dir(migrelay_procs, shm_dir)
            target = shm_dir / f"{dst.name}.sock"
            ready = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(target), *prepared
            )
            assert ready.popen.returncode == 0, ready.describe()
            url = f"{serve.url}/{dst.name}"
            mismatched = commands.migrate(src, "--to", url, *migrated)
            await mismatched.wait()
            stderr = assert_one_line_error(mismatched)
            assert stderr.startswith(
                f"migrelay: error: cannot open websocket to {url}: server refused the upgrade"
                " with 409: destination vm not ready: it was prepared with other capabilities"
                " than the source announced"
            ), stderr
            # What exactly differs is for serve's log (the peer gets fixed text only).
            assert difference in serve.log(), serve.log()
            # Neither VM changed: the source where it was, the destination still listening.
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH and info.status is MigrationStatus.FAILED
            async with QMP(dst.name) as qmp:
                await qmp.connect(str(dst.qmp_path))
                assert await qmp.query_status() is RunState.INMIGRATE
                listening = await qmp.query_migrate()
                assert listening.socket_addresses, listening
            # The migration the destination was prepared for completes.
            migrate = commands.migrate(src, "--to", url, *prepared)
            assert await migrate.wait() == 0, migrate.describe()
            await check_migrated(src, dst)

    run_e2e(main())
