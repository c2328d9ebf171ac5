"""The pure-Python mask: used only where the C extension is missing, and it says so.

``migrelay --version`` names the implementation that runs. Where ``migrelay._speedups``
cannot be imported (a build without a compiler), both relays still carry data intact,
and each says once, at start, that masking is slow. The missing extension is simulated
with a ``sitecustomize`` that blocks its import (``sys.modules[name] = None``), so the
real package runs otherwise unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tests import helpers
from tests.processes import MigrelayProcesses

Run = Callable[[Coroutine[Any, Any, None]], None]

PROMPT_S = 10.0 * helpers.FACTOR
PAYLOAD_BYTES = 3 * 1024 * 1024 + 12345
WARNING = "migrelay._speedups is not built: masking runs in pure Python"


def without_extension(directory: Path) -> dict[str, str]:
    """Environment in which ``import migrelay._speedups`` fails, as after a build without C."""
    (directory / "sitecustomize.py").write_text(
        "import sys\nsys.modules['migrelay._speedups'] = None  # import raises ImportError\n"
    )
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{directory}{os.pathsep}{path}" if path else str(directory)}


def version(env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "migrelay", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=PROMPT_S,
        check=True,
    )
    return result.stdout


def test_version_names_the_c_mask_where_the_extension_is_built() -> None:
    # tools/setup checks that the build made it; the suite runs on that build.
    assert "(masking: c, loop: uvloop," in version()


def test_version_names_the_python_mask_where_the_extension_is_missing(tmp_path: Path) -> None:
    assert "(masking: python, loop: uvloop," in version(without_extension(tmp_path))


def test_relays_without_the_extension_carry_data_intact_and_warn_once(
    run_async: Run, sock_dir: Path, tmp_path: Path, migrelay_procs: MigrelayProcesses
) -> None:
    env = without_extension(tmp_path)
    dest, src = sock_dir / "dest.sock", sock_dir / "src.sock"
    payload = random.Random(5).randbytes(PAYLOAD_BYTES)
    received: list[bytes] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(-1))  # to the end of the source's direction
        writer.write(hashlib.sha256(received[0]).digest())  # the way back, masked too
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(destination, str(dest))
        async with server:
            serve = migrelay_procs.serve("--target", str(dest), env=env)
            migrelay_procs.connect(f"{serve.url}/", src, env=env)
            reader, writer = await asyncio.open_unix_connection(str(src))
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(-1), PROMPT_S)
            writer.close()
        assert received == [payload]
        assert answer == hashlib.sha256(payload).digest()

    run_async(main())
    for process in migrelay_procs.processes:
        assert process.log().count(WARNING) == 1, process.log()
