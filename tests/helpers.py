"""Small helpers shared by the test modules (imported as ``tests.helpers``)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

#: Scales every test timeout (``MIGRELAY_TEST_TIMEOUT_FACTOR=3`` on a slow machine). The
#: one place the variable is read: conftest.py and the test modules import it from here.
FACTOR: float = float(os.environ.get("MIGRELAY_TEST_TIMEOUT_FACTOR", "1"))


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` every 5 ms; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.005)
