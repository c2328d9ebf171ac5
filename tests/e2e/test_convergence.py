"""Busy guests and slow links (DESIGN.md §8): every migration ends, slow links carry more.

::

    source namespace                  100 Mbit/s (tc tbf)        destination namespace
    QEMU src ─▶ migrelay migrate --to ══════veth══════▶ migrelay serve --qmp-dir ─▶ QEMU dst

The busy guest is a boot sector (`migrelay.lab.guest`) that rewrites one dword of every
page of a 24 MiB range as fast as TCG runs it: ~24 MiB dirty in every pass, while the
link carries ~12 MiB/s, so each pass takes ~2 s and finishing would stop the guest ~2 s,
more than the 1 s ceiling these tests give the downtime steps (``--max-downtime 1000``).

* default policy: ``migrate`` finds it not converging, raises the downtime limit in
  steps, cancels at ``--timeout`` with one line naming both rates; the source runs on.
  The same with ``--auto-converge``: QEMU throttles the guest (shown), which does not
  help a guest that rewrites its set in far less than 1 % of a pass.
* ``--postcopy``: switches once precopy stalls and completes. With ``--keep-paused`` the
  destination stays paused, so both RAM files are final and compared byte for byte;
  without it the destination resumes and the guest keeps counting there.
* ``--compress zstd`` (multifd 2) on text-like RAM: fewer bytes on the wire (the relay's
  count: QEMU counts multifd pages before compressing), a shorter migration, equal RAM.
* ``--xbzrle-cache``: the pages sent again are differences of a few bytes.

The VMs' files live on tmpfs (postcopy needs shmem RAM; test_postcopy_recovery.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from migrelay.control.migration import wait_destination_completed
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.guest import dirtying_guest, floppy_args, guest_counter
from migrelay.lab.netns import LinkedNamespaces
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB
from tests.e2e.cli_helpers import (
    NetnsCommand,
    assert_one_line_error,
    check_migrated,
    summary_line,
)
from tests.helpers import FACTOR, short_temp_dir
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

PORT = 8767
LINK_RATE = "100mbit"
RAM_BYTES = 32 * MIB
#: The busy guest's working set: 1 MiB to 25 MiB.
DIRTY_BYTES = 24 * MIB
#: Ceiling of the downtime steps in these tests: below the ~2 s the dirty set needs.
MAX_DOWNTIME_MS = 1000
#: ``--timeout`` of the runs that must end by their deadline.
DEADLINE_S = 25.0
#: How long past its deadline a cancelled migration may take to end (a poll, the cancel).
DEADLINE_SLACK_S = 10.0 * FACTOR
MIGRATION_TIMEOUT_S = 120.0 * FACTOR


@dataclass
class Link:
    """Two namespaces joined by a shaped veth, ``serve --qmp-dir`` in the destination's."""

    ns: LinkedNamespaces
    workdir: Path
    procs: MigrelayProcesses
    run: AsyncRunner
    serve: MigrelayProcess | None = None
    vms: list[DisposableVM] = field(default_factory=list)
    commands: list[NetnsCommand] = field(default_factory=list)

    def start_serve(self) -> MigrelayProcess:
        self.serve = self.procs.serve(
            "--target-dir", str(self.workdir), "--qmp-dir", str(self.workdir), "--insecure",
            listen=f"{self.ns.dest_addr}:{PORT}", prefix=self.ns.prefix(self.ns.dest_ns),
        )  # fmt: skip
        return self.serve

    def vm(
        self, name: str, *, incoming: bool, extra: tuple[str, ...] = (), content: str = "random"
    ) -> DisposableVM:
        namespace = self.ns.dest_ns if incoming else self.ns.source_ns
        vm = DisposableVM(
            self.workdir,
            name,
            RAM_BYTES,
            incoming=incoming,
            extra_args=extra,
            command_prefix=self.ns.prefix(namespace),
            ram_content=content,
        )
        self.vms.append(vm)
        return vm

    def migrate(self, src: DisposableVM, dst: DisposableVM, *args: str) -> NetnsCommand:
        command = NetnsCommand(
            self.workdir,
            f"migrate-{len(self.commands)}",
            ("migrate", "--qmp", str(src.qmp_path),
             "--to", f"ws://{self.ns.dest_addr}:{PORT}/{dst.name}", *args),
            self.ns.prefix(self.ns.source_ns),
        )  # fmt: skip
        self.commands.append(command)
        return command


@pytest.fixture
def link(migrelay_procs: MigrelayProcesses, run_e2e: AsyncRunner) -> Iterator[Link]:
    with short_temp_dir("/dev/shm") as workdir, LinkedNamespaces(rate=LINK_RATE) as ns:
        setup = Link(ns, workdir, migrelay_procs, run_e2e)
        try:
            yield setup
        finally:
            for command in setup.commands:
                command.stop()
            migrelay_procs.stop_all()
            for vm in setup.vms:
                vm.kill()


def busy_guest(link: Link) -> tuple[str, ...]:
    image = dirtying_guest(link.workdir / "busy.img", start=1 * MIB, size=DIRTY_BYTES)
    return floppy_args(image)


def busy_pair(link: Link) -> tuple[DisposableVM, DisposableVM]:
    """A source and a destination that boot the busy guest, and ``serve`` started."""
    guest = busy_guest(link)
    src = link.vm("src", incoming=False, extra=guest)
    dst = link.vm("dst", incoming=True, extra=guest)
    link.start_serve()
    return src, dst


async def start_both(src: DisposableVM, dst: DisposableVM) -> None:
    """Start both QEMUs, the source's guest running."""
    await start_running(src)
    await dst.start()


async def start_running(vm: DisposableVM) -> None:
    """Start ``vm`` (created with -S) and let the guest run until it counts."""
    await vm.start()
    async with QMP(vm.name) as qmp:
        await qmp.connect(str(vm.qmp_path))
        await qmp.cont()
    deadline = time.monotonic() + 20 * FACTOR
    first = guest_counter(vm.ram_path)
    while guest_counter(vm.ram_path) in (first,) or guest_counter(vm.ram_path) > 1 << 24:
        assert time.monotonic() < deadline, "the busy guest does not count"
        await asyncio.sleep(0.1)


async def vm_state(vm: DisposableVM) -> tuple[RunState, MigrationStatus]:
    async with QMP(vm.name) as qmp:
        await qmp.connect(str(vm.qmp_path))
        return await qmp.query_status(), (await qmp.query_migrate()).status


@pytest.mark.parametrize("extra", [(), ("--auto-converge",)], ids=["default", "auto-converge"])
def test_a_guest_dirtying_faster_than_the_link_is_cancelled_at_the_deadline_and_runs_on(
    link: Link, extra: tuple[str, ...]
) -> None:
    src, dst = busy_pair(link)

    async def body() -> None:
        await start_both(src, dst)
        started = time.monotonic()
        migrate = link.migrate(
            src, dst, "--timeout", str(DEADLINE_S), "--max-downtime", str(MAX_DOWNTIME_MS),
            *extra,
        )  # fmt: skip
        await migrate.wait(DEADLINE_S + DEADLINE_SLACK_S + 30)
        took = time.monotonic() - started
        line = assert_one_line_error(
            migrate,
            "migration cancelled: not converging: the guest dirties",
            "the link carries",
            f"cancelled at the {DEADLINE_S:g} s deadline (--timeout)",
            "the source vm runs on",
        )
        assert DEADLINE_S <= took <= DEADLINE_S + DEADLINE_SLACK_S, (took, line)
        stdout = migrate.stdout()
        # The policy's steps were shown as they happened, in the lines form.
        assert "active, not converging" in stdout, stdout
        # The steps (their values are the unit tests'): at least one was taken.
        assert re.search(r"not converging, (throttle \d+%, )?downtime limit \d+ ms", stdout), (
            stdout
        )
        throttles = [int(value) for value in re.findall(r"throttle (\d+)%", stdout)]
        if extra:
            assert throttles and max(throttles) >= 20, stdout  # QEMU's first step: 20 %
        assert summary_line(stdout).startswith("cancelled in "), stdout
        # The source runs on, the guest still counting.
        state, status = await vm_state(src)
        assert (state, status) == (RunState.RUNNING, MigrationStatus.CANCELLED)
        before = guest_counter(src.ram_path)
        await asyncio.sleep(0.5)
        assert guest_counter(src.ram_path) != before
        print(
            f"\nDEADLINE ({'+'.join(extra) or 'default'}): ended after {took:.1f} s,"
            f" throttle up to {max(throttles, default=0)}%: {line}"
        )

    link.run(body())


def test_with_postcopy_a_busy_guest_completes_and_both_ram_files_are_equal(link: Link) -> None:
    src, dst = busy_pair(link)

    async def body() -> None:
        await start_both(src, dst)
        migrate = link.migrate(
            src, dst, "--postcopy", "--keep-paused", "--timeout", "60",
            "--max-downtime", str(MAX_DOWNTIME_MS), "--json",
        )  # fmt: skip
        assert await migrate.wait(MIGRATION_TIMEOUT_S) == 0, migrate.describe()
        document = json.loads(migrate.stdout())
        assert document["status"] == "completed"
        assert document["convergence"] == "postcopy"
        # Kept paused: the destination's RAM is final, as the source's (postmigrate).
        assert (await vm_state(dst))[0] is RunState.PAUSED
        await check_migrated(src, dst)
        print(
            f"\nPOSTCOPY: completed in {document['elapsed_s']} s, downtime"
            f" {document['downtime_ms']} ms, {document['passes']} passes"
        )

    link.run(body())


def test_with_postcopy_the_destination_resumes_and_the_guest_keeps_counting(
    link: Link,
) -> None:
    src, dst = busy_pair(link)  # the destination has -S: migrelay decides, not -S

    async def body() -> None:
        await start_both(src, dst)
        migrate = link.migrate(src, dst, "--postcopy", "--timeout", "60")
        assert await migrate.wait(MIGRATION_TIMEOUT_S) == 0, migrate.describe()
        assert "(postcopy)" in summary_line(migrate.stdout())
        state, status = await vm_state(dst)
        assert (state, status) == (RunState.RUNNING, MigrationStatus.COMPLETED)
        state, _ = await vm_state(src)
        assert state is RunState.POSTMIGRATE  # never both running
        stopped_at = guest_counter(src.ram_path)
        deadline = time.monotonic() + 10 * FACTOR
        while guest_counter(dst.ram_path) <= stopped_at:
            assert time.monotonic() < deadline, "the guest does not count on the destination"
            await asyncio.sleep(0.1)
        assert guest_counter(src.ram_path) == stopped_at

    link.run(body())


def migrate_json(
    link: Link, content: str, *args: str, extra: tuple[str, ...] = ()
) -> dict[str, object]:
    """One migration of a fresh VM pair; its ``--json`` document, RAM compared."""
    index = len(link.vms)
    src = link.vm(f"s{index}", incoming=False, extra=extra, content=content)
    dst = link.vm(f"d{index}", incoming=True, extra=extra)

    async def body() -> dict[str, object]:
        if extra:
            await start_running(src)
        else:
            await src.start()
        await dst.start()
        migrate = link.migrate(src, dst, "--json", "--timeout", "90", *args)
        assert await migrate.wait(MIGRATION_TIMEOUT_S) == 0, migrate.describe()
        document: dict[str, object] = json.loads(migrate.stdout())
        if extra:  # a running guest resumes on the destination: its RAM moves on
            async with QMP(dst.name) as qmp:
                await qmp.connect(str(dst.qmp_path))
                await wait_destination_completed(qmp, MIGRATION_TIMEOUT_S)
        else:
            await check_migrated(src, dst)
        return document

    return link.run(body())


def test_zstd_halves_the_bytes_on_the_wire_for_compressible_ram(link: Link) -> None:
    link.start_serve()
    plain = migrate_json(link, "text", "--multifd", "2")
    zstd = migrate_json(link, "text", "--multifd", "2", "--compress", "zstd")
    for document in (plain, zstd):
        assert document["status"] == "completed"
    plain_wire, zstd_wire = int(plain["wire_bytes"]), int(zstd["wire_bytes"])  # type: ignore[call-overload]
    # QEMU counts the same bytes both times: it counts before compressing.
    assert zstd_wire * 2 <= plain_wire, (plain, zstd)
    assert float(zstd["elapsed_s"]) < float(plain["elapsed_s"]), (plain, zstd)  # type: ignore[arg-type]
    print(
        f"\nZSTD over {LINK_RATE}: wire {plain_wire / MIB:.1f} -> {zstd_wire / MIB:.1f} MiB,"
        f" {plain['elapsed_s']} -> {zstd['elapsed_s']} s;"
        f" qemu counted {int(plain['transferred_bytes']) / MIB:.1f} and"  # type: ignore[call-overload]
        f" {int(zstd['transferred_bytes']) / MIB:.1f} MiB"  # type: ignore[call-overload]
    )


def test_xbzrle_sends_pages_dirtied_again_as_small_differences(link: Link) -> None:
    link.start_serve()
    guest = floppy_args(dirtying_guest(link.workdir / "small.img", start=1 * MIB, size=8 * MIB))
    plain = migrate_json(link, "random", extra=guest)
    xbzrle = migrate_json(link, "random", "--xbzrle-cache", "16M", extra=guest)
    ram = RAM_BYTES
    resent_plain = int(plain["transferred_bytes"]) - ram  # type: ignore[call-overload]
    resent_xbzrle = int(xbzrle["transferred_bytes"]) - ram  # type: ignore[call-overload]
    assert resent_plain > 8 * MIB, plain  # at least one more pass of the whole set
    assert resent_xbzrle * 4 < resent_plain, (plain, xbzrle)
    print(
        f"\nXBZRLE: sent again {resent_plain / MIB:.1f} MiB without,"
        f" {resent_xbzrle / MIB:.2f} MiB with a 16 MiB cache"
    )


def test_on_timeout_pause_stops_the_guest_at_the_deadline_and_completes(link: Link) -> None:
    src, dst = busy_pair(link)

    async def body() -> None:
        await start_both(src, dst)
        deadline_s = 12.0
        migrate = link.migrate(
            src, dst, "--timeout", str(deadline_s), "--on-timeout", "pause",
            "--keep-paused", "--json",
        )  # fmt: skip
        assert await migrate.wait(MIGRATION_TIMEOUT_S) == 0, migrate.describe()
        document = json.loads(migrate.stdout())
        assert document["status"] == "completed"
        assert float(document["elapsed_s"]) >= deadline_s
        # The guest was paused to send a whole dirty set (~24 MiB at ~12 MiB/s): a
        # downtime far over the 300 ms limit the migration started with.
        assert int(document["downtime_ms"]) > 1000, document
        await check_migrated(src, dst)
        print(
            f"\nPAUSE: completed in {document['elapsed_s']} s,"
            f" downtime {document['downtime_ms']} ms"
        )

    link.run(body())


def test_quit_source_quits_it_once_the_destination_has_the_vm(link: Link) -> None:
    src = link.vm("src", incoming=False)
    dst = link.vm("dst", incoming=True)
    link.start_serve()

    async def body() -> None:
        await src.start()
        await dst.start()
        migrate = link.migrate(src, dst, "--quit-source")
        assert await migrate.wait(MIGRATION_TIMEOUT_S) == 0, migrate.describe()
        assert summary_line(migrate.stdout()).startswith("completed in ")
        assert await src.wait(10 * FACTOR) == 0  # QEMU quit, cleanly
        state, status = await vm_state(dst)
        assert status is MigrationStatus.COMPLETED
        # The source never ran (-S, prelaunch), so the destination does not run either.
        assert state is RunState.PRELAUNCH, state
        async with QMP(dst.name) as qmp:
            await qmp.connect(str(dst.qmp_path))
            await qmp.quit()
        assert await dst.wait(30 * FACTOR) == 0
        assert first_difference(src.ram_path, dst.ram_path) is None

    link.run(body())
