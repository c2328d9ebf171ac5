"""Faults in the middle of a real migration between two "hosts" (network namespaces).

::

    source namespace                                 destination namespace
    QEMU src ──unix──▶ migrelay connect ══veth══▶ migrelay serve ──unix──▶ QEMU dst

The source migrates at 16 MiB/s (``max-bandwidth``), so 64 MiB take ~4 s and the fault
always hits a running migration, and both relays use a 1 s ping interval and a 2 s ping
timeout, so a silent peer is declared dead 3 s after its last byte. For each fault:

* the source's migration reaches ``failed`` within the bound of its kind of fault (the
  README's fault table): a kill within :data:`AT_ONCE_BOUND_S` (below the earliest a
  liveness timeout could end it, so a kill noticed only by the liveness check fails the
  test), a cut link or a frozen ``serve`` within :data:`LIVENESS_BOUND_S` and not before
  the liveness check could have decided, a frozen ``connect`` by ``migrelay migrate
  --stall-timeout 3`` (run as a command) within :data:`STALL_BOUND_S` and not before
  the stall timeout;
* the source VM is intact: still in ``prelaunch`` (where it started) and its RAM file
  unchanged;
* the surviving relay(s) logged one "closed" line that names the cause;
* no established TCP connection is left in either namespace, and no relay holds a TCP
  or unix connection in any state but listening (half-closed ones count); at the end no
  process is left in them and no relay socket file is left on disk;
* a second migration right after (fresh destination VM; relays restarted where one was
  killed) completes with RAM identical.

Run with ``-s`` to see the measured time to failure: the README's fault table is
``benches/results/2026-12-01-faults.log``, the output of
``.venv/bin/pytest tests/e2e/test_faults.py -s -p no:randomly``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationInfo, MigrationStatus, RunState
from migrelay.lab.netns import LinkedNamespaces
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

RAM_BYTES = 64 * MIB
#: The source's rate limit while the fault hits: 64 MiB take ~4 s.
SLOW_BANDWIDTH = 16 * MIB
#: The fault is injected once this much has been sent (so the migration is under way).
FAULT_AFTER_BYTES = 6 * MIB
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
LIVENESS_S = PING_INTERVAL_S + PING_TIMEOUT_S
#: The earliest a liveness timeout can end a channel after the fault: the peer's last
#: byte may have come up to one ping interval before it.
LIVENESS_EARLIEST_S = LIVENESS_S - PING_INTERVAL_S
#: A kill is seen at once (EOF or reset on a live connection; README: 0.08-0.09 s): 1 s
#: for scheduling, scaled, but never as late as a liveness timeout could come, so that a
#: kill the survivor noticed only by its liveness check fails the test.
AT_ONCE_BOUND_S = min(1.0 * FACTOR, LIVENESS_EARLIEST_S)
#: A silent peer is declared dead at most ``2 × ping interval + ping timeout`` after its
#: last byte (`Limits.ping_timeout`; README: "within 30-45 s" with the defaults), plus
#: 0.5 s for QEMU to see the closed socket, scaled.
LIVENESS_BOUND_S = 2 * PING_INTERVAL_S + PING_TIMEOUT_S + 0.5 * FACTOR
#: ``migrate --stall-timeout`` in the test (README: "3 in the test").
STALL_TIMEOUT_S = 3.0
#: The time to ``migrate``'s exit: QEMU fills the kernel's socket buffers for ~0.5 s
#: after the relay froze (16 MiB/s), ``migrate`` (not on a terminal) polls every 0.5 s,
#: so the stall is seen at most ~1 s after the timeout, then the yank, the failure and
#: the exit; 2 s for scheduling, scaled (measured: 3.7-4.8 s on a busy host).
STALL_BOUND_S = STALL_TIMEOUT_S + 1.0 + 2.0 * FACTOR
MIGRATION_TIMEOUT_S = 60.0 * FACTOR
PORT = 8765
LIVENESS_ARGS = ("--ping-interval", str(PING_INTERVAL_S), "--ping-timeout", str(PING_TIMEOUT_S))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in result.stdout.split()]


def established_connections(namespace: str) -> list[str]:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "ss", "-Htn", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def closed_lines(relay: MigrelayProcess) -> list[str]:
    """The relay's "channel ... closed: ..." lines, without the timestamp and level."""
    return [
        line.split(" INFO ", 1)[-1] for line in relay.log().splitlines() if " closed: " in line
    ]


@dataclass
class Hosts:
    """Two namespaces, the relays in them, and the VMs; everything is cleaned up."""

    ns: LinkedNamespaces
    sock_dir: Path
    procs: MigrelayProcesses
    #: The ``run_e2e`` fixture: the test's coroutines run through it.
    run: AsyncRunner
    vms: list[DisposableVM] = field(default_factory=list)

    @property
    def dest_sock(self) -> Path:
        return self.sock_dir / "dest.sock"

    @property
    def source_sock(self) -> Path:
        return self.sock_dir / "source.sock"

    def serve(self) -> MigrelayProcess:
        return self.procs.serve(
            "--target", str(self.dest_sock), "--token-file", str(self.sock_dir / "token"),
            "--wait-target", "10", *LIVENESS_ARGS,
            listen=f"{self.ns.dest_addr}:{PORT}", prefix=self.ns.prefix(self.ns.dest_ns),
        )  # fmt: skip

    def connect(self) -> MigrelayProcess:
        return self.procs.connect(
            f"ws://{self.ns.dest_addr}:{PORT}/", self.source_sock,
            "--token-file", str(self.sock_dir / "token"), *LIVENESS_ARGS,
            prefix=self.ns.prefix(self.ns.source_ns),
        )  # fmt: skip

    def vm(self, name: str, *, incoming: bool) -> DisposableVM:
        ns = self.ns.dest_ns if incoming else self.ns.source_ns
        vm = DisposableVM(
            self.sock_dir, name, RAM_BYTES, incoming=incoming, command_prefix=self.ns.prefix(ns)
        )
        self.vms.append(vm)
        return vm


@pytest.fixture
def hosts(
    sock_dir: Path, migrelay_procs: MigrelayProcesses, run_e2e: AsyncRunner
) -> Iterator[Hosts]:
    """Linked namespaces with a token file in ``sock_dir``; all torn down afterwards."""
    (sock_dir / "token").write_text("fault-test-token\n")
    with LinkedNamespaces() as ns:
        hosts = Hosts(ns, sock_dir, migrelay_procs, run_e2e)
        try:
            yield hosts
        finally:
            migrelay_procs.stop_all()
            for vm in hosts.vms:
                vm.kill()


@dataclass(frozen=True)
class FaultOutcome:
    seconds_to_failure: float
    source_error: str
    #: The bound the failure had to come within (one of the ``*_BOUND_S``).
    bound: float


async def migrate_until_fault(
    sq: QMP, dq: QMP, hosts: Hosts, inject: Callable[[], None], bound: float
) -> FaultOutcome:
    """Start a slow migration, call ``inject`` mid-way, and wait for ``failed``.

    The source must fail within ``bound`` seconds of the fault.
    """
    options = MigrationOptions(max_bandwidth=SLOW_BANDWIDTH)
    await prepare_incoming(dq, f"unix:{hosts.dest_sock}", options)
    await start_migration(sq, f"unix:{hosts.source_sock}", options)
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        info = await sq.query_migrate()
        assert not info.status.is_terminal, f"migration ended before the fault: {info}"
        if info.status is MigrationStatus.ACTIVE and (info.transferred or 0) >= FAULT_AFTER_BYTES:
            break
        assert time.monotonic() < deadline, "migration did not get under way"
        await asyncio.sleep(0.02)
    fault_at = time.monotonic()
    inject()
    final = await wait_failed(sq, fault_at, bound)
    return FaultOutcome(time.monotonic() - fault_at, final.error_desc or "", bound)


async def wait_failed(sq: QMP, since: float, bound: float) -> MigrationInfo:
    """Poll the source until ``failed``; fail the test past ``bound`` seconds."""
    while True:
        info = await sq.query_migrate()
        if info.status is MigrationStatus.FAILED:
            return info
        assert info.status not in (MigrationStatus.COMPLETED, MigrationStatus.CANCELLED), info
        elapsed = time.monotonic() - since
        assert elapsed < bound, (
            f"source still {info.status} {elapsed:.2f} s after the fault (bound {bound:g} s)"
        )
        await sq.next_migration_event(0.05)


async def migrate_again(sq: QMP, src: DisposableVM, hosts: Hosts, name: str) -> None:
    """A second migration of the same source to a fresh destination, at full speed."""
    dst = hosts.vm(name, incoming=True)
    await dst.start()
    options = MigrationOptions()
    async with QMP(name) as dq:
        await dq.connect(str(dst.qmp_path))
        await prepare_incoming(dq, f"unix:{hosts.dest_sock}", options)
        await start_migration(sq, f"unix:{hosts.source_sock}", options)
        final = await wait_destination_completed(dq, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        assert (await sq.query_migrate()).status is MigrationStatus.COMPLETED
        await dq.quit()
    await sq.quit()
    assert await src.wait(30 * FACTOR) == 0
    assert await dst.wait(30 * FACTOR) == 0
    assert first_difference(src.ram_path, dst.ram_path) is None


def sockets_held_by_relays(hosts: Hosts) -> list[str]:
    """Connected TCP and unix sockets (any state but listening) that a relay still holds.

    Unix sockets belong to the network namespace of the process that made them, so each
    namespace is asked; QEMU's own sockets (its QMP connection) are not the relays'.
    """
    pids = [p.pid for p in hosts.procs.processes if p.popen.poll() is None]
    held: list[str] = []
    for namespace in (hosts.ns.source_ns, hosts.ns.dest_ns):
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, "ss", "-Hp", "-A", "tcp,unix", "state",
             "connected"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        lines = [
            line
            for line in result.stdout.splitlines()
            if any(f"pid={pid}," in line for pid in pids)
        ]
        # The event loop's own wake-up socketpair: both ends in one process, for good.
        inodes = {line.split()[5] for line in lines if line.startswith("u_str")}
        held += [
            line for line in lines if not (line.startswith("u_str") and line.split()[7] in inodes)
        ]
    return held


def wait_no_connections(hosts: Hosts, timeout: float = 5.0) -> None:
    """Both relays let go of everything of the failed migration.

    No established TCP connection in either namespace (held by anyone), and no
    connected TCP or unix socket (half-closed ones included) held by a relay.
    """
    deadline = time.monotonic() + timeout * FACTOR
    while True:
        left = established_connections(hosts.ns.source_ns) + established_connections(
            hosts.ns.dest_ns
        )
        left += sockets_held_by_relays(hosts)
        if not left:
            return
        assert time.monotonic() < deadline, f"connections left after the fault: {left}"
        time.sleep(0.05)


def check_nothing_left(hosts: Hosts) -> None:
    """After a graceful stop: no process in the namespaces, no relay socket on disk."""
    hosts.procs.stop_all()
    for process in hosts.procs.processes:
        assert process.popen.returncode is not None
    deadline = time.monotonic() + 10 * FACTOR
    while pids := namespace_pids(hosts.ns.source_ns) + namespace_pids(hosts.ns.dest_ns):
        assert time.monotonic() < deadline, f"processes left in the namespaces: {pids}"
        time.sleep(0.05)
    assert not hosts.source_sock.exists(), "connect left its socket file behind"


RESULTS: list[str] = []


def report(fault: str, outcome: FaultOutcome, relay_lines: list[str]) -> None:
    line = (
        f"FAULT {fault}: source failed after {outcome.seconds_to_failure:.2f} s "
        f"(bound {outcome.bound:g} s); qemu: {outcome.source_error!r}; "
        f"relay: {' | '.join(relay_lines)}; retry: completed, RAM identical"
    )
    RESULTS.append(line)
    print("\n" + line)


def run_fault(
    hosts: Hosts,
    inject: Callable[[Hosts, DisposableVM, DisposableVM], None],
    after_failure: Callable[[Hosts], None],
    bound: float,
    source_running: bool = False,
) -> FaultOutcome:
    """The common scenario: migrate, inject, check the source, recover, migrate again.

    With ``source_running`` the source VM runs (``cont``) instead of staying in
    ``prelaunch``; it must still run after the fault. (Its firmware then writes to its
    RAM, so the RAM is compared only after the retry, not against the start.)
    """

    async def scenario() -> FaultOutcome:
        src = hosts.vm("src", incoming=False)
        dst = hosts.vm("dst", incoming=True)
        await src.start()
        await dst.start()
        ram_before = sha256_file(src.ram_path)
        async with QMP("src") as sq, QMP("dst") as dq:
            await sq.connect(str(src.qmp_path))
            await dq.connect(str(dst.qmp_path))
            assert await sq.query_status() is RunState.PRELAUNCH
            if source_running:
                await sq.execute("cont")
            before = await sq.query_status()
            outcome = await migrate_until_fault(
                sq, dq, hosts, lambda: inject(hosts, src, dst), bound
            )
            # The source VM is intact: where it was, RAM untouched, QMP answering.
            assert await sq.query_status() is before
            if not source_running:
                assert sha256_file(src.ram_path) == ram_before
            await asyncio.to_thread(after_failure, hosts)
            await dst.terminate()
            await migrate_again(sq, src, hosts, "dst2")
        return outcome

    return hosts.run(scenario())


# -- the faults -----------------------------------------------------------------------------


def test_source_relay_killed_mid_migration_fails_source_at_once_and_retry_completes(
    hosts: Hosts,
) -> None:
    server = hosts.serve()
    client = hosts.connect()

    def inject(hosts: Hosts, src: DisposableVM, dst: DisposableVM) -> None:
        os.kill(client.pid, signal.SIGKILL)

    def recover(hosts: Hosts) -> None:
        line = server.wait_for_log(r"channel \S+ closed: [^\n]*")
        assert "websocket" in line.group(0), line.group(0)
        wait_no_connections(hosts)
        client.popen.wait(5 * FACTOR)
        hosts.connect()  # replaces the stale socket file of the killed one

    outcome = run_fault(hosts, inject, recover, AT_ONCE_BOUND_S)
    lines = closed_lines(server)
    assert len(lines) == 2, lines  # the fault, then the retry
    assert "closed without a close frame" in lines[0] or "connection lost" in lines[0]
    report("kill -9 source relay (connect)", outcome, lines[:1])
    check_nothing_left(hosts)


@pytest.mark.parametrize("source_running", [False, True], ids=["prelaunch", "running"])
def test_destination_relay_killed_mid_migration_fails_source_at_once_and_retry_completes(
    hosts: Hosts, source_running: bool
) -> None:
    # Also with a guest that runs: after the failure it must be running, not paused or
    # stopped by the failed migration (run_fault checks the run state it had).
    server = hosts.serve()
    client = hosts.connect()

    def inject(hosts: Hosts, src: DisposableVM, dst: DisposableVM) -> None:
        os.kill(server.pid, signal.SIGKILL)

    def recover(hosts: Hosts) -> None:
        client.wait_for_log(r"session \S+ ended: [^\n]*failed")
        wait_no_connections(hosts)
        server.popen.wait(5 * FACTOR)
        hosts.serve()

    outcome = run_fault(hosts, inject, recover, AT_ONCE_BOUND_S, source_running=source_running)
    assert outcome.source_error, outcome
    lines = closed_lines(client)
    assert len(lines) == 2, lines
    assert "closed without a close frame" in lines[0] or "connection lost" in lines[0]
    source = "running source" if source_running else "source in prelaunch"
    report(f"kill -9 destination relay (serve), {source}", outcome, lines[:1])
    check_nothing_left(hosts)


def test_destination_qemu_killed_mid_migration_fails_source_at_once_and_retry_completes(
    hosts: Hosts,
) -> None:
    server = hosts.serve()
    client = hosts.connect()

    def inject(hosts: Hosts, src: DisposableVM, dst: DisposableVM) -> None:
        assert dst.pid is not None
        os.kill(dst.pid, signal.SIGKILL)

    def recover(hosts: Hosts) -> None:
        client.wait_for_log(r"session \S+ ended: [^\n]*failed")
        wait_no_connections(hosts)

    outcome = run_fault(hosts, inject, recover, AT_ONCE_BOUND_S)
    server_lines, client_lines = closed_lines(server), closed_lines(client)
    assert len(server_lines) == len(client_lines) == 2, (server_lines, client_lines)
    assert "unix side closed" in server_lines[0], server_lines[0]
    assert "close code 4000 destination closed" in server_lines[0], server_lines[0]
    assert "peer closed with 4000 destination closed" in client_lines[0], client_lines[0]
    report("kill -9 destination QEMU", outcome, [server_lines[0], client_lines[0]])
    check_nothing_left(hosts)


def test_link_cut_beyond_liveness_timeout_fails_source_within_bound_and_retry_completes(
    hosts: Hosts,
) -> None:
    server = hosts.serve()
    client = hosts.connect()

    def inject(hosts: Hosts, src: DisposableVM, dst: DisposableVM) -> None:
        hosts.ns.set_link(False)

    def recover(hosts: Hosts) -> None:
        server.wait_for_log(r"channel \S+ closed: [^\n]*liveness timeout")
        client.wait_for_log(r"channel \S+ closed: [^\n]*liveness timeout")
        wait_no_connections(hosts)
        hosts.ns.set_link(True)

    outcome = run_fault(hosts, inject, recover, LIVENESS_BOUND_S)
    # Nothing reached the peer while the link was down: each side's own timer decided.
    assert outcome.seconds_to_failure >= LIVENESS_EARLIEST_S
    lines = [closed_lines(server)[0], closed_lines(client)[0]]
    for line in lines:
        assert "(liveness timeout)" in line and "close code 4002" in line, line
    report("link cut (ip link set down)", outcome, lines)
    check_nothing_left(hosts)


def test_destination_relay_frozen_is_declared_dead_by_liveness_and_retry_completes(
    hosts: Hosts,
) -> None:
    server = hosts.serve()
    client = hosts.connect()

    def inject(hosts: Hosts, src: DisposableVM, dst: DisposableVM) -> None:
        os.kill(server.pid, signal.SIGSTOP)

    def recover(hosts: Hosts) -> None:
        client.wait_for_log(r"channel \S+ closed: [^\n]*liveness timeout")
        os.kill(server.pid, signal.SIGCONT)
        # Thawed, the server finds its WebSocket reset and closes destination QEMU's side.
        server.wait_for_log(r"channel \S+ closed: ")
        wait_no_connections(hosts)

    outcome = run_fault(hosts, inject, recover, LIVENESS_BOUND_S)
    assert outcome.seconds_to_failure >= LIVENESS_EARLIEST_S
    client_line = closed_lines(client)[0]
    assert "(liveness timeout)" in client_line and "close code 4002" in client_line
    report("SIGSTOP destination relay (serve)", outcome, [client_line, closed_lines(server)[0]])
    check_nothing_left(hosts)


def test_source_relay_frozen_is_shut_down_by_migrate_stall_timeout_and_retry_completes(
    hosts: Hosts,
) -> None:
    # A frozen source relay is on the source host itself: QEMU's socket to it stays open
    # and QEMU waits on it for ever. Only the side that follows the migration can tell
    # that no data moves: `migrelay migrate --stall-timeout 3`, run as the operator runs
    # it, then shuts the stream down (yank) and exits 1 with one line. The server
    # meanwhile declares the frozen relay dead and frees the destination.
    server = hosts.serve()
    client = hosts.connect()

    async def scenario() -> FaultOutcome:
        src = hosts.vm("src", incoming=False)
        dst = hosts.vm("dst", incoming=True)
        await src.start()
        await dst.start()
        ram_before = sha256_file(src.ram_path)
        async with QMP("dst") as dq:
            await dq.connect(str(dst.qmp_path))
            await prepare_incoming(dq, f"unix:{hosts.dest_sock}", MigrationOptions())
        # QEMU's monitor serves one client at a time: the test lets `migrate` have it.
        migrate = hosts.procs.start(
            "migrate", "--qmp", str(src.qmp_path), "--socket", str(hosts.source_sock),
            "--max-bandwidth", str(SLOW_BANDWIDTH), "--stall-timeout", f"{STALL_TIMEOUT_S:g}",
            prefix=hosts.ns.prefix(hosts.ns.source_ns), name="migrate",
        )  # fmt: skip
        await asyncio.to_thread(wait_transferred, migrate, FAULT_AFTER_BYTES)
        fault_at = time.monotonic()
        os.kill(client.pid, signal.SIGSTOP)
        try:
            status = await asyncio.to_thread(migrate.wait, STALL_BOUND_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"migrate still running {STALL_BOUND_S:g} s after the fault:\n{migrate.log()}"
            ) from None
        exited_after = time.monotonic() - fault_at
        assert status == 1, migrate.log()
        # One line that names the cause, then QEMU's own words (and whatever hint
        # follows them).
        errors = [line for line in migrate.log().splitlines() if "error" in line]
        assert len(errors) == 1, migrate.log()
        assert errors[0].startswith(
            f"migrelay: error: migration failed: no data moved for {STALL_TIMEOUT_S:g} s, so"
            " the stuck stream was shut down (a frozen relay or peer?); qemu: Unable to write"
            " to socket: Broken pipe"
        ), migrate.log()
        async with QMP("src") as sq:
            await sq.connect(str(src.qmp_path))
            final = await sq.query_migrate()
            assert final.status is MigrationStatus.FAILED, final
            # The source VM is intact: where it was, RAM untouched, QMP answering.
            assert await sq.query_status() is RunState.PRELAUNCH
            assert sha256_file(src.ram_path) == ram_before
            await asyncio.to_thread(recover, hosts)
            await dst.terminate()
            await migrate_again(sq, src, hosts, "dst2")
        return FaultOutcome(exited_after, final.error_desc or "", STALL_BOUND_S)

    def recover(hosts: Hosts) -> None:
        server.wait_for_log(r"channel \S+ closed: [^\n]*liveness timeout")
        os.kill(client.pid, signal.SIGCONT)
        client.wait_for_log(r"channel \S+ closed: ")
        wait_no_connections(hosts)

    outcome = hosts.run(scenario())
    assert outcome.seconds_to_failure >= STALL_TIMEOUT_S
    server_line = closed_lines(server)[0]
    assert "(liveness timeout)" in server_line and "close code 4002" in server_line
    report("SIGSTOP source relay (connect), migrate --stall-timeout 3", outcome,
           [server_line, closed_lines(client)[0]])  # fmt: skip
    check_nothing_left(hosts)


#: ``migrate``'s progress line (not on a terminal): ``active  12% transferred 7.6 MiB …``.
_TRANSFERRED = re.compile(r"transferred ([0-9.]+) (B|KiB|MiB|GiB)\b")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def wait_transferred(migrate: MigrelayProcess, size: int) -> None:
    """Wait until ``migrate``'s progress lines say that ``size`` bytes went out."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        sent = [float(n) * _UNITS[u] for n, u in _TRANSFERRED.findall(migrate.log())]
        if sent and max(sent) >= size:
            return
        assert migrate.popen.poll() is None, migrate.log()
        assert time.monotonic() < deadline, f"migration did not get under way:\n{migrate.log()}"
        time.sleep(0.05)
