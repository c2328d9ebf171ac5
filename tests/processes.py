"""``migrelay`` commands as real subprocesses, for the ``migrelay_procs`` fixture.

:class:`MigrelayProcesses` starts ``migrelay serve`` / ``migrelay connect`` (or any other
``migrelay`` command), waits until they listen, keeps their log and stops them all; the
``migrelay_procs`` fixture of ``tests/conftest.py`` makes one per test and stops it at
teardown. Test modules import these classes from here to annotate that fixture, never
from a conftest. :class:`RssSampler` follows one's resident memory (the load and soak
tests' bounds).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from migrelay.units import MIB
from tests.helpers import FACTOR

#: How long a subprocess gets to start listening (typer and uvloop imports take ~0.5 s).
START_TIMEOUT_SECONDS: float = 15.0 * FACTOR
#: How long a subprocess gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS: float = 5.0 * FACTOR

_LISTENING_WS = re.compile(r"listening on wss?://(\[[^\]]+\]|[^\s:]+):(\d+)")


@dataclass
class MigrelayProcess:
    """A running ``migrelay`` command; its stdout and stderr go to :attr:`log_path`."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    #: The port ``serve`` listens on (learnt from its log), else None.
    port: int | None = None
    #: The host ``serve`` listens on, as in a URL (``127.0.0.1``, ``[::1]``).
    host: str | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """The process id (the command itself: ``prefix`` commands must exec it)."""
        return self.popen.pid

    @property
    def url(self) -> str:
        """``ws://HOST:PORT`` of a ``serve`` process (append ``/NAME`` for a target)."""
        if self.port is None or self.host is None:
            raise AssertionError(f"{self.name} is not a listening serve process")
        return f"ws://{self.host}:{self.port}"

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT_SECONDS) -> re.Match[str]:
        """Poll the log until the regular expression ``pattern`` matches.

        Raises:
            AssertionError: the process exited first, or ``timeout`` seconds passed.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before logging "
                    f"{pattern!r}:\n{self.log()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name} did not log {pattern!r} within {timeout:g} s:\n{self.log()}"
                )
            time.sleep(0.01)

    def wait(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """Wait for the process to exit on its own; return its exit status."""
        return self.popen.wait(timeout)

    def rss_bytes(self) -> int:
        """The resident set size (``VmRSS`` in ``/proc/PID/status``)."""
        status = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
        match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        if match is None:
            raise AssertionError(f"no VmRSS for {self.name} (pid {self.pid})")
        return int(match.group(1)) * 1024

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGCONT and SIGTERM the process, SIGKILL it after ``timeout``; return its status.

        Safe to call twice and on a process that already exited or was SIGSTOPped.
        """
        if not self._stopped and self.popen.poll() is None:
            self._stopped = True
            for signum in (signal.SIGCONT, signal.SIGTERM):
                try:
                    self.popen.send_signal(signum)
                except ProcessLookupError:
                    break
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.wait()


class MigrelayProcesses:
    """Starts ``migrelay`` subprocesses for one test and stops them all afterwards.

    Args:
        log_dir: where each process's log file goes.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[MigrelayProcess] = []

    def start(
        self,
        *args: str,
        ready: str | None = None,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        name: str | None = None,
    ) -> MigrelayProcess:
        """Run ``python -m migrelay ARGS...`` and wait until its log matches ``ready``.

        Args:
            args: the command and its arguments (``"serve", "--target", ...``).
            ready: a regular expression the log must match before this returns;
                None returns at once.
            env: variables added to this process's environment.
            prefix: a command to run it under, such as ``("ip", "netns", "exec", "a")``;
                it must exec the command so that :attr:`MigrelayProcess.pid` is right.
            name: a label for log files and messages (default: the command).
        """
        label = name or (args[0] if args else "migrelay")
        label = f"{label}-{len(self.processes)}"
        log_path = self.log_dir / f"{label}.log"
        argv = [*prefix, sys.executable, "-m", "migrelay", *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        process = MigrelayProcess(label, argv, popen, log_path)
        self.processes.append(process)
        if ready is not None:
            process.wait_for_log(ready)
        return process

    def serve(
        self,
        *args: str,
        listen: str = "127.0.0.1:0",
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> MigrelayProcess:
        """Start ``migrelay serve --listen LISTEN ARGS...`` and wait until it listens.

        Port 0 (the default) lets the kernel choose a free port, without a race;
        :attr:`MigrelayProcess.port` and :attr:`MigrelayProcess.url` tell which.
        """
        process = self.start(
            "serve",
            "--listen",
            listen,
            *args,
            ready=_LISTENING_WS.pattern,
            env=env,
            prefix=prefix,
        )
        match = _LISTENING_WS.search(process.log())
        assert match is not None
        process.host, process.port = match.group(1), int(match.group(2))
        return process

    def connect(
        self,
        url: str,
        listen_unix: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> MigrelayProcess:
        """Start ``migrelay connect URL --listen-unix PATH ARGS...``; wait until it listens."""
        return self.start(
            "connect",
            url,
            "--listen-unix",
            str(listen_unix),
            *args,
            ready=rf"listening on {re.escape(str(listen_unix))}",
            env=env,
            prefix=prefix,
        )

    def stop_all(self) -> None:
        """Stop every process (SIGCONT, SIGTERM, then SIGKILL), newest first."""
        for process in reversed(self.processes):
            process.stop()


#: Headroom over the idle process for what is not migration data: per-connection
#: Python objects and asyncio/uvloop handles (a few KiB each), log records, allocator
#: slack.
INTERPRETER_ALLOWANCE_BYTES = 8 * MIB


class RssSampler:
    """Samples a process's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, process: MigrelayProcess, period: float = 0.02) -> None:
        self.process = process
        self.period = period
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.peak = max(self.peak, self.process.rss_bytes())
                self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_SECONDS)
