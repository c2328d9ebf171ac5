"""Before a byte moves: ``serve --qmp-dir`` refuses a destination VM that differs from the
source (`migrelay.control.compat`), with real QEMUs and ``migrate --to`` as a user runs it.

A destination of another RAM size or machine type (``-machine q35`` where the source has
``pc``) is refused in one line naming both sides; nothing on either VM changes, and the
same source then migrates to a destination that matches.
"""

from __future__ import annotations

import re
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
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

#: The source's RAM: small, the refusal comes before a byte moves anyway.
RAM_BYTES = 64 * MIB


@pytest.mark.parametrize(
    ("ram_bytes", "extra_args", "difference"),
    [
        (128 * MIB, (), "ram size differs: source 64 MiB, destination 128 MiB"),
        # Later -machine options are merged into the first: q35 keeps the RAM backend.
        (
            RAM_BYTES,
            ("-machine", "q35"),
            "machine type differs: source pc-i440fx-7.2, destination pc-q35-7.2",
        ),
    ],
    ids=["ram-size", "machine-type"],
)
def test_a_destination_vm_that_differs_is_refused_in_one_line_naming_both_sides(
    ram_bytes: int,
    extra_args: tuple[str, ...],
    difference: str,
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    src = DisposableVM(sock_dir, "src", RAM_BYTES)
    dst = DisposableVM(sock_dir, "dst", ram_bytes, incoming=True, extra_args=extra_args)
    again = DisposableVM(sock_dir, "again", RAM_BYTES, incoming=True)

    async def main() -> None:
        async with src, dst, again:
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            url = f"{serve.url}/{dst.name}"
            refused = commands.migrate(src, "--to", url)
            await refused.wait()
            stderr = assert_one_line_error(refused)
            assert stderr == (
                f"migrelay: error: cannot open websocket to {url}: server refused the upgrade"
                f" with 409: destination vm does not match the source: {difference}\n"
            ), stderr
            # serve's log line says the same.
            assert re.search(
                rf"refused /{dst.name} from \S+: 409 destination vm does not match the source:"
                rf" {re.escape(difference)}$",
                serve.log(),
                re.MULTILINE,
            ), serve.log()

            # The source: where it was, its monitor answering; only `migrate` failed.
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH
            assert info.status is MigrationStatus.FAILED
            # The destination: untouched, still waiting for a migration.
            async with QMP(dst.name) as qmp:
                await qmp.connect(str(dst.qmp_path))
                assert await qmp.query_status() is RunState.INMIGRATE
                current = await qmp.query_migrate()
                assert current.status is MigrationStatus.NONE
                assert current.socket_addresses == ()

            # A destination that matches takes the same source.
            migrate = commands.migrate(src, "--to", f"{serve.url}/{again.name}")
            assert await migrate.wait() == 0, migrate.describe()
            await check_migrated(src, again)

    run_e2e(main())
