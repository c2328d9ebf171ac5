"""Run ``migrelay`` commands as subprocesses and check migrations, for the CLI e2e tests.

`Command` keeps stdout and stderr apart (progress goes to stdout, errors to stderr), in
files, so a test can poll what a running command printed so far. ``serve`` and
``connect`` come from the ``migrelay_procs`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from migrelay.control.migration import wait_destination_completed
from migrelay.control.qmp import QMP, MigrationInfo, MigrationStatus, RunState
from migrelay.lab.vm import DisposableVM, first_difference
from tests.helpers import FACTOR
from tests.processes import MigrelayProcess, MigrelayProcesses

#: Generous for 64 MiB over a relay on a shared 2-core host (~1 s when idle).
MIGRATION_TIMEOUT_S = 120.0 * FACTOR
#: A command that only talks to QMP: python start-up and a few commands.
QUICK_TIMEOUT_S = 30.0 * FACTOR
#: Slow enough that 64 MiB takes ~8 s, so a test can act while the migration runs.
SLOW_BANDWIDTH = "8M"


class Command:
    """One ``python -m migrelay ARGS`` process with its stdout and stderr in files.

    Args:
        directory: where the output files go.
        label: a name for the files.
        args: the command line after ``migrelay``.
        env: variables added to the environment.
        stdout_fd: a descriptor to use as stdout instead of a file (a pty).
    """

    def __init__(
        self,
        directory: Path,
        label: str,
        args: tuple[str, ...],
        env: Mapping[str, str] | None = None,
        stdout_fd: int | None = None,
    ) -> None:
        self.args = args
        self.stdout_path = directory / f"{label}.out"
        self.stderr_path = directory / f"{label}.err"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "migrelay", *args],
                stdin=subprocess.DEVNULL,
                stdout=stdout_fd if stdout_fd is not None else out,
                stderr=err,
                env=full_env,
            )

    def __repr__(self) -> str:
        return f"Command({' '.join(self.args)!r}, pid={self.popen.pid})"

    def stdout(self) -> str:
        """What the command printed to stdout so far."""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        """What the command printed to stderr so far."""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        """The command, its exit status and its output, for assertion messages."""
        return (
            f"{self!r} exit {self.popen.poll()}\n--- stdout:\n{self.stdout()}"
            f"\n--- stderr:\n{self.stderr()}"
        )

    async def wait(self, timeout_s: float = MIGRATION_TIMEOUT_S) -> int:
        """Wait (polling, without blocking the loop) for the exit status."""
        deadline = time.monotonic() + timeout_s
        while (returncode := self.popen.poll()) is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"still running after {timeout_s:g} s: {self.describe()}")
            await asyncio.sleep(0.02)
        return returncode

    async def wait_for_stdout(
        self, pattern: str, timeout_s: float = QUICK_TIMEOUT_S
    ) -> re.Match[str]:
        """Poll stdout until ``pattern`` matches; fail if the command exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(self.stdout())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"exited before printing {pattern!r}: {self.describe()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {pattern!r} within {timeout_s:g} s: {self.describe()}")
            await asyncio.sleep(0.02)

    def interrupt(self) -> None:
        """Send SIGINT, as Ctrl-C in a terminal does."""
        self.popen.send_signal(signal.SIGINT)

    def stop(self) -> None:
        """SIGKILL and reap the process if it still runs (teardown)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


class NetnsCommand(Command):
    """A `Command` run under a prefix (``ip netns exec NS``, which execs it)."""

    def __init__(
        self, directory: Path, label: str, args: tuple[str, ...], prefix: Sequence[str]
    ) -> None:
        self.args = args
        self.stdout_path = directory / f"{label}.out"
        self.stderr_path = directory / f"{label}.err"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [*prefix, sys.executable, "-m", "migrelay", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
            )


class Commands:
    """Starts `Command` processes in a directory and kills leftovers at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Command] = []

    def start(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdout_fd: int | None = None,
    ) -> Command:
        """Start ``migrelay ARGS``; see `Command`."""
        label = f"{args[0]}-{len(self.started)}"
        command = Command(self.directory, label, args, env, stdout_fd)
        self.started.append(command)
        return command

    def migrate(
        self,
        vm: DisposableVM,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdout_fd: int | None = None,
    ) -> Command:
        """Start ``migrelay migrate --qmp QMP-OF-VM ARGS``; see `start`."""
        return self.start(
            "migrate", "--qmp", str(vm.qmp_path), *args, env=env, stdout_fd=stdout_fd
        )

    async def run(self, *args: str, timeout_s: float = QUICK_TIMEOUT_S) -> Command:
        """Run ``migrelay ARGS`` to its end and return it (exit status in ``popen``)."""
        command = self.start(*args)
        await command.wait(timeout_s)
        return command


def commands_in(sock_dir: Path) -> Iterator[Commands]:
    """Body of the ``commands`` fixture (``tests/e2e/conftest.py``): leftovers are killed
    at teardown."""
    started = Commands(sock_dir)
    try:
        yield started
    finally:
        for command in started.started:
            command.stop()


def assert_one_line_error(command: Command, *fragments: str, code: int = 1) -> str:
    """The command exited with ``code`` and said why in one ``migrelay: error:`` line.

    No traceback, nothing else on stderr; every fragment appears in the line.

    Returns:
        The line, newline included, for the test's own checks.
    """
    assert command.popen.returncode == code, command.describe()
    stderr = command.stderr()
    assert stderr.startswith("migrelay: error: "), command.describe()
    assert stderr.count("\n") == 1, command.describe()
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, command.describe()
    return stderr


def summary_line(stdout: str) -> str:
    """The last line a command printed (``migrate``'s summary)."""
    lines = stdout.strip().splitlines()
    assert lines, "no output"
    return lines[-1]


async def under_way(serve: MigrelayProcess, target: str, migrate: Command) -> None:
    """The migration to ``target`` carries data end to end (not only buffered).

    The source relay buffers a little before its WebSocket is up, so ``active`` alone
    does not say that the destination gets data: serve must have opened the channel.
    """
    await asyncio.to_thread(serve.wait_for_log, rf"channel \S+/0 opened: .*\(target {target}\)")
    await migrate.wait_for_stdout(r"(?m)^active .*transferred [1-9]")


def serve_qmp_dir(procs: MigrelayProcesses, directory: Path, *args: str) -> MigrelayProcess:
    """``migrelay serve --target-dir DIR --qmp-dir DIR ARGS``: the server of the
    two-command form, which prepares each destination VM of ``directory`` itself."""
    return procs.serve("--target-dir", str(directory), "--qmp-dir", str(directory), *args)


def migrate_slowly(
    commands: Commands, serve: MigrelayProcess, src: DisposableVM, dst: DisposableVM
) -> Command:
    """Start ``migrate --to SERVE/DST --max-bandwidth SLOW_BANDWIDTH`` (``--to``: the
    source relay runs in-process), slow enough for a test to act while it runs."""
    return commands.migrate(
        src, "--to", f"{serve.url}/{dst.name}", "--max-bandwidth", SLOW_BANDWIDTH
    )


async def migrate_under_way(
    commands: Commands, serve: MigrelayProcess, src: DisposableVM, dst: DisposableVM
) -> Command:
    """`migrate_slowly`, returned once the migration carries data end to end (`under_way`)."""
    migrate = migrate_slowly(commands, serve, src, dst)
    await under_way(serve, dst.name, migrate)
    return migrate


async def source_state(src: DisposableVM) -> tuple[RunState, MigrationInfo]:
    """The source's runstate and last migration, through its own QMP socket."""
    async with QMP(src.name) as qmp:
        await qmp.connect(str(src.qmp_path))
        return await qmp.query_status(), await qmp.query_migrate()


async def check_migrated(src: DisposableVM, dst: DisposableVM) -> MigrationInfo:
    """Wait for the destination's own ``completed``, quit both QEMUs, compare RAM.

    DESIGN.md §7: the source completes first, so only the destination's own status
    says that all of RAM has arrived; the files are compared after both QEMUs exited.
    """
    async with QMP(dst.name) as dst_qmp:
        await dst_qmp.connect(str(dst.qmp_path))
        final = await wait_destination_completed(dst_qmp, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        await dst_qmp.quit()
    async with QMP(src.name) as src_qmp:
        await src_qmp.connect(str(src.qmp_path))
        assert await src_qmp.query_status() is RunState.POSTMIGRATE
        await src_qmp.quit()
    assert await dst.wait(QUICK_TIMEOUT_S) == 0
    assert await src.wait(QUICK_TIMEOUT_S) == 0
    assert first_difference(src.ram_path, dst.ram_path) is None
    return final
