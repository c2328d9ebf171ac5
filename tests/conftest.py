"""Fixtures shared by every test directory (unit, integration, end to end).

* ``loop_impl``: each test that takes it runs once on asyncio and once on uvloop.
* :func:`run` and the ``run_async`` fixture run a coroutine on that loop and fail the
  test on anything the loop reported to its exception handler, and on tasks the test
  left running (uvloop ``_testbase`` and websockets' test cases do the same).
* ``logs``: pytest's ``caplog`` at INFO for the ``migrelay`` loggers.
* ``sock_dir``: a short directory under ``/tmp`` for unix sockets (``sun_path`` holds
  107 bytes; pytest's ``tmp_path`` is often longer than that) and the test's other
  files; the control and e2e tests use it too.
* ``migrelay_procs``: starts ``migrelay serve`` / ``migrelay connect`` (or any other
  ``migrelay`` command) as real subprocesses, waits until they listen, keeps their log,
  and always stops them on teardown.

Tests take these as fixtures instead of importing this module: pytest imports every
``conftest.py`` under the name ``conftest``, so an import from here would find whichever
one (this, or ``tests/e2e/conftest.py``) was loaded last.

Timeouts are multiplied by the environment variable ``MIGRELAY_TEST_TIMEOUT_FACTOR``
(default 1) on slow or busy hosts (read once, in ``tests/helpers.py``); :data:`MS` is
one scaled millisecond.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import pytest

from migrelay.aio import runner
from migrelay.aio.runner import LoopName
from tests.helpers import FACTOR, short_temp_dir

T = TypeVar("T")

#: One millisecond of timeout, scaled (websockets ``tests/utils.py`` MS).
MS: float = 0.001 * FACTOR
#: Both loops the relays support (DESIGN.md §4: uvloop, asyncio where it is absent).
LOOP_IMPLS: tuple[LoopName, ...] = ("asyncio", "uvloop")
#: Longest a coroutine given to :func:`run` may take.
RUN_TIMEOUT_SECONDS: float = 120.0 * FACTOR
#: How long a subprocess gets to start listening (typer and uvloop imports take ~0.5 s).
START_TIMEOUT_SECONDS: float = 15.0 * FACTOR
#: How long a subprocess gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS: float = 5.0 * FACTOR


# -- event loops ------------------------------------------------------------------------


@pytest.fixture(params=LOOP_IMPLS)
def loop_impl(request: pytest.FixtureRequest) -> LoopName:
    """The event loop implementation a test runs on: ``"asyncio"`` or ``"uvloop"``."""
    return cast(LoopName, request.param)


def run(
    coro: Coroutine[Any, Any, T], loop_impl: LoopName, timeout: float = RUN_TIMEOUT_SECONDS
) -> T:
    """Run ``coro`` on ``loop_impl`` through :func:`migrelay.aio.runner.run`.

    Args:
        coro: the test's body.
        loop_impl: ``"asyncio"`` or ``"uvloop"``.
        timeout: seconds before ``coro`` is cancelled. A loop timer, so it works where
            pytest-timeout's SIGALRM does not interrupt an idle uvloop loop.

    Raises:
        AssertionError: the loop's exception handler was called (an exception in a
            callback, a protocol or a task nobody awaited), or the coroutine returned
            while other tasks were still running (they are cancelled first).
        TimeoutError: ``coro`` ran longer than ``timeout``.
    """
    return runner.run(_checked(coro, timeout), loop_impl)


async def _checked(coro: Coroutine[Any, Any, T], limit_seconds: float) -> T:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        reported.append(context)

    loop.set_exception_handler(handler)
    try:
        result = await asyncio.wait_for(coro, limit_seconds)
    except BaseException:
        # The test failed: end what it left running, but never wait on it for good (the
        # loop's own shutdown would, and a hang there is no failure report at all).
        await _cancel_leftovers()
        raise
    # Let callbacks that closing transports scheduled (connection_lost) run.
    for _ in range(5):
        await asyncio.sleep(0)
    leaked = await _cancel_leftovers()
    problems = [f"task left running: {task!r}" for task in leaked]
    problems += [
        f"loop exception handler called: {context.get('message')!r} {context.get('exception')!r}"
        for context in reported
    ]
    if problems:
        raise AssertionError("; ".join(problems))
    return result


#: How long tasks left running get to end once cancelled.
CANCEL_TIMEOUT_SECONDS: float = 5.0 * FACTOR


async def _cancel_leftovers() -> list[asyncio.Task[Any]]:
    """Cancel every other task and wait (bounded) for them; return those there were.

    Raises:
        AssertionError: a task was still running ``CANCEL_TIMEOUT_SECONDS`` after its
            cancellation (it swallows ``CancelledError``), with its stack.
    """
    leaked = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in leaked:
        task.cancel()
    if not leaked:
        return leaked
    _, stuck = await asyncio.wait(leaked, timeout=CANCEL_TIMEOUT_SECONDS)
    if stuck:
        stacks = "\n".join(f"{task!r}: {task.get_stack()}" for task in stuck)
        raise AssertionError(f"tasks ignored their cancellation:\n{stacks}")
    return leaked


class AsyncRunner(Protocol):
    """``run_async(coro)``: :func:`run` on the test's ``loop_impl``."""

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T: ...


@pytest.fixture
def run_async(loop_impl: LoopName) -> AsyncRunner:
    """Run a coroutine on the test's loop (parametrizes the test over both loops)."""

    def run_on_loop(coro: Coroutine[Any, Any, T]) -> T:
        return run(coro, loop_impl)

    return run_on_loop


# -- logs -------------------------------------------------------------------------------


@pytest.fixture
def logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """caplog at INFO for migrelay's loggers (even if a CLI test turned propagation off)."""
    monkeypatch.setattr(logging.getLogger("migrelay"), "propagate", True)
    caplog.set_level(logging.INFO, logger="migrelay")
    return caplog


# -- unix socket directory -------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory with a short path for unix sockets (and the test's other files:
    VM RAM, logs), removed afterwards. The one temporary directory of every test folder.
    """
    with short_temp_dir() as path:
        yield path


# -- migrelay subprocesses ---------------------------------------------------------------

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


@pytest.fixture
def migrelay_procs(sock_dir: Path) -> Iterator[MigrelayProcesses]:
    """Start ``migrelay`` subprocesses; all are stopped, and their logs printed, at teardown.

    The logs are printed so that pytest shows them with a failing test's captured output.
    """
    procs = MigrelayProcesses(sock_dir)
    try:
        yield procs
    finally:
        procs.stop_all()
        for process in procs.processes:
            print(f"----- {process.name} (exit {process.popen.returncode}): {process.argv}")
            print(process.log())
