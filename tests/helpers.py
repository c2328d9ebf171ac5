"""Small helpers shared by the test modules (imported as ``tests.helpers``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: Scales every test timeout (``MIGRELAY_TEST_TIMEOUT_FACTOR=3`` on a slow machine). The
#: one place the variable is read: the other test modules import it from here.
FACTOR: float = float(os.environ.get("MIGRELAY_TEST_TIMEOUT_FACTOR", "1"))
#: One millisecond of timeout, scaled (websockets ``tests/utils.py`` MS).
MS: float = 0.001 * FACTOR


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` every 5 ms; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def short_temp_dir(parent: str = "/tmp") -> Iterator[Path]:
    """A fresh directory with a short path under ``parent``, removed afterwards.

    Unix socket paths hold 107 bytes, which pytest's ``tmp_path`` can exceed. The
    ``sock_dir`` fixture of ``tests/conftest.py`` is this for one test.
    """
    path = Path(tempfile.mkdtemp(prefix="mr-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def random_chunks(seed: int, total: int, largest: int) -> Iterator[bytes]:
    """``total`` non-repeating bytes in chunks of 1 to ``largest`` bytes, the same for the
    same ``seed``, so that reads and frames split anywhere."""
    rng = random.Random(seed)
    left = total
    while left:
        size = min(left, rng.randint(1, largest))
        left -= size
        yield rng.randbytes(size)


#: The user "another local user" runs as in tests (the suite runs as root).
NOBODY_UID = 65534


@contextlib.contextmanager
def listening_as(uid: int, path: Path) -> Iterator[int]:
    """A unix listener at ``path`` bound by a child process running as ``uid``.

    A fork, not a new interpreter: the venv's python may live where ``uid`` cannot
    read. The child makes only system calls between fork and exit. Yields its pid.
    """
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready[0])
            os.close(release[1])  # or the read below never sees the parent's close
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(16)
            os.write(ready[1], b"y")
            os.read(release[0], 1)  # until the parent closes its end
        finally:
            os._exit(0)
    os.close(ready[1])
    os.close(release[0])
    try:
        if os.read(ready[0], 1) != b"y":
            raise AssertionError(f"could not listen at {path} as uid {uid}")
        yield pid
    finally:
        os.close(release[1])
        os.close(ready[0])
        os.waitpid(pid, 0)
