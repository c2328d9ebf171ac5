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
#: Worker loops of the relays the integration tests run in-process, unless a test says
#: (``ServerConfig.workers``, ``ClientConfig.workers``): ``MIGRELAY_TEST_WORKERS=2``
#: runs their channels on worker threads. The one place the variable is read.
WORKERS: int = int(os.environ.get("MIGRELAY_TEST_WORKERS", "1"))
#: The worker counts the tests of the relays' key paths run with, whatever WORKERS is.
BOTH_WORKER_COUNTS: tuple[int, ...] = (1, 2)


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


def as_user(uid: int, action: Callable[[], int]) -> int:
    """Run ``action`` in a forked child as ``uid`` (group too); return the child's pid.

    A fork, not a new interpreter: the venv's python may live where ``uid`` cannot
    read. ``action``'s result is the child's exit status (1 if it raised).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = action()
        finally:
            os._exit(code)
    return pid


@contextlib.contextmanager
def listening_as(uid: int, path: Path) -> Iterator[int]:
    """A unix listener at ``path`` bound by a child process running as ``uid``, until
    the block ends. Yields the child's pid."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def listen() -> int:
        os.close(ready_r)
        os.close(hold_w)  # or the read below never sees the parent's close
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
            sock.listen(16)
            os.write(ready_w, b"y")
            os.read(hold_r, 1)  # until the parent closes hold_w
        return 0

    pid = as_user(uid, listen)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"y":
            raise AssertionError(f"could not listen at {path} as uid {uid}")
        assert path.lstat().st_uid == uid
        yield pid
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(pid, 0)
