"""A link that fails during postcopy: ``migrate --postcopy`` waits, resumes, RAM intact.

::

    source namespace                                       destination namespace
    QEMU src ──unix──▶ migrelay connect ══veth (cut)══▶ migrelay serve --qmp-dir ──▶ QEMU vm
      ▲
      └── migrelay migrate --postcopy --postcopy-after 1 --recover-timeout …

The link is shaped (``tc tbf``) so that postcopy, which ignores ``max-bandwidth``, takes
~13 s for 64 MiB; it is cut mid-postcopy for longer than the relays' liveness timeout,
so both relays close their channels and both QEMUs go ``postcopy-paused``. Once the link
is back, ``migrate`` resumes (``migrate`` with ``resume`` to the same socket), ``serve``
sees a new session for a paused destination and issues ``migrate-recover`` itself, and
the migration completes with the destination's RAM equal to the source's.

The same with the two-command form, ``serve --qmp-dir`` and ``migrate --to`` (the source
relay inside ``migrate``, with the same ping options), and nothing else: it resumes by
itself, its relay holding QEMU's resume connection (``open_retry``) until the link is
back.

What ``tests/control/test_postcopy_recovery.py`` shows against the fake QMP server, shown
here against QEMU 7.2 as well: Ctrl-C while postcopy is paused leaves the source paused
(never cancelled), ``incoming --recover`` then makes the paused destination listen again
and a new ``migrate --postcopy`` resumes the paused source to completion (the four-step
form, ``serve`` relaying only); a resume that QEMU cannot carry out (the source relay
gone) is retried every 3 s until ``--recover-timeout``, which ends ``migrate`` with one
line and the source still paused.

The VMs' files live on tmpfs (``/dev/shm``): the destination of a postcopy migration
registers its RAM with userfaultfd, which supports anonymous and shmem memory but not
an ext4 file (QEMU 7.2: "ram_block_enable_notify userfault register: Invalid argument").
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrelay.control.commands import MIGRATION_HEADER, announcement
from migrelay.control.migration import MigrationOptions, wait_destination_completed
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.lab.netns import LinkedNamespaces
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB
from tests.helpers import FACTOR, short_temp_dir
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

RAM_BYTES = 64 * MIB
#: 40 Mbit/s: 64 MiB of postcopy take ~13 s, so the cut always lands mid-way.
LINK_RATE = "40mbit"
#: The link is cut once the destination holds this much RAM (postcopy under way).
CUT_AFTER_BYTES = 16 * MIB
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
LIVENESS_S = PING_INTERVAL_S + PING_TIMEOUT_S
LIVENESS_ARGS = ("--ping-interval", str(PING_INTERVAL_S), "--ping-timeout", str(PING_TIMEOUT_S))
#: How long the link stays down: well past both relays' liveness timeout.
CUT_S = LIVENESS_S + 4.0
#: The bound on noticing the cut: a silent peer is declared dead between interval +
#: timeout and 2 × interval + timeout after its last byte (`Limits.ping_timeout`), plus
#: 2 s for scheduling on a busy host.
PAUSE_BOUND_S = (2 * PING_INTERVAL_S + PING_TIMEOUT_S + 2.0) * FACTOR
#: ``migrate --to`` runs its relay with the same ping options, so the same bound holds.
IN_PROCESS_PAUSE_BOUND_S = PAUSE_BOUND_S
#: ``migrate --to``: the link stays down this long after the source paused, so that its
#: first resume attempt finds the link down and its relay has to hold QEMU's connection.
HOLD_AFTER_PAUSE_S = 3.0
MIGRATION_TIMEOUT_S = 90.0 * FACTOR
RECOVER_TIMEOUT_S = 60
PORT = 8765
NAME = "vm"
OPTIONS = MigrationOptions(postcopy=True)
PAUSED_LINE = r"postcopy paused: the link to the destination failed"
LIVENESS_CLOSED = r"channel \S+ closed: [^\n]*liveness timeout"
RECOVERED_LINE = r"listening again on unix:\S+ to resume"


def allocated_bytes(path: Path) -> int:
    """Bytes of a sparse tmpfs file that hold data: the pages postcopy has placed."""
    return os.stat(path).st_blocks * 512


def log_lines(process: MigrelayProcess, pattern: str) -> list[str]:
    return [line for line in process.log().splitlines() if re.search(pattern, line)]


@pytest.fixture
def shm_workdir() -> Iterator[Path]:
    """A fresh directory on tmpfs (see the module docstring), removed afterwards."""
    with short_temp_dir("/dev/shm") as path:
        yield path


@dataclass
class Hosts:
    """The shaped link, both VMs (started) and ``serve`` with its token."""

    ns: LinkedNamespaces
    sock_dir: Path
    token: Path
    src: DisposableVM
    dst: DisposableVM
    serve: MigrelayProcess
    procs: MigrelayProcesses
    #: The ``run_e2e`` fixture: the test's coroutines run through it.
    run: AsyncRunner

    @property
    def url(self) -> str:
        return f"ws://{self.ns.dest_addr}:{PORT}/{NAME}"

    @property
    def target(self) -> Path:
        """The unix socket destination QEMU listens on (``--target-dir``/NAME.sock)."""
        return self.dst.qmp_path.parent / f"{NAME}.sock"

    def source_prefix(self) -> tuple[str, ...]:
        return self.ns.prefix(self.ns.source_ns)

    def dest_prefix(self) -> tuple[str, ...]:
        return self.ns.prefix(self.ns.dest_ns)

    def connect(self, *args: str) -> MigrelayProcess:
        """``connect`` on the source host, announcing postcopy (see the first test)."""
        return self.procs.connect(
            self.url, self.sock_dir / "source.sock",
            "--token-file", str(self.token), *LIVENESS_ARGS,
            "--header", f"{MIGRATION_HEADER}: {announcement(OPTIONS)}",
            "--retry-open", "60", *args,
            prefix=self.source_prefix(),
        )  # fmt: skip

    def migrate(self, recover_timeout: float, *args: str) -> MigrelayProcess:
        """``migrate --socket --postcopy`` to `connect`'s socket, switching at once."""
        return self.procs.start(
            "migrate", "--qmp", str(self.src.qmp_path),
            "--socket", str(self.sock_dir / "source.sock"),
            "--postcopy", "--postcopy-after", "1", "--recover-timeout", f"{recover_timeout:g}",
            *args, prefix=self.source_prefix(), name="migrate",
        )  # fmt: skip


@contextlib.contextmanager
def linked_hosts(
    workdir: Path, procs: MigrelayProcesses, run: AsyncRunner, *, qmp_dir: bool
) -> Iterator[Hosts]:
    """Two namespaces on a shaped link, the VMs and ``serve``; all torn down afterwards.

    With ``qmp_dir``, ``serve --qmp-dir`` prepares (and recovers) the destination
    itself; without, it only relays, and ``migrelay incoming`` does that.
    """
    token = workdir / "token"
    token.write_text("postcopy-recovery-token\n")
    dest_dir = workdir / "dst"
    dest_dir.mkdir()
    with LinkedNamespaces(rate=LINK_RATE) as ns:
        src = DisposableVM(workdir, "src", RAM_BYTES, command_prefix=ns.prefix(ns.source_ns))
        dst = DisposableVM(
            dest_dir, NAME, RAM_BYTES, incoming=True, command_prefix=ns.prefix(ns.dest_ns)
        )
        try:
            run(_start(src, dst))
            prepare = ("--qmp-dir", str(dest_dir)) if qmp_dir else ()
            serve = procs.serve(
                "--target-dir", str(dest_dir), *prepare,
                "--token-file", str(token), "--wait-target", "10", *LIVENESS_ARGS,
                listen=f"{ns.dest_addr}:{PORT}", prefix=ns.prefix(ns.dest_ns),
            )  # fmt: skip
            yield Hosts(ns, workdir, token, src, dst, serve, procs, run)
        finally:
            procs.stop_all()
            for vm in (src, dst):
                vm.kill()
                print(f"----- qemu {vm.name}:\n{vm.stderr_tail()}")


@pytest.fixture
def hosts(
    shm_workdir: Path, migrelay_procs: MigrelayProcesses, run_e2e: AsyncRunner
) -> Iterator[Hosts]:
    """`linked_hosts` with ``serve --qmp-dir``."""
    with linked_hosts(shm_workdir, migrelay_procs, run_e2e, qmp_dir=True) as hosts:
        yield hosts


@pytest.fixture
def relay_only_hosts(
    shm_workdir: Path, migrelay_procs: MigrelayProcesses, run_e2e: AsyncRunner
) -> Iterator[Hosts]:
    """`linked_hosts` with a ``serve`` that only relays (the four-step form)."""
    with linked_hosts(shm_workdir, migrelay_procs, run_e2e, qmp_dir=False) as hosts:
        yield hosts


@dataclass(frozen=True)
class Cut:
    """When the link went down and came back, and what the destination held then."""

    cut_at: float
    restored_at: float
    #: Seconds from the cut to ``migrate``'s "postcopy paused" line.
    paused_after: float
    #: Bytes of RAM the destination held just before the link returned.
    held: int


def cut_link_during_postcopy(
    hosts: Hosts,
    migrate: MigrelayProcess,
    pause_bound_s: float,
    relays: Sequence[MigrelayProcess],
    hold_after_pause_s: float = 0.0,
) -> Cut:
    """Cut the link mid-postcopy, wait for the source to pause, restore the link.

    The link stays down at least `CUT_S` (past the liveness timeout of every relay with
    `LIVENESS_ARGS`, so that each of ``relays`` has closed its channel) and at least
    ``hold_after_pause_s`` after ``migrate`` said that the source paused.
    """
    migrate.wait_for_log(r"postcopy-active", timeout=30 * FACTOR)
    deadline = time.monotonic() + 30 * FACTOR
    while allocated_bytes(hosts.dst.ram_path) < CUT_AFTER_BYTES:
        assert time.monotonic() < deadline, "postcopy did not get under way"
        assert migrate.popen.poll() is None, migrate.log()
        time.sleep(0.02)

    hosts.ns.set_link(False)
    cut_at = time.monotonic()
    migrate.wait_for_log(PAUSED_LINE, timeout=pause_bound_s)
    paused_at = time.monotonic()
    for relay in relays:
        relay.wait_for_log(LIVENESS_CLOSED, timeout=10 * FACTOR)
    restore_at = max(cut_at + CUT_S, paused_at + hold_after_pause_s)
    time.sleep(max(restore_at - time.monotonic(), 0))
    # Still mid-way: the rest can only come over the restored link.
    held = allocated_bytes(hosts.dst.ram_path)
    assert held < RAM_BYTES - 8 * MIB, f"postcopy nearly done before the cut: {held}"
    hosts.ns.set_link(True)
    return Cut(cut_at, time.monotonic(), paused_at - cut_at, held)


def check_recovered(hosts: Hosts, migrate: MigrelayProcess, cut: Cut) -> tuple[float, float]:
    """``serve`` recovered the destination, ``migrate`` exited 0, RAM identical.

    Returns:
        Seconds from the link's return to ``serve``'s ``migrate-recover`` and to
        ``migrate``'s exit.
    """
    hosts.serve.wait_for_log(RECOVERED_LINE, timeout=30 * FACTOR)
    resumed_after = time.monotonic() - cut.restored_at
    status = migrate.wait(MIGRATION_TIMEOUT_S)
    completed_after = time.monotonic() - cut.restored_at
    assert status == 0, migrate.log()

    hosts.run(_finish(hosts.src, hosts.dst))
    assert first_difference(hosts.src.ram_path, hosts.dst.ram_path) is None

    # The operator was told once that the link failed and that it waits.
    paused = log_lines(migrate, r"postcopy paused")
    assert len(paused) == 1, migrate.log()
    assert f"waiting up to {RECOVER_TIMEOUT_S} s for it to return" in paused[0]
    assert re.search(r"^completed", migrate.log(), re.MULTILINE), migrate.log()
    return resumed_after, completed_after


def report(
    form: str, cut: Cut, pause_bound_s: float, resumed_after: float, completed_after: float
) -> None:
    print(
        f"\nPOSTCOPY RECOVERY ({form}): link cut after {cut.held // MIB} MiB held by the"
        f" destination; source paused {cut.paused_after:.2f} s after the cut (bound"
        f" {pause_bound_s:g} s); link down {cut.restored_at - cut.cut_at:.1f} s; serve"
        f" recovered {resumed_after:.2f} s and the migration completed"
        f" {completed_after:.2f} s after the link returned; RAM identical"
    )


def test_link_cut_during_postcopy_is_waited_out_resumed_and_ram_intact(hosts: Hosts) -> None:
    source_sock = hosts.sock_dir / "source.sock"
    # A plain connect announces no capabilities (serve would prepare the
    # destination without postcopy); migrate --to sends this header itself.
    # --retry-open: hold QEMU's resume connection until the link is back.
    client = hosts.procs.connect(
        hosts.url, source_sock,
        "--token-file", str(hosts.token), *LIVENESS_ARGS,
        "--header", f"{MIGRATION_HEADER}: {announcement(OPTIONS)}",
        "--retry-open", "60",
        prefix=hosts.source_prefix(),
    )  # fmt: skip
    migrate = hosts.procs.start(
        "migrate", "--qmp", str(hosts.src.qmp_path), "--socket", str(source_sock),
        "--postcopy", "--postcopy-after", "1", "--recover-timeout", str(RECOVER_TIMEOUT_S),
        prefix=hosts.source_prefix(), name="migrate",
    )  # fmt: skip

    cut = cut_link_during_postcopy(hosts, migrate, PAUSE_BOUND_S, [hosts.serve, client])
    resumed_after, completed_after = check_recovered(hosts, migrate, cut)
    report("connect + migrate --socket", cut, PAUSE_BOUND_S, resumed_after, completed_after)


def test_two_command_form_recovers_from_a_link_cut_during_postcopy(hosts: Hosts) -> None:
    """``serve --qmp-dir`` and ``migrate --to``: no ``connect``, no ``incoming --recover``."""
    migrate = hosts.procs.start(
        "migrate", "--qmp", str(hosts.src.qmp_path), "--to", hosts.url,
        "--token-file", str(hosts.token),
        "--postcopy", "--postcopy-after", "1", "--recover-timeout", str(RECOVER_TIMEOUT_S),
        *LIVENESS_ARGS, prefix=hosts.source_prefix(), name="migrate",
    )  # fmt: skip

    cut = cut_link_during_postcopy(
        hosts, migrate, IN_PROCESS_PAUSE_BOUND_S, [hosts.serve], HOLD_AFTER_PAUSE_S
    )
    resumed_after, completed_after = check_recovered(hosts, migrate, cut)
    # serve recovered the paused destination once, for the resumed session.
    assert len(log_lines(hosts.serve, RECOVERED_LINE)) == 1, hosts.serve.log()
    report("migrate --to", cut, IN_PROCESS_PAUSE_BOUND_S, resumed_after, completed_after)


async def _start(src: DisposableVM, dst: DisposableVM) -> None:
    await src.start()
    await dst.start()


async def _finish(src: DisposableVM, dst: DisposableVM) -> None:
    """Both sides completed by their own account; both QEMUs quit cleanly."""
    async with QMP(NAME) as dq:
        await dq.connect(str(dst.qmp_path))
        final = await wait_destination_completed(dq, 30 * FACTOR)
        assert final.status is MigrationStatus.COMPLETED
        await dq.quit()
    async with QMP("src") as sq:
        await sq.connect(str(src.qmp_path))
        assert (await sq.query_migrate()).status is MigrationStatus.COMPLETED
        await sq.quit()
    assert await src.wait(30 * FACTOR) == 0
    assert await dst.wait(30 * FACTOR) == 0


# -- what the fake QMP server showed alone: Ctrl-C, incoming --recover, retries, timeouts --


#: ``migrate`` ends within this of a Ctrl-C: it polls every 0.5 s (not on a terminal),
#: then says why and exits; 1.5 s for scheduling, scaled.
INTERRUPT_BOUND_S = 0.5 + 1.5 * FACTOR
#: ``--recover-timeout`` of the test that waits in vain: three resume attempts (one every
#: `migrelay.control.migration.RESUME_RETRY_S`, 3 s) fit in it.
SHORT_RECOVER_TIMEOUT_S = 8.0
#: ``migrate`` gives up this soon after its timeout: the next poll (0.5 s), then the
#: exit; 1.5 s for scheduling, scaled.
GIVE_UP_BOUND_S = 0.5 + 1.5 * FACTOR
#: ``migrate -vv`` logs every QMP command; a resume is ``migrate`` with ``resume``.
RESUME_COMMAND = r"> \S+: migrate \{'uri': 'unix:[^']+', 'resume': True\}"
HINT = "the vm's state is split between both hosts; resume with migrate --postcopy"


def wait_under_way(hosts: Hosts, migrate: MigrelayProcess) -> None:
    """Wait until postcopy runs and the destination holds `CUT_AFTER_BYTES`."""
    migrate.wait_for_log(r"postcopy-active", timeout=30 * FACTOR)
    deadline = time.monotonic() + 30 * FACTOR
    while allocated_bytes(hosts.dst.ram_path) < CUT_AFTER_BYTES:
        assert time.monotonic() < deadline, "postcopy did not get under way"
        assert migrate.popen.poll() is None, migrate.log()
        time.sleep(0.02)


def wait_exit(process: MigrelayProcess, seconds: float) -> int:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{process.name} still running after {seconds:g} s:\n"
                             f"{process.log()}") from None  # fmt: skip


def error_lines(process: MigrelayProcess) -> list[str]:
    return [line for line in process.log().splitlines() if line.startswith("migrelay: error:")]


async def migration_status(vm: DisposableVM, expected: MigrationStatus, seconds: float) -> None:
    """Wait until ``vm``'s own ``query-migrate`` says ``expected``; then let go of it."""
    async with QMP(vm.name) as qmp:
        await qmp.connect(str(vm.qmp_path))
        deadline = time.monotonic() + seconds
        while (status := (await qmp.query_migrate()).status) is not expected:
            assert time.monotonic() < deadline, f"{vm.name}: {status}, not {expected}"
            await qmp.next_migration_event(0.1)


def test_ctrl_c_while_paused_leaves_both_paused_then_incoming_recover_and_migrate_resume(
    relay_only_hosts: Hosts,
) -> None:
    """The four-step form, against real QEMU: ``incoming --postcopy``, ``connect``,
    ``migrate --socket --postcopy``; the link fails; Ctrl-C to the waiting ``migrate``
    leaves the source ``postcopy-paused`` (never cancelled: the destination runs on
    pages the source no longer has); once the link is back, ``incoming --recover`` makes
    the paused destination listen again and a new ``migrate --postcopy`` resumes the
    paused source; the migration completes, RAM identical."""
    hosts = relay_only_hosts
    prepared = hosts.procs.start(
        "incoming", "--qmp", str(hosts.dst.qmp_path), "--socket", str(hosts.target),
        "--postcopy", prefix=hosts.dest_prefix(), name="incoming",
    )  # fmt: skip
    assert wait_exit(prepared, 15 * FACTOR) == 0, prepared.log()
    client = hosts.connect()
    migrate = hosts.migrate(RECOVER_TIMEOUT_S)
    wait_under_way(hosts, migrate)

    # The link fails and the source relay goes with it (connect --retry-open would hold
    # QEMU's resume connection, leaving the source postcopy-recover, not paused).
    hosts.ns.set_link(False)
    client.stop()  # exits 1: its session failed
    migrate.wait_for_log(PAUSED_LINE, timeout=PAUSE_BOUND_S)
    interrupted_at = time.monotonic()
    migrate.popen.send_signal(signal.SIGINT)
    assert wait_exit(migrate, INTERRUPT_BOUND_S) == 1, migrate.log()
    print(
        f"\nCTRL-C while postcopy-paused: exited {time.monotonic() - interrupted_at:.2f} s after"
    )
    assert error_lines(migrate) == [
        f"migrelay: error: interrupted while postcopy was paused; {HINT}"
    ], migrate.log()
    # Both sides paused, neither cancelled nor failed: serve's liveness check ends its
    # channel, and destination QEMU pauses when its stream closes.
    hosts.serve.wait_for_log(LIVENESS_CLOSED, timeout=PAUSE_BOUND_S)
    hosts.run(migration_status(hosts.src, MigrationStatus.POSTCOPY_PAUSED, 5 * FACTOR))
    hosts.run(migration_status(hosts.dst, MigrationStatus.POSTCOPY_PAUSED, PAUSE_BOUND_S))
    held = allocated_bytes(hosts.dst.ram_path)
    assert held < RAM_BYTES - 8 * MIB, f"postcopy nearly done before the cut: {held}"

    hosts.ns.set_link(True)
    hosts.connect()
    recover = hosts.procs.start(
        "incoming", "--qmp", str(hosts.dst.qmp_path), "--socket", str(hosts.target),
        "--recover", prefix=hosts.dest_prefix(), name="recover",
    )  # fmt: skip
    assert wait_exit(recover, 15 * FACTOR) == 0, recover.log()
    assert f"{NAME}: listening for the paused postcopy migration to resume on unix:" in (
        recover.log()
    ), recover.log()
    resume = hosts.migrate(RECOVER_TIMEOUT_S)
    assert wait_exit(resume, MIGRATION_TIMEOUT_S) == 0, resume.log()
    assert re.search(r"^completed", resume.log(), re.MULTILINE), resume.log()
    hosts.run(_finish(hosts.src, hosts.dst))
    assert first_difference(hosts.src.ram_path, hosts.dst.ram_path) is None


def test_resume_refused_while_the_relay_is_gone_is_retried_then_gives_up_at_the_timeout(
    hosts: Hosts,
) -> None:
    """Real QEMU refuses (or fails) ``migrate`` with ``resume`` while nothing listens on
    the relay's socket: ``migrate`` tries again every 3 s until ``--recover-timeout``,
    then exits 1 with one line and leaves the source ``postcopy-paused``; a later
    ``migrate --postcopy`` with the relay back resumes it to completion."""
    client = hosts.connect()
    migrate = hosts.migrate(SHORT_RECOVER_TIMEOUT_S, "-vv")
    wait_under_way(hosts, migrate)

    # The link fails and the source relay goes with it: its socket gone, every resume
    # fails at once (connect --retry-open would hold QEMU's connection instead).
    hosts.ns.set_link(False)
    client.stop()  # exits 1: its session failed
    migrate.wait_for_log(PAUSED_LINE, timeout=PAUSE_BOUND_S)
    paused_at = time.monotonic()
    status = wait_exit(migrate, SHORT_RECOVER_TIMEOUT_S + GIVE_UP_BOUND_S)
    gave_up_after = time.monotonic() - paused_at
    assert status == 1, migrate.log()
    assert gave_up_after >= SHORT_RECOVER_TIMEOUT_S - 0.5, gave_up_after
    attempts = re.findall(RESUME_COMMAND, migrate.log())
    print(
        f"\nRECOVER TIMEOUT: {len(attempts)} resume attempts, gave up {gave_up_after:.2f} s"
        f" after the pause (timeout {SHORT_RECOVER_TIMEOUT_S:g} s)"
    )
    assert len(attempts) >= 2, migrate.log()
    [line] = error_lines(migrate)
    assert re.fullmatch(
        r"migrelay: error: migration failed: postcopy postcopy-(paused|recover): the link to"
        r" the destination"
        rf" did not return within {SHORT_RECOVER_TIMEOUT_S:g} s; {re.escape(HINT)}",
        line,
    ), line
    hosts.run(migration_status(hosts.src, MigrationStatus.POSTCOPY_PAUSED, 5 * FACTOR))

    # Nothing was lost: the link and the relay return, and a new migrate resumes.
    hosts.serve.wait_for_log(LIVENESS_CLOSED, timeout=PAUSE_BOUND_S)
    hosts.ns.set_link(True)
    hosts.connect()
    resume = hosts.migrate(RECOVER_TIMEOUT_S)
    assert wait_exit(resume, MIGRATION_TIMEOUT_S) == 0, resume.log()
    hosts.serve.wait_for_log(RECOVERED_LINE, timeout=5 * FACTOR)
    hosts.run(_finish(hosts.src, hosts.dst))
    assert first_difference(hosts.src.ram_path, hosts.dst.ram_path) is None
