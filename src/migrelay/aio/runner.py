"""Choose the event loop in one place: uvloop when installed, else asyncio."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopName = Literal["auto", "uvloop", "asyncio"]

#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Raise glibc's mmap and trim thresholds to 64 MiB.

    Buffers of 128 KiB and more otherwise come from mmap and fault in page by page each
    time (552k page faults for 100 messages in one measurement, DESIGN.md §4); libraries
    on the path (ssl, the QMP client) allocate such buffers per call. Explicit
    ``MALLOC_*`` settings in the environment win.
    """
    if any(name.startswith("MALLOC_") for name in os.environ):
        return
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def loop_name(choice: LoopName = "auto") -> str:
    """Return the loop that :func:`run` will use for ``choice``."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], loop: LoopName = "auto") -> T:
    """Run ``main`` to completion on uvloop (or asyncio when absent or asked for)."""
    tune_malloc()
    if loop_name(loop) == "uvloop":
        import uvloop

        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)


async def wait_first(*awaitables: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Wait until one of ``awaitables`` is done, then cancel the others and reap them.

    Every background wait has an owner that cancels and awaits it (STYLE.md §3): this
    is that owner for "whichever comes first" (a stop signal against a migration, an
    event against a timeout).

    Returns:
        The futures that were done (``result()`` raises what each raised).
    """
    futures: list[asyncio.Future[Any]] = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
    return done


class RunOnce:
    """``function()`` run at most once, to its end even if a caller is cancelled
    meanwhile (a second stop signal while a relay closes); every call waits for that
    same end and raises what it raised."""

    def __init__(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._function = function
        self._task: asyncio.Task[None] | None = None

    async def __call__(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._function())
            self._task.add_done_callback(_retrieve)
        await asyncio.shield(self._task)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a task's outcome as seen (its awaiters may all have been cancelled)."""
    if not task.cancelled():
        task.exception()
