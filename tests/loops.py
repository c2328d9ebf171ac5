"""The one runner of async tests: a coroutine on a chosen event loop, with checks.

:func:`run` runs a test's coroutine on asyncio or uvloop through
:func:`migrelay.aio.runner.run` and fails the test on anything the loop reported to its
exception handler, and on tasks the test left running (uvloop ``_testbase`` and
websockets' test cases do the same). The fixtures that hand it to tests are
``run_async`` (``tests/conftest.py``: both loops) and ``run_e2e``
(``tests/e2e/conftest.py``: uvloop only); test modules import :class:`AsyncRunner` from
here to annotate them, never from a conftest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from migrelay.aio import runner
from migrelay.aio.runner import LoopName
from tests.helpers import FACTOR

T = TypeVar("T")

#: Both loops the relays support (DESIGN.md §4: uvloop, asyncio where it is absent).
LOOP_IMPLS: tuple[LoopName, ...] = ("asyncio", "uvloop")
#: Longest a coroutine given to :func:`run` may take.
RUN_TIMEOUT_SECONDS: float = 120.0 * FACTOR


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
    """``run_async(coro)`` / ``run_e2e(coro)``: :func:`run` on the fixture's loop."""

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T: ...
