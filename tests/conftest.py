"""Fixtures shared by every test directory (unit, integration, end to end).

* ``loop_impl``: each test that takes it runs once on asyncio and once on uvloop.
* ``run_async``: runs a coroutine on that loop through :func:`tests.loops.run`, which
  fails the test on anything the loop reported to its exception handler, and on tasks
  the test left running (uvloop ``_testbase`` and websockets' test cases do the same).
* ``logs``: pytest's ``caplog`` at INFO for the ``migrelay`` loggers.
* ``sock_dir``: a short directory under ``/tmp`` for unix sockets (``sun_path`` holds
  107 bytes; pytest's ``tmp_path`` is often longer than that) and the test's other
  files; the control and e2e tests use it too.
* ``migrelay_procs``: a :class:`tests.processes.MigrelayProcesses`: starts ``migrelay
  serve`` / ``migrelay connect`` (or any other ``migrelay`` command) as real
  subprocesses, waits until they listen, keeps their log, and always stops them on
  teardown.

Why both loops here and one in e2e: the unit, integration and control tests run the code
under test (codec, relays, QMP client) in the test's own process, on the test's loop, so
``run_async`` runs each of them on both loops the relays support. Most end-to-end tests
run the relays as ``migrelay`` subprocesses, which pick their own loop (uvloop, as in
production), while the test's loop only drives QMP and waits; running each real-QEMU
migration on both loops would add minutes to a suite that must stay near 6 minutes and
test nothing more. Those tests take ``run_e2e`` (``tests/e2e/conftest.py``): the same
runner and checks, on uvloop only.

This module and ``tests/e2e/conftest.py`` hold fixtures only. Tests take the fixtures and
never import a conftest (pytest imports every ``conftest.py`` under the name
``conftest``, so an import from one would find whichever was loaded last); what they
import to annotate them lives in plain modules: :mod:`tests.loops` (``AsyncRunner``,
``run``), :mod:`tests.processes` (``MigrelayProcess``, ``MigrelayProcesses``),
:mod:`tests.helpers`, :mod:`tests.e2e.vms`.

Timeouts are multiplied by the environment variable ``MIGRELAY_TEST_TIMEOUT_FACTOR``
(default 1) on slow or busy hosts (read once, in ``tests/helpers.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from migrelay.aio.runner import LoopName
from tests.helpers import short_temp_dir
from tests.loops import LOOP_IMPLS, AsyncRunner, run
from tests.processes import MigrelayProcesses

T = TypeVar("T")


# -- event loops ------------------------------------------------------------------------


@pytest.fixture(params=LOOP_IMPLS)
def loop_impl(request: pytest.FixtureRequest) -> LoopName:
    """The event loop implementation a test runs on: ``"asyncio"`` or ``"uvloop"``."""
    return cast(LoopName, request.param)


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
