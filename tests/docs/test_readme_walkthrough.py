"""The README's "Walkthrough: two hosts", run from its printed lines with real QEMU.

The test takes the literal lines from README.md: the block of the two ``mkdir`` and the
two ``qemu-system-x86_64`` command lines, the ``serve`` of "One command per side" and
the ``migrate --to`` after it. It changes only what one machine and a test need, each
substitution in `SUBSTITUTIONS` or below with its reason:

* ``src$ `` and ``dst$ `` say on which host a line runs; each host gets a directory of
  its own, ``ROOT/src`` or ``ROOT/dst``, and its absolute paths (``/run/qemu``,
  ``/run/migrelay``, ``/dev/shm/vm1``) move under it: one machine plays both hosts, and
  both VMs' RAM files are ``/dev/shm/vm1`` as printed.
* ``size=4G`` becomes ``size=64M``: the suite's VM size (RAM files on a shared host).
* The trailing ``...`` (the reader's own devices) is dropped.
* ``serve --listen 0.0.0.0:8765`` becomes ``127.0.0.1:PORT`` (a free port: the suite
  runs beside other tests); ``wss://dst.example:8765`` becomes ``wss://127.0.0.1:PORT``
  (the test certificate names 127.0.0.1).
* ``/etc/migrelay/{tokens,cert.pem,key.pem,ca.pem}`` and ``~/.migrelay-token`` become
  files the test makes: a CA and a server certificate (`tests.pki`), a tokens file with
  one token for any target and the client's token file with the same token.
* ``migrelay`` is this interpreter's ``python -m migrelay`` (the set-up's
  ``.venv/bin/migrelay``).

Two steps are the test's own, not the README's: the source's RAM file is written with
random bytes before its QEMU starts (QEMU maps an existing file as it is), so that the
comparison means something; and the source guest (its firmware, with nothing to boot)
is paused before the migration, so that the destination does not resume it and neither
guest writes to RAM once it is compared. After ``migrate`` exits 0, both QEMUs quit and
the two RAM files are compared byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from migrelay.control.migration import wait_destination_completed
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.vm import first_difference
from migrelay.units import MIB
from tests.docs.test_readme_examples import README, CodeBlock, code_blocks
from tests.helpers import FACTOR, short_temp_dir
from tests.loops import run
from tests.pki import make_pki

pytestmark = pytest.mark.e2e

T = TypeVar("T")

#: The only changes to the printed QEMU lines besides the host paths, with why.
SUBSTITUTIONS: tuple[tuple[str, str, str], ...] = (("size=4G", "size=64M", "the suite's VM size"),)
RAM_BYTES = 64 * MIB
#: The printed host paths that move under each host's directory.
HOST_PATHS = ("/run/qemu", "/run/migrelay", "/dev/shm")
#: QEMU start-up (no -nodefaults: the default devices), python start-up, a migration of
#: 64 MiB over wss on a shared 2-core host (~2 s when idle); generous.
START_TIMEOUT_S = 60.0 * FACTOR
MIGRATION_TIMEOUT_S = 120.0 * FACTOR


def walkthrough_commands() -> tuple[list[str], list[str], str, str]:
    """The printed lines: (mkdir lines, qemu lines, serve command, migrate command)."""
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    qemu_block = one(
        [block for block in blocks if block.lines and block.lines[0].startswith("src$ mkdir")],
        "the walkthrough's block of mkdir and qemu lines",
    )
    commands = qemu_block.commands()
    mkdirs = [command for command in commands if " mkdir " in command]
    qemus = [command for command in commands if " qemu-system-x86_64 " in command]
    assert len(mkdirs) == 2 and len(qemus) == 2 and len(commands) == 4, commands
    serve = one(
        [
            command
            for command in commands_of(blocks)
            if command.startswith("migrelay serve ") and "--qmp-dir" in command
        ],
        "the walkthrough's serve",
    )
    migrate = one(
        [
            command
            for command in commands_of(blocks)
            if command.startswith("migrelay migrate --qmp /run/qemu/vm1.qmp --to ")
            and "--config" not in command
            and "--copy-storage" not in command
        ],
        "the walkthrough's migrate --to",
    )
    return mkdirs, qemus, serve, migrate


def commands_of(blocks: list[CodeBlock]) -> Iterator[str]:
    for block in blocks:
        yield from (command for command in block.commands() if not command.startswith("#"))


def one(found: list[T], what: str) -> T:
    assert len(found) == 1, f"README: {len(found)} of {what}, not 1: {found}"
    return found[0]


def on_host(command: str, host: str, root: Path) -> list[str]:
    """A printed ``src$``/``dst$`` line as it runs here (see the module docstring)."""
    prompt = f"{host}$ "
    assert command.startswith(prompt), command
    command = command.removeprefix(prompt).rstrip()
    command = command.removesuffix("...").rstrip()
    for printed, here, _why in SUBSTITUTIONS:
        assert printed in command or not command.startswith("qemu-"), (printed, command)
        command = command.replace(printed, here)
    for path in HOST_PATHS:
        command = command.replace(path, f"{root / host}{path}")
    return shlex.split(command)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_path(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        assert process.poll() is None, f"{process.args!r} exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {path} after {START_TIMEOUT_S:g} s"
        time.sleep(0.02)


def test_the_walkthroughs_printed_lines_migrate_a_vm_with_identical_ram() -> None:
    mkdirs, qemus, serve_printed, migrate_printed = walkthrough_commands()
    processes: list[subprocess.Popen[bytes]] = []
    with short_temp_dir() as root:
        try:
            # The directories, as printed (paths under each host's directory).
            for command in mkdirs:
                host = command.split("$", 1)[0]
                argv = on_host(command, host, root)
                assert argv[:4] == ["mkdir", "-p", "-m", "0700"], argv
                subprocess.run(argv, check=True)
                assert oct(os.stat(argv[4]).st_mode & 0o777) == "0o700"
            src_ram, dst_ram = root / "src/dev/shm/vm1", root / "dst/dev/shm/vm1"
            for ram in (src_ram, dst_ram):
                ram.parent.mkdir(parents=True)  # /dev/shm exists on every host
            # The test's own step: random RAM for the source (see the docstring).
            src_ram.write_bytes(os.urandom(RAM_BYTES))

            # Both QEMUs, as printed.
            qmp_paths: dict[str, Path] = {}
            for command in qemus:
                host = command.split("$", 1)[0]
                argv = on_host(command, host, root)
                assert ("-incoming" in argv) == (host == "dst"), argv
                log = root / f"qemu-{host}.log"
                with log.open("wb") as out:
                    processes.append(subprocess.Popen(argv, stdout=out, stderr=out))
                qmp_option = argv[argv.index("-qmp") + 1]
                assert qmp_option.startswith("unix:"), qmp_option
                qmp = Path(qmp_option.removeprefix("unix:").split(",", 1)[0])
                wait_for_path(qmp, processes[-1], log)
                qmp_paths[host] = qmp
            assert qmp_paths == {
                "src": root / "src/run/qemu/vm1.qmp",
                "dst": root / "dst/run/migrelay/vm1.qmp",
            }

            # The destination's serve, as printed, with the test's port and files.
            pki = make_pki(root / "pki")
            token = secrets.token_hex(16)
            tokens, client_token = root / "tokens", root / "client-token"
            tokens.write_text(f"{token}\n")
            client_token.write_text(f"{token}\n")
            port = free_port()
            serve_here = (
                serve_printed.replace("0.0.0.0:8765", f"127.0.0.1:{port}")
                .replace("/etc/migrelay/tokens", str(tokens))
                .replace("/etc/migrelay/cert.pem", str(pki.cert))
                .replace("/etc/migrelay/key.pem", str(pki.key))
                .replace("/run/migrelay", str(root / "dst/run/migrelay"))
            )
            assert "/etc/" not in serve_here and "8765" not in serve_here, serve_here
            serve_argv = [sys.executable, "-m", *shlex.split(serve_here)]
            serve_log = root / "serve.log"
            with serve_log.open("wb") as out:
                processes.append(subprocess.Popen(serve_argv, stdout=out, stderr=out))
            deadline = time.monotonic() + START_TIMEOUT_S
            while f"listening on wss://127.0.0.1:{port}" not in serve_log.read_text():
                assert processes[-1].poll() is None, serve_log.read_text()
                assert time.monotonic() < deadline, serve_log.read_text()
                time.sleep(0.05)

            # The test's own step: the source guest paused (see the docstring).
            run(pause(qmp_paths["src"]), "uvloop", START_TIMEOUT_S)

            # The source's one command, as printed, with the test's URL and files.
            migrate_here = (
                migrate_printed.replace("dst.example:8765", f"127.0.0.1:{port}")
                .replace("/etc/migrelay/ca.pem", str(pki.ca))
                .replace("~/.migrelay-token", str(client_token))
                .replace("/run/qemu", str(root / "src/run/qemu"))
            )
            assert "example" not in migrate_here and "/etc/" not in migrate_here, migrate_here
            migrate = subprocess.run(
                [sys.executable, "-m", *shlex.split(migrate_here)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=MIGRATION_TIMEOUT_S,
                check=False,
            )
            told = (
                f"{migrate_here}\nexit {migrate.returncode}\n{migrate.stdout}\n{migrate.stderr}"
                f"\n--- serve:\n{serve_log.read_text()}"
            )
            assert migrate.returncode == 0, told
            assert re.search(r"(?m)^completed in [\d.]+ s: ", migrate.stdout), told
            # serve issued migrate-incoming itself, for /vm1.
            assert "vm1: listening for an incoming migration" in serve_log.read_text(), told

            run(quit_both(qmp_paths), "uvloop", MIGRATION_TIMEOUT_S)
            for process in processes[:2]:
                assert process.wait(START_TIMEOUT_S) == 0, process.args
            assert first_difference(src_ram, dst_ram) is None
            assert dst_ram.stat().st_size == RAM_BYTES
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                process.wait()


async def pause(qmp_path: Path) -> None:
    async with QMP("src") as qmp:
        await qmp.connect(str(qmp_path))
        await qmp.stop()
        assert await qmp.query_status() is RunState.PAUSED


async def quit_both(qmp_paths: dict[str, Path]) -> None:
    """The destination's own ``completed`` first (all of RAM arrived), then quit both."""
    async with QMP("dst") as dst:
        await dst.connect(str(qmp_paths["dst"]))
        final = await wait_destination_completed(dst, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        await dst.quit()
    async with QMP("src") as src:
        await src.connect(str(qmp_paths["src"]))
        assert await src.query_status() is RunState.POSTMIGRATE
        await src.quit()
    await asyncio.sleep(0)
