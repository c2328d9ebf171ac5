"""Migrate a VM between two local QEMUs through the tunnel, step by step.

Run by ``tools/demo`` (after ``tools/setup``). It does what an operator does on two
hosts, on one machine: start destination QEMU with ``-incoming defer`` and source QEMU
with RAM full of random bytes, then run the four commands, each printed before it runs:

    migrelay serve    (destination host)
    migrelay connect  (source host)
    migrelay incoming (destination host)
    migrelay migrate  (source host: shows progress, exits 0 on completed)

and finally checks that the destination's RAM equals the source's byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from migrelay.control.migration import wait_destination_completed
from migrelay.control.qmp import QMP
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB, parse_size

MIGRELAY = [sys.executable, "-m", "migrelay"]


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _show(argv: list[str]) -> None:
    shown = ["migrelay", *argv[len(MIGRELAY) :]] if argv[: len(MIGRELAY)] == MIGRELAY else argv
    print("$ " + shlex.join(shown), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(path: Path, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"demo: {what} did not start:\n{log.read_text()}")
        time.sleep(0.02)


async def _start_vms(work: Path, ram: int) -> tuple[DisposableVM, DisposableVM]:
    src = DisposableVM(work, "src", ram)
    dst = DisposableVM(work, "dst", ram, incoming=True)
    await src.start(timeout_s=120)
    await dst.start()
    return src, dst


async def _finish(src: DisposableVM, dst: DisposableVM) -> None:
    async with QMP("demo-src") as src_qmp, QMP("demo-dst") as dst_qmp:
        await src_qmp.connect(str(src.qmp_path))
        await dst_qmp.connect(str(dst.qmp_path))
        await wait_destination_completed(dst_qmp, 60)
        await src_qmp.quit()
        await dst_qmp.quit()
    await src.wait(30)
    await dst.wait(30)


async def _stop(*vms: DisposableVM) -> None:
    for vm in vms:
        await vm.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="512M", help="guest RAM (default 512M)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    ram = parse_size(args.ram)
    work = Path(tempfile.mkdtemp(prefix="migrelay-demo-", dir="/tmp"))
    relays: list[subprocess.Popen[bytes]] = []
    src = dst = None
    try:
        _say(f"starting two QEMUs with {ram // MIB} MiB of RAM each (source RAM: random bytes)")
        src, dst = asyncio.run(_start_vms(work, ram))
        print("$ " + shlex.join(src.command()))
        print("$ " + shlex.join(dst.command()))

        port = _free_port()
        dest_sock, source_sock = work / "dest.sock", work / "source.sock"
        serve = [*MIGRELAY, "serve", "--listen", f"127.0.0.1:{port}", "--target", str(dest_sock)]
        connect = [*MIGRELAY, "connect", f"ws://127.0.0.1:{port}/", "--listen-unix",
                   str(source_sock), "--once"]  # fmt: skip
        _say("destination host: the relay (its log: one line per channel)")
        _show(serve)
        serve_log = work / "serve.log"
        with open(serve_log, "wb") as log:
            relays.append(subprocess.Popen(serve, stdout=log, stderr=log))
        _say("source host: the relay QEMU migrates to")
        _show(connect)
        connect_log = work / "connect.log"
        with open(connect_log, "wb") as log:
            relays.append(subprocess.Popen(connect, stdout=log, stderr=log))
        _wait_for(source_sock, "migrelay connect", relays[1], connect_log)
        while b"listening on" not in serve_log.read_bytes():
            if relays[0].poll() is not None:
                sys.exit(f"demo: migrelay serve did not start:\n{serve_log.read_text()}")
            time.sleep(0.02)

        _say("destination host: make QEMU listen on the relay's socket")
        incoming = [*MIGRELAY, "incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock)]
        _show(incoming)
        subprocess.run(incoming, check=True)

        _say("source host: migrate through the tunnel")
        migrate = [*MIGRELAY, "migrate", "--qmp", str(src.qmp_path), "--socket", str(source_sock)]
        _show(migrate)
        status = subprocess.run(migrate, check=False).returncode
        if status != 0:
            print(f"demo: migrelay migrate exited with {status}", file=sys.stderr)
            return status

        asyncio.run(_finish(src, dst))
        relays[1].wait(30)
        _say("relay logs")
        sys.stdout.write(serve_log.read_text() + connect_log.read_text())
        _say("checking the destination's RAM against the source's")
        difference = first_difference(src.ram_path, dst.ram_path)
        if difference is not None:
            print(f"demo: RAM differs at byte {difference}", file=sys.stderr)
            return 1
        print(f"identical: {ram} bytes ({src.ram_path} == {dst.ram_path})")
        return 0
    finally:
        for relay in relays:
            if relay.poll() is None:
                relay.terminate()
                relay.wait()
        if src is not None and dst is not None:
            asyncio.run(_stop(src, dst))
        if args.keep:
            print(f"demo: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
