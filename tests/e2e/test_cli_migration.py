"""Migrations driven by the ``migrelay`` commands, each its own process, with real QEMU.

DESIGN.md §1 and §2: the four original steps (serve, connect, incoming, migrate) in their
original order and in others; the two-command form (``serve --qmp-dir`` and ``migrate
--to``); multifd through the tunnel; a failed migration; a refused handshake; Ctrl-C; and
the three forms of progress output. Every completed migration is checked byte for byte
once the destination itself says ``completed`` (`check_migrated`).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import time
from pathlib import Path

import pytest

from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.vm import DisposableVM
from tests.e2e.cli_helpers import (
    QUICK_TIMEOUT_S,
    SLOW_BANDWIDTH,
    Commands,
    assert_one_line_error,
    check_migrated,
    migrate_under_way,
    serve_qmp_dir,
    source_state,
    summary_line,
    under_way,
)
from tests.e2e.vms import DEFAULT_RAM_BYTES, VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

#: Terminal width for the bar test: room for every figure of the bar.
COLUMNS = 160
#: What the steps of the four-step form wait for each other here (README: 30 s).
WAIT_S = 30 * FACTOR


def _check_line_output(stdout: str) -> None:
    """The non-terminal form: one plain line per snapshot kind, then the summary."""
    lines = stdout.strip().splitlines()
    assert "\r" not in stdout and "\x1b" not in stdout
    *progress, summary = lines
    assert progress and all(re.match(r"(setup|active|completed)\b", line) for line in progress), (
        stdout
    )
    active = [line for line in progress if line.startswith("active ")]
    assert active, stdout
    for word in ("transferred", "remaining", "rate", "eta", "dirty", "pass"):
        assert word in active[-1], active[-1]
    assert re.fullmatch(
        r"completed in [0-9.]+ s: [0-9.]+ MiB at [0-9.]+ MiB/s, downtime \d+ ms, \d+ pass(es)?"
        # --socket: only the source's side is this command's to say.
        r"; source stopped \(postmigrate\)",
        summary,
    ), summary


def test_four_commands_in_the_original_order_copy_ram_exactly(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    procs = migrelay_procs
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = procs.serve("--target", str(dest_sock))
            procs.connect(f"{serve.url}/", source_sock)
            incoming = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock)
            )
            assert incoming.popen.returncode == 0, incoming.describe()
            assert f"listening for an incoming migration on unix:{dest_sock}" in (
                incoming.stdout()
            )
            # 32 MiB/s: about two seconds, so the line form shows several lines.
            migrate = commands.migrate(
                src,
                "--socket",
                str(source_sock),
                "--max-bandwidth",
                "32M",
            )
            assert await migrate.wait() == 0, migrate.describe()
            _check_line_output(migrate.stdout())
            await check_migrated(src, dst)
            _check_log_lines_as_in_the_readme(serve.log())

    run_e2e(main())


@pytest.mark.parametrize(
    "order",
    [
        # QEMU listens first; the source relay starts before the server exists (it
        # opens its WebSocket only when QEMU connects).
        ("incoming", "connect", "serve", "migrate"),
        # The migration starts before the destination listens: the server waits
        # (bounded, --wait-target) for the destination socket to appear.
        ("connect", "serve", "migrate", "incoming"),
        # migrate first, serve last (README: "in this order or any other"): migrate
        # waits (--wait-socket) for connect's socket, connect (--retry-open) for serve.
        ("migrate", "connect", "incoming", "serve"),
    ],
    ids="-".join,
)
def test_four_commands_in_another_order_copy_ram_exactly(
    run_e2e: AsyncRunner,
    order: tuple[str, ...],
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    procs = migrelay_procs
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            # serve's port is learnt when it starts, so connect gets a fixed one here.
            port = _free_port()
            url = f"ws://127.0.0.1:{port}/"
            migrate = None
            for step in order:
                if step == "serve":
                    procs.serve("--target", str(dest_sock), listen=f"127.0.0.1:{port}")
                elif step == "connect":
                    procs.connect(url, source_sock, "--retry-open", str(WAIT_S))
                elif step == "incoming":
                    incoming = await commands.run(
                        "incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock)
                    )
                    assert incoming.popen.returncode == 0, incoming.describe()
                elif order[0] == "migrate":
                    migrate = commands.migrate(
                        src, "--socket", str(source_sock), "--wait-socket", str(WAIT_S)
                    )
                    # Waiting for connect's socket: QEMU not told anything yet.
                    await asyncio.sleep(1.0)
                    assert migrate.popen.poll() is None, migrate.describe()
                    assert (await source_state(src))[1].status is MigrationStatus.NONE
                else:
                    migrate = commands.migrate(src, "--socket", str(source_sock))
                    # The migration has really started before the next step runs.
                    await migrate.wait_for_stdout(r"(?m)^(setup|active|completed)\b")
            assert migrate is not None
            assert await migrate.wait() == 0, migrate.describe()
            await check_migrated(src, dst)

    run_e2e(main())


def test_migrate_socket_waits_bounded_for_the_relay_then_says_so_in_one_line(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path, commands: Commands
) -> None:
    missing = sock_dir / "source.sock"
    wait_s = 2.0

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, _dst):
            started = time.monotonic()
            migrate = commands.migrate(
                src, "--socket", str(missing), "--wait-socket", f"{wait_s:g}"
            )
            await migrate.wait(QUICK_TIMEOUT_S)
            took = time.monotonic() - started
            assert_one_line_error(
                migrate,
                f"no relay socket at {missing} after {wait_s:g} s (--wait-socket)",
                "start migrelay connect",
            )
            # Not before the bound; after it, no more than a start-up's worth.
            assert wait_s <= took <= wait_s + 10 * FACTOR, took
            assert migrate.stdout() == ""
            # QEMU was never told to migrate.
            assert (await source_state(src))[1].status is MigrationStatus.NONE

    run_e2e(main())


def test_four_steps_with_serve_down_name_connect_and_its_log_in_the_error_line(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    source_sock = sock_dir / "source.sock"

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, _dst):
            connect = migrelay_procs.connect(f"ws://127.0.0.1:{_free_port()}/", source_sock)
            migrate = commands.migrate(src, "--socket", str(source_sock))
            await migrate.wait(QUICK_TIMEOUT_S)
            _runstate, info = await source_state(src)
            assert info.status is MigrationStatus.FAILED and info.error_desc
            # QEMU's text whole, then where the cause is; the cause is in connect's log.
            assert_one_line_error(
                migrate,
                f"migration failed: {info.error_desc} (migrelay connect on {source_sock}"
                " closed qemu's stream; its log says why: serve unreachable or refusing,"
                " or the destination gone)",
            )
            assert "cannot open websocket" in connect.log()
            # stdout: the progress, then the summary of how far it got (README).
            assert re.fullmatch(r"failed in [\d.]+ s: .+", summary_line(migrate.stdout()))

    run_e2e(main())


def test_four_steps_with_connect_frozen_stall_timeout_says_migrate_shut_the_stream_down(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    # The other side of the test above: here migrate itself shut the stream down
    # (--stall-timeout), so QEMU's "Broken pipe" is migrate's doing and the line must
    # not send the operator to connect's log as if connect had dropped it.
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"
    stall_s = 2

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = migrelay_procs.serve("--target", str(dest_sock))
            connect = migrelay_procs.connect(f"{serve.url}/", source_sock)
            incoming = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock)
            )
            assert incoming.popen.returncode == 0, incoming.describe()
            migrate = commands.migrate(
                src, "--socket", str(source_sock), "--max-bandwidth", SLOW_BANDWIDTH,
                "--stall-timeout", str(stall_s),
            )  # fmt: skip
            await under_way(serve, "/", migrate)
            # Frozen, connect keeps its socket open and reads nothing: only the stall
            # timeout can end this migration (stop() sends SIGCONT at teardown).
            os.kill(connect.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            await migrate.wait(QUICK_TIMEOUT_S)
            took = time.monotonic() - frozen_at
            runstate, info = await source_state(src)
            assert info.status is MigrationStatus.FAILED and info.error_desc
            # The warning of the shutdown as it happens, then the one error line: what
            # migrate did, then QEMU's text whole, and no hint after it.
            assert migrate.popen.returncode == 1, migrate.describe()
            warning, error = migrate.stderr().splitlines()
            assert warning.endswith(
                f" WARNING {src.name}: no data moved for {stall_s} s; the stream is stuck"
                " (a frozen relay or peer?): shutting it down"
            ), migrate.describe()
            assert error == (
                f"migrelay: error: migration failed: no data moved for {stall_s} s, so the"
                " stuck stream was shut down (a frozen relay or peer?); qemu:"
                f" {info.error_desc}"
            ), migrate.describe()
            assert "closed qemu's stream" not in migrate.stderr()
            # Not before the stall timeout; after it, a poll and the shutdown.
            assert stall_s <= took <= stall_s + 10 * FACTOR, took
            assert runstate is RunState.PRELAUNCH

    run_e2e(main())


#: A relay's log line of a channel opened and closed, with its time (README: "each
#: relay logs ...").
OPENED_LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO channel [0-9a-f]{16}/\d+ opened:"
    r" \S+ -> \S+ \(target /[^)]*\)"
)
CLOSED_LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO channel [0-9a-f]{16}/\d+ closed:"
    r" ended by the (?:source|destination), then by the (?:source|destination);"
    r" sent [\d.]+ \w*B, received [\d.]+ \w*B in [\d.]+ s \([\d.]+ \w*B/s\);"
    r" close code 1000 normal"
)


def _check_log_lines_as_in_the_readme(serve_log: str) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for pattern in (OPENED_LOG_LINE, CLOSED_LOG_LINE):
        assert any(pattern.fullmatch(line) for line in readme.splitlines()), pattern
        assert any(pattern.fullmatch(line) for line in serve_log.splitlines()), serve_log


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_serve_qmp_dir_and_migrate_to_need_no_other_command_and_print_json(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            migrate = commands.migrate(src, "--to", f"{serve.url}/{dst.name}", "--json")
            assert await migrate.wait() == 0, migrate.describe()
            assert migrate.stderr() == ""
            document = json.loads(migrate.stdout())
            assert document["status"] == "completed"
            assert document["error"] is None
            assert document["transferred_bytes"] >= DEFAULT_RAM_BYTES
            assert document["total_bytes"] >= DEFAULT_RAM_BYTES
            assert document["total_time_ms"] > 0
            assert isinstance(document["downtime_ms"], int)
            assert document["average_rate_bytes_per_s"] > 0
            assert document["passes"] >= 1
            assert document["elapsed_s"] > 0
            # The server, not an `incoming` command, made the destination listen.
            assert f"{dst.name}: listening for an incoming migration" in serve.log()
            await check_migrated(src, dst)

    run_e2e(main())


def test_multifd_4_through_the_tunnel_shows_a_bar_on_a_terminal(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            controller, terminal = pty.openpty()
            try:
                migrate = commands.migrate(
                    src,
                    "--to",
                    f"{serve.url}/{dst.name}",
                    "--multifd",
                    "4",
                    # Slow enough for the bar to be redrawn a few times.
                    "--max-bandwidth",
                    "32M",
                    env={"COLUMNS": str(COLUMNS)},
                    stdout_fd=terminal,
                )
            finally:
                os.close(terminal)
            screen = await asyncio.to_thread(_read_until_closed, controller)
            assert await migrate.wait() == 0, migrate.describe()
            # Main channel and four multifd channels, each its own WebSocket, in order.
            for number in range(5):
                assert re.search(rf"channel \w+/{number} opened", serve.log()), serve.log()
            async with QMP(dst.name) as dst_qmp:
                await dst_qmp.connect(str(dst.qmp_path))
                assert (await dst_qmp.query_capabilities())["multifd"] is True
                assert (await dst_qmp.query_parameters()).multifd_channels == 4
            await check_migrated(src, dst)
        # The bar is redrawn in place ("\r" + erase to end of line), never wider than the
        # terminal, then replaced by the summary. The pty turns "\n" into "\r\n".
        redraws = [part for part in screen.split("\r") if part.startswith("[")]
        assert len(redraws) >= 2, repr(screen)
        for redraw in redraws:
            assert redraw.endswith("\x1b[K"), repr(redraw)
            assert len(redraw) - len("\x1b[K") < COLUMNS
        # Every figure of the line form, in a line that fits: sent, left, rate, ETA,
        # dirty-page rate and pass.
        full = re.compile(
            r"\[#*-*\]\s+\d+% active  [\d.]+ \S+ sent  [\d.]+ \S+ left  [\d.]+ \S+/s"
            r"  eta .+?  dirty \S+ \S+  pass \d+  wire [\d.]+ \S+\x1b\[K$"
        )
        assert any(full.match(redraw) for redraw in redraws), redraws
        # The summary: total time, size, average rate, downtime and passes.
        assert re.search(
            r"\r\x1b\[Kcompleted in [\d.]+ s: [\d.]+ MiB at [\d.]+ MiB/s, downtime \d+ ms,"
            r" \d+ pass(es)?, [\d.]+ MiB on the wire; source stopped \(postmigrate\),"
            r" destination resumes the guest if it ran here\r\n$",
            screen,
        ), repr(screen)

    run_e2e(main())


def _read_until_closed(fd: int) -> str:
    chunks = []
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the other side of the pty was closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_destination_killed_midway_fails_with_qemus_text_and_the_source_keeps_running(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            migrate = await migrate_under_way(commands, serve, src, dst)
            dst.kill()
            await migrate.wait()
            stderr = assert_one_line_error(migrate)
            runstate, info = await source_state(src)
            assert info.status is MigrationStatus.FAILED
            assert info.error_desc
            # QEMU's own text, whole, after a plain prefix.
            # QEMU's text, and what the in-process relay saw end the channel, if it
            # ended before QEMU did ("peer closed with 4000 destination closed").
            assert re.fullmatch(
                rf"migrelay: error: migration failed: {re.escape(info.error_desc)}"
                r"( \(relay: channel \w+/0: .+\))?\n",
                stderr,
            ), stderr
            assert summary_line(migrate.stdout()).startswith("failed in ")
            assert runstate is RunState.PRELAUNCH

    run_e2e(main())


def test_server_refusal_is_one_clear_line_and_the_source_stays_as_it_was(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    token_file = sock_dir / "tokens"
    token_file.write_text("s3cret-token\n", encoding="utf-8")

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir, "--token-file", str(token_file))
            url = f"{serve.url}/{dst.name}"
            refused = commands.migrate(src, "--to", url)
            await refused.wait()
            stderr = assert_one_line_error(refused)
            assert stderr.startswith(
                f"migrelay: error: cannot open websocket to {url}: server refused the"
                " upgrade with 401: authentication required"
            ), stderr
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH
            assert info.status is MigrationStatus.FAILED
            # Authentication comes before the destination is touched, so the same
            # destination still takes the migration once the token is given.
            migrate = commands.migrate(src, "--to", url, "--token-file", str(token_file))
            assert await migrate.wait() == 0, migrate.describe()
            await check_migrated(src, dst)

    run_e2e(main())


def test_capabilities_that_differ_from_the_destination_are_refused_before_a_byte_moves(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    # The operator prepared the destination by hand without multifd, then migrates with
    # it: QEMU itself would kill the destination with "Unknown combination of migration
    # flags". serve --qmp-dir compares what the source announces with what listens.
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            target = sock_dir / f"{dst.name}.sock"
            prepared = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(target)
            )
            assert prepared.popen.returncode == 0, prepared.describe()
            url = f"{serve.url}/{dst.name}"
            mismatched = commands.migrate(src, "--to", url, "--multifd", "2")
            await mismatched.wait()
            stderr = assert_one_line_error(mismatched)
            assert stderr.startswith(
                f"migrelay: error: cannot open websocket to {url}: server refused the upgrade"
                " with 409: destination vm not ready: it was prepared with other capabilities"
                " than the source announced; prepare it with the same --multifd,"
                " --compress and --postcopy as migrate"
            ), stderr
            # What exactly differs is for serve's log (the peer gets fixed text only).
            assert (
                "state is listening with no multifd, no postcopy, but multifd 2 channels,"
                " no postcopy (as the source announced) is required" in serve.log()
            ), serve.log()
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH and info.status is MigrationStatus.FAILED
            assert dst.running, "the destination qemu must be untouched"
            # The destination still listens as prepared: the matching migration completes.
            migrate = commands.migrate(src, "--to", url)
            assert await migrate.wait() == 0, migrate.describe()
            await check_migrated(src, dst)

    run_e2e(main())


def test_ctrl_c_cancels_and_the_source_then_migrates_again(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            migrate = await migrate_under_way(commands, serve, src, dst)
            migrate.interrupt()
            await migrate.wait()
            stderr = assert_one_line_error(migrate, code=130)
            assert stderr == (
                "migrelay: error: migration cancelled on interrupt;"
                " the source vm was left as it was\n"
            )
            assert summary_line(migrate.stdout()).startswith("cancelled in ")
            runstate, info = await source_state(src)
            assert info.status is MigrationStatus.CANCELLED
            assert runstate is RunState.PRELAUNCH

            # A fresh destination (the first one gave up with the cancelled stream).
            again = DisposableVM(sock_dir, "again", DEFAULT_RAM_BYTES, incoming=True)
            async with again:
                second = commands.migrate(src, "--to", f"{serve.url}/{again.name}")
                assert await second.wait() == 0, second.describe()
                await check_migrated(src, again)

    run_e2e(main())


def _sent_bytes(log: str) -> float:
    """What a relay's channels sent, from its ``channel … closed: …; sent X, …`` lines."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    return sum(
        float(number) * units[unit]
        for number, unit in re.findall(r"channel \S+ closed: .*?; sent ([\d.]+) (\S+),", log)
    )


@pytest.mark.parametrize("keep_paused", [False, True], ids=["resumes", "keep-paused"])
def test_four_steps_with_zlib_compress_and_the_destination_resumes_unless_kept_paused(
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
    keep_paused: bool,
) -> None:
    """The four-step form: ``--compress`` given to both sides, nothing carries it over.

    The source runs; the destination QEMU has ``-S``, yet resumes once the guest has
    arrived (``incoming`` set its autostart), unless ``incoming --keep-paused``: then
    both RAM files are final and equal. The relay sent far fewer bytes than the RAM's
    size: the pages were compressed before they reached it.
    """
    procs = migrelay_procs
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"
    ram = 64 * 1024 * 1024
    src = DisposableVM(sock_dir, "src", ram, ram_content="text")
    dst = DisposableVM(sock_dir, "dst", ram, incoming=True)
    compression = ("--multifd", "2", "--compress", "zlib")

    async def main() -> None:
        async with src, dst:
            async with QMP(src.name) as qmp:
                await qmp.connect(str(src.qmp_path))
                await qmp.cont()
            serve = procs.serve("--target", str(dest_sock))
            connect = procs.connect(f"{serve.url}/", source_sock)
            incoming = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock),
                *compression, *(("--keep-paused",) if keep_paused else ()),
            )  # fmt: skip
            assert incoming.popen.returncode == 0, incoming.describe()
            migrate = commands.migrate(src, "--socket", str(source_sock), *compression)
            assert await migrate.wait() == 0, migrate.describe()
            if keep_paused:
                await check_migrated(src, dst)
            else:
                async with QMP(dst.name) as qmp:
                    await qmp.connect(str(dst.qmp_path))
                    info = await qmp.query_migrate()
                    assert info.status is MigrationStatus.COMPLETED
                    assert await qmp.query_status() is RunState.RUNNING
                assert (await source_state(src))[0] is RunState.POSTMIGRATE
            procs.stop_all()
            assert 0 < _sent_bytes(connect.log()) < ram / 2, connect.log()

    run_e2e(main())
