"""Fixtures for end-to-end tests with real QEMU processes (fixtures only: what the tests
import to annotate them is in ``tests/e2e/vms.py`` and ``tests/e2e/cli_helpers.py``).

``vm_pair``
    A `tests.e2e.vms.VMPairFactory`. Inside the test's own event loop::

        async with vm_pair(64 * MIB) as (src, dst):
            ...  # src: random RAM, started; dst: sparse RAM, -incoming defer, started

    Both QEMUs are terminated (SIGTERM, then SIGKILL) and reaped when the block exits, and
    again, synchronously, at fixture teardown if a test left one behind. The VMs' files
    go to ``sock_dir`` (``tests/conftest.py``), next to the test's sockets and logs.

``commands``
    A `tests.e2e.cli_helpers.Commands`: ``migrelay`` commands with stdout and stderr kept
    apart, in ``sock_dir``; those still running at teardown are killed.

``run_e2e``
    A `tests.loops.AsyncRunner`: ``run_e2e(main())`` runs a test's coroutine on uvloop
    through `tests.loops.run`, with the same checks as ``run_async`` (the loop's
    exception handler never called, no task left running). One loop, not both: most
    tests here run the relays under test as ``migrelay`` subprocesses, which pick their
    own loop (uvloop, as in production), and the test's loop only drives QMP and waits;
    running every real-QEMU migration twice would add minutes to the suite and test
    nothing more. The unit, integration and control tests, whose code under test runs
    on the test's loop, take ``run_async`` and run on both. So does
    ``test_qemu_control.py``, which tests the in-process QMP client against real QEMU
    (and, as of this writing, ``test_cli_control.py``'s short error-path runs).
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from migrelay.aio.runner import LoopName
from tests.e2e.cli_helpers import Commands, commands_in
from tests.e2e.vms import VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner, run

T = TypeVar("T")

#: The one loop of the e2e tests' own coroutines: the relays' loop in production.
E2E_LOOP: LoopName = "uvloop"
#: Longest a coroutine given to ``run_e2e`` may take: past the tests' own migration
#: timeouts (``cli_helpers.MIGRATION_TIMEOUT_S``, 120 s), so that their failure says
#: what did not finish, and (at factor 1) short of pytest-timeout's 300 s watchdog.
E2E_RUN_TIMEOUT_SECONDS: float = 240.0 * FACTOR


@pytest.fixture
def vm_pair(sock_dir: Path) -> Iterator[VMPairFactory]:
    """A factory of source/destination VM pairs in ``sock_dir``; see `VMPairFactory`."""
    factory = VMPairFactory(sock_dir)
    try:
        yield factory
    finally:
        factory.kill_all()


@pytest.fixture
def commands(sock_dir: Path) -> Iterator[Commands]:
    """``migrelay`` commands with stdout and stderr kept apart."""
    yield from commands_in(sock_dir)


@pytest.fixture
def run_e2e() -> AsyncRunner:
    """Run a coroutine on uvloop with ``run_async``'s checks (one loop: see above)."""

    def run_on_uvloop(coro: Coroutine[Any, Any, T]) -> T:
        return run(coro, E2E_LOOP, E2E_RUN_TIMEOUT_SECONDS)

    return run_on_uvloop
