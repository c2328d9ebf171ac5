"""The relay-only bench (`migrelay.lab.relaybench`): real relays, small sizes, no QEMU.

Speed is not asserted (shared hosts, STYLE.md §10): these keep the bench from rotting
and check what its figures rest on: every byte pushed arrives, on the right channel,
and each row is compared with the right reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FACTOR
from tests.loops import run
from typer.testing import CliRunner

from migrelay.cli.app import app
from migrelay.core.events import EndOfStream, Payload
from migrelay.core.frames import FrameParser
from migrelay.lab import relaybench
from migrelay.lab.relaybench import Sampling, SourceFile, StreamDigest
from migrelay.lab.splicerelay import frame_header
from migrelay.units import MIB


def test_the_tools_the_bench_runs_are_installed() -> None:
    # Not a skip: tools/setup installs them, and a bench without them compares nothing.
    assert shutil.which("socat") and shutil.which("openssl") and shutil.which("taskset")


SIZE = 32 * MIB
MODES = ["direct", "socat", "splice", "ws", "wss"]
CHANNELS = [1, 2]
BENCH = Path(__file__).resolve().parent.parent.parent / "benches" / "relay.py"


def test_every_byte_arrives_on_its_channel_and_rows_have_their_references() -> None:
    # Full hashing here (the bench samples): a byte lost, duplicated or swapped between
    # channels anywhere in the 32 MiB changes a digest.
    report = run(
        relaybench.run_relay_bench(
            relaybench.relay_modes(MODES),
            CHANNELS,
            [None],
            SIZE,
            1,
            sampling=Sampling.full(),
            relay_args=["--workers", "2"],
        ),
        "asyncio",
        timeout=240 * FACTOR,
    )
    assert json.loads(json.dumps(report)) == report  # what --json writes
    assert report["size_bytes"] == SIZE and report["runs"] == 1
    assert "every byte" in str(report["integrity"])
    assert "command" in report and "cpu" in report["machine"]  # type: ignore[operator]
    cipher: dict[str, Any] = report["cipher"]  # type: ignore[assignment]
    assert cipher["cpu_s_per_gib"] > 0 and "gcm" in cipher["evp"] + cipher["suite"].lower()

    results: list[dict[str, Any]] = report["results"]  # type: ignore[assignment]
    # Interleaved: every mode once per channel count, in the order given.
    assert [(r["channels"], r["mode"]) for r in results] == [
        (channels, mode) for channels in CHANNELS for mode in MODES
    ]
    for r in results:
        assert r["error"] is None and r["intact"], r
        assert sorted(r["bytes_received"]) == sorted(
            length for _, length in SourceFile(Path("-"), SIZE).slices(r["channels"])
        )
        assert r["seconds"] > 0 and r["harness_cpu_seconds"] >= 0
        relayed = r["mode"] != "direct"
        assert (r["source_cpu_seconds"] is not None) == relayed, r
        assert (r["destination_cpu_seconds"] is not None) == relayed, r
        if r["mode"] in ("ws", "wss"):
            # The relays connect channel N to the destination after 0..N-1.
            assert r["in_order"], r
            # Per-thread CPU: the main loop and one named thread per worker, adding up
            # to the process's CPU.
            workers = ["migrelay-w0", "migrelay-w1"]
            for relay in ("source", "destination"):
                threads = r[f"{relay}_threads"]
                assert {"main", *workers} <= threads.keys(), threads
                assert sum(threads.values()) == pytest.approx(
                    r[f"{relay}_cpu_seconds"], abs=0.05, rel=0.1
                )

    rows = {(row["mode"], row["channels"]): row for row in report["summary"]}  # type: ignore[attr-defined]
    assert set(rows) == {(mode, channels) for mode in MODES for channels in CHANNELS}
    for channels in CHANNELS:
        socat = rows["socat", channels]["cpu_s_per_gib"]["both"]
        ws, wss = rows["ws", channels], rows["wss", channels]
        assert ws["reference"] == "socat" and ws["reference_cpu_s_per_gib"] == socat
        assert rows["splice", channels]["reference"] == "socat"
        floor = socat + 2 * cipher["cpu_s_per_gib"]
        assert wss["reference"] == "tls floor"
        assert wss["tls_floor_cpu_s_per_gib"] == pytest.approx(floor)
        assert wss["cpu_ratio"] == pytest.approx(wss["cpu_s_per_gib"]["both"] / floor)
        assert rows["direct", channels]["reference"] is None
        assert rows["direct", channels]["cpu_s_per_gib"].keys() == {"harness"}
    assert all(row["all_intact"] and not row["failures"] for row in rows.values())
    assert set(rows["ws", CHANNELS[0]]["thread_cpu_s_per_gib"]) == {"source", "destination"}
    table = relaybench.format_table(report)
    assert "tls floor" in table and "TLS floor:" in table and "wss" in table
    assert "CPU s/GiB by thread: source main" in table
    assert not relaybench.any_failed(report)


def test_the_sampled_digest_does_not_depend_on_how_the_stream_is_cut(tmp_path: Path) -> None:
    # The sink hashes what recv_into hands it, cut anywhere; the expected digest is read
    # from the file window by window. Both must agree, and see a changed sampled byte.
    sampling = Sampling(sample_bytes=4096, stride_bytes=64 * 1024)
    data = bytearray(os.urandom(1 * MIB + 12345))
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    source = SourceFile(path, len(data))
    offset, length = 8192, len(data) - 8192
    digest = StreamDigest(sampling)
    position, cut = offset, 1
    while position < offset + length:
        step = min(cut, offset + length - position)
        digest.update(memoryview(data)[position : position + step])
        position, cut = position + step, cut * 3 % 70001 + 1
    assert digest.hexdigest() == source.digest(offset, length, sampling)
    data[offset + 64 * 1024 + 100] ^= 1  # inside the second sampled window
    path.write_bytes(data)
    assert digest.hexdigest() != source.digest(offset, length, sampling)


def test_slices_cover_the_file_once_page_aligned() -> None:
    slices = SourceFile(Path("-"), 10 * 4096 + 100).slices(3)
    assert slices == [(0, 12288), (12288, 12288), (24576, 16484)]


def test_benches_relay_py_and_bench_relay_only_write_the_report(tmp_path: Path) -> None:
    script_json, cli_json = tmp_path / "script.json", tmp_path / "cli.json"
    # A baseline "checkout" whose .venv/bin/python is this interpreter.
    python = tmp_path / "base" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    script = subprocess.run(
        [sys.executable, str(BENCH), "--size", "8M", "--runs", "2", "--modes", "ws",
         "--channels", "2", "--baseline", str(tmp_path / "base"), "--json", str(script_json)],
        capture_output=True, text=True, timeout=120 * FACTOR, check=False,
    )  # fmt: skip
    assert script.returncode == 0, script.stdout + script.stderr
    assert "x socat" in script.stdout and "run 1: ws x2" in script.stderr
    assert "ws x2 cores all against base:ws" in script.stdout
    script_report = json.loads(script_json.read_text())
    assert script_report["modes"] == ["ws", "base:ws"]  # interleaved, paired by round
    assert [(r["run"], r["mode"]) for r in script_report["results"]] == [
        (1, "ws"),
        (1, "base:ws"),
        (2, "ws"),
        (2, "base:ws"),
    ]
    assert script_report["summary"][0]["paired_rounds"] == 2
    cli = subprocess.run(
        [sys.executable, "-m", "migrelay", "bench", "--relay-only", "--size", "8M", "--runs",
         "1", "--modes", "socat,ws", "--channels", "1", "--cores", "1", "--relay-args",
         "--max-message 4M", "--json", str(cli_json)],
        capture_output=True, text=True, timeout=120 * FACTOR, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    report = json.loads(cli_json.read_text())
    assert report["relay_args"] == ["--max-message", "4M"] and report["cores"] == ["0"]
    assert [r["mode"] for r in report["results"]] == ["socat", "ws"]
    assert all(r["intact"] for r in report["results"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--relay-only", "--ram", "1G"], "--ram: not with --relay-only"),
        (["--channels", "2"], "--channels: only with --relay-only"),
        (["--relay-only", "--modes", "tcp"], "unknown relay mode 'tcp'"),
        (["--relay-only", "--modes", "base:ws"], "need a baseline"),
        (["--relay-only", "--size", "1000"], "multiple of 4 KiB"),
    ],
)
def test_bench_refuses_options_of_the_other_bench(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1
    assert message in result.output


def test_the_splice_prototype_frames_what_it_carries() -> None:
    # Unmasked binary frames (a server's), in the shortest length form, then an empty
    # one: what migrelay's relays take as end of stream.
    payloads = [b"a" * 100, b"b" * 126, b"c" * 70_000]
    stream = bytearray(b"".join(frame_header(len(p)) + p for p in payloads) + frame_header(0))
    events, used = FrameParser(expect_masked=False).receive_frames(memoryview(stream), 16)
    assert used == len(stream)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, Payload)) == b"".join(payloads)
    assert isinstance(events[-1], EndOfStream)
