"""``migrelay bench`` end to end: every mode this machine supports, small RAM, real QEMU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from migrelay.cli.app import app
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.errors import RelayError
from migrelay.lab import bench as lab_bench
from migrelay.lab.vm import first_difference
from tests.e2e.vms import VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner

pytestmark = pytest.mark.e2e

#: Every mode: direct TCP and unix, the tunnel plain and over TLS, multifd both ways,
#: and socat (installed by tools/setup) as the WebSocket-free reference.
MODES = ["tcp", "unix", "ws", "wss", "tcp-multifd2", "ws-multifd2", "socat"]


def _bench(tmp_path: Path, *args: str) -> dict[str, object]:
    return _bench_with_table(tmp_path, *args)[0]


def _bench_with_table(tmp_path: Path, *args: str) -> tuple[dict[str, object], str]:
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "migrelay", "bench", "--ram", "32M", "--json",
         str(report_path), *args],
        capture_output=True, text=True, timeout=600 * FACTOR, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, object] = json.loads(report_path.read_text())
    # The table went to stdout, the progress lines to stderr.
    assert "x tcp" in result.stdout
    assert "run 1:" in result.stderr
    return report, result.stdout


def _only(report: dict[str, object], key: str) -> dict[str, Any]:
    """The one run (``results``) or mode (``summary``) of a report."""
    items = report[key]
    assert isinstance(items, list) and len(items) == 1, items
    item = items[0]
    assert isinstance(item, dict)
    return item


def test_bench_reports_every_mode_with_matching_ram_and_ratios(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    report = _bench(tmp_path, "--runs", "2", "--modes", ",".join(MODES), "--plot", str(plot))
    assert report["modes"] == MODES
    assert report["ram_bytes"] == 32 << 20
    assert report["ram_on"] == "tmpfs" and report["ram_content"] == "random"
    results = report["results"]
    assert isinstance(results, list)
    assert [(r["run"], r["mode"]) for r in results] == [
        (run, mode) for run in (1, 2) for mode in MODES
    ]  # interleaved: every mode once per round
    assert all(r["ram_matched"] and r["error"] is None for r in results)
    for r in results:
        # Unshaped: the destination relay counts the tunnel's bytes, nothing counts the
        # direct modes' but QEMU. Random RAM: the relay carries QEMU's bytes as they are.
        assert r["wire_source"] == ("relay" if r["mode"].startswith("ws") else "qemu"), r
        assert r["outcome"] == "completed" and r["passes"] >= 2, r
        assert r["transferred_bytes"] >= 32 << 20, r
        assert r["wire_bytes"] == pytest.approx(r["transferred_bytes"], rel=0.01), r
    summary = {row["mode"]: row for row in report["summary"]}  # type: ignore[attr-defined]
    assert set(summary) == set(MODES)
    for mode, row in summary.items():
        times = sorted(r["seconds"] for r in results if r["mode"] == mode)
        assert row["median_seconds"] == pytest.approx(sum(times) / 2)
        reference = "tcp-multifd2" if "multifd" in mode else "tcp"
        assert row["ratio_to_tcp"] == pytest.approx(
            row["median_seconds"] / summary[reference]["median_seconds"]
        )
        relays = set(row["relay_cpu_seconds_per_gib"])
        expected = {
            "ws": {"serve", "connect"},
            "wss": {"serve", "connect"},
            "socat": {"socat-server", "socat-client"},
        }.get(mode.split("-")[0], set())
        assert relays == expected, mode
        assert all(rss > 0 for rss in row["relay_peak_rss_bytes"].values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


#: Well below what either mode reaches unshaped here (~150 MiB/s), so that the figures
#: show whether the link was really shaped: 25 MB/s, 32 MiB in about 1.3 s.
LINK_RATE_BITS = 200_000_000


def test_bench_across_a_shaped_link_between_two_namespaces(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--runs", "1", "--modes", "tcp,ws", "--link", "200mbit")
    assert report["link"] == "200mbit"
    summary = report["summary"]
    assert isinstance(summary, list)
    assert all(row["all_ram_matched"] and not row["failures"] for row in summary)
    link_bytes_per_s = LINK_RATE_BITS / 8
    for row in summary:
        rate = row["median_throughput_bytes_per_s"]
        # Under the link's rate (the tbf bucket lets 256 KiB through at once at first),
        # and not far under it: the migration filled the link.
        assert 0.5 * link_bytes_per_s < rate < 1.1 * link_bytes_per_s, row


def test_bench_counts_compressed_text_ram_on_the_wire_of_a_shaped_link(tmp_path: Path) -> None:
    report, table = _bench_with_table(
        tmp_path, "--runs", "1", "--modes", "ws-multifd2,ws-multifd2-zstd",
        "--content", "text", "--link", "200mbit",
    )  # fmt: skip
    assert report["ram_content"] == "text"
    rows = {row["mode"]: row for row in report["summary"]}  # type: ignore[attr-defined]
    assert all(row["wire_source"] == "link" and not row["failures"] for row in rows.values())
    plain, zstd = rows["ws-multifd2"], rows["ws-multifd2-zstd"]
    # QEMU 7.2 counts multifd pages before compressing them: its transferred is the
    # same either way; the veth sees zstd's ~4x.
    assert plain["median_wire_bytes"] >= plain["median_transferred_bytes"]
    assert zstd["median_transferred_bytes"] >= 32 << 20
    assert zstd["median_wire_bytes"] < zstd["median_transferred_bytes"] / 2.5
    assert zstd["median_seconds"] < plain["median_seconds"]
    assert "link" in table.splitlines()[1]


def test_bench_with_a_dirtying_guest_sends_more_than_the_ram_in_more_passes(
    tmp_path: Path,
) -> None:
    # 12 MiB/s dirtied against a 25 MB/s link: each pass sends about half the one
    # before, until what is left fits QEMU's 300 ms downtime.
    # Two runs: the second reuses the source's RAM file, the first guest's counter in it.
    report = _bench(
        tmp_path, "--runs", "2", "--modes", "ws", "--workload", "dirty:16M@12M",
        "--link", "200mbit", "--timeout", "60",
    )  # fmt: skip
    assert report["workload"] == "dirty:16M@12M"
    results = report["results"]
    assert isinstance(results, list) and len(results) == 2
    for result in results:
        assert result["outcome"] == "completed" and result["ram_matched"], result
        assert result["passes"] > 3, result  # a paused VM takes 3
        assert result["transferred_bytes"] > (32 << 20) + (8 << 20), result
        assert result["max_throttle_percent"] == 0  # no auto-converge asked


def test_bench_reports_a_guest_that_outruns_the_link_as_not_converged_unless_the_policy_steps_in(
    tmp_path: Path,
) -> None:
    # The guest rewrites 16 MiB as fast as TCG goes: each pass needs 0.7 s of a 25 MB/s
    # link, above QEMU's 300 ms downtime, however much auto-converge throttles it.
    # migrelay's policy raises the downtime limit (300, 482, 775 ms…) until it fits.
    report, table = _bench_with_table(
        tmp_path, "--runs", "1", "--modes", "ws-ac,ws-steps", "--workload", "dirty:16M",
        "--content", "zero", "--link", "200mbit", "--timeout", "10",
    )  # fmt: skip
    assert report["ram_content"] == "zero"
    results = {r["mode"]: r for r in report["results"]}  # type: ignore[attr-defined]
    alone, policy = results["ws-ac"], results["ws-steps"]
    assert alone["outcome"] == "not converged" and alone["error"] is None, alone
    assert alone["ram_matched"] is None and alone["seconds"] is None
    assert alone["passes"] > 3 and alone["max_throttle_percent"] > 0, alone
    assert alone["downtime_limit_ms"] is None  # no policy
    assert policy["outcome"] == "completed" and policy["ram_matched"], policy
    assert policy["downtime_limit_ms"] > 300, policy
    assert policy["downtime_ms"] > 300, policy
    rows = {row["mode"]: row for row in report["summary"]}  # type: ignore[attr-defined]
    assert rows["ws-ac"]["not_converged"] == 1 and rows["ws-ac"]["failures"] == 0
    assert rows["ws-steps"]["not_converged"] == 0 and rows["ws-steps"]["failures"] == 0
    assert "no conv." in table and "(1 not converged)" in table


def test_bench_refuses_a_workload_larger_than_the_ram(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migrelay", "bench", "--ram", "32M", "--modes", "ws",
         "--workload", "dirty:32M"],
        capture_output=True, text=True, timeout=60 * FACTOR, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "more than the 33554432 bytes of RAM" in result.stderr


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ws", lab_bench.Mode("ws", "ws")),
        ("tcp-multifd4", lab_bench.Mode("tcp-multifd4", "tcp", 4)),
        ("ws-multifd2-zstd", lab_bench.Mode("ws-multifd2-zstd", "ws", 2, "zstd")),
        ("tcp-multifd2-zlib", lab_bench.Mode("tcp-multifd2-zlib", "tcp", 2, "zlib")),
        ("ws-xbzrle", lab_bench.Mode("ws-xbzrle", "ws", xbzrle=True)),
        ("wss-xbzrle-ac", lab_bench.Mode("wss-xbzrle-ac", "wss", xbzrle=True, auto_converge=True)),
        ("ws-steps", lab_bench.Mode("ws-steps", "ws", policy="steps")),
        (
            "tcp-ac-pause",
            lab_bench.Mode("tcp-ac-pause", "tcp", auto_converge=True, policy="pause"),
        ),
        ("base:wss-multifd2", lab_bench.Mode("base:wss-multifd2", "wss", 2, baseline=True)),
    ],
)
def test_mode_names_parse_into_transport_and_qemu_options(
    name: str, expected: lab_bench.Mode
) -> None:
    assert lab_bench.Mode.parse(name) == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ws-zstd", "needs multifd"),
        ("ws-multifd2-xbzrle", "xbzrle"),
        ("ws-multifd2-lz4", "unknown or repeated option"),
        ("ws-ac-ac", "unknown or repeated option"),
        ("ws-steps-pause", "unknown or repeated option"),
        ("quic", "unknown mode"),
        ("base:tcp", "only ws and wss"),
        ("base:socat", "only ws and wss"),
    ],
)
def test_mode_names_qemu_refuses_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lab_bench.Mode.parse(name)


def test_mode_options_carry_compression_and_xbzrle_cache() -> None:
    options = lab_bench.Mode.parse("ws-multifd2-zstd").options()
    assert (options.multifd_channels, options.compress) == (2, "zstd")
    xbzrle = lab_bench.Mode.parse("tcp-xbzrle-ac").options(256 << 20)
    assert (xbzrle.xbzrle_cache, xbzrle.auto_converge) == (256 << 20, True)


def test_workloads_parse_with_an_optional_rate() -> None:
    assert lab_bench.Workload.parse("idle") == lab_bench.Workload("idle")
    busy = lab_bench.Workload.parse("dirty:64M@20M")
    assert (busy.dirty_bytes, busy.rate_bytes_per_s) == (64 << 20, 20 << 20)
    assert busy.pages_per_tick == 281  # 20 MiB/s over 4 KiB pages at 18.2 ticks/s
    assert lab_bench.Workload.parse("dirty:8M").pages_per_tick is None
    for bad in ("busy", "dirty:", "dirty:1000", "dirty:8M@0"):
        with pytest.raises(ValueError):
            lab_bench.Workload.parse(bad)


def test_ram_dir_must_be_a_tmpfs_with_room(tmp_path: Path) -> None:
    # A directory on a disk, never a skip: the temporary directory may be on a tmpfs
    # (the checkout or /var/tmp then stands in; only their file system is read).
    candidates = (tmp_path, Path(__file__).resolve().parent, Path("/var/tmp"))
    on_disk = next((path for path in candidates if not lab_bench._on_tmpfs(path)), None)
    assert on_disk is not None, f"no directory off tmpfs among {candidates}"
    with pytest.raises(RelayError, match="is not a tmpfs"):
        lab_bench.tmpfs_ram_dir(1 << 20, on_disk)
    with pytest.raises(RelayError, match="MiB free"):
        lab_bench.tmpfs_ram_dir(1 << 60)
    assert lab_bench.tmpfs_ram_dir(1 << 20) == lab_bench.TMPFS_DIR


def test_bench_with_a_disk_copies_disk_then_ram_and_compares_the_disks(tmp_path: Path) -> None:
    report, table = _bench_with_table(tmp_path, "--runs", "1", "--modes", "tcp,ws", "--disk", "8M")
    assert report["disk_bytes"] == 8 << 20
    results = report["results"]
    assert isinstance(results, list)
    assert [r["mode"] for r in results] == ["tcp", "ws"]
    for r in results:
        assert r["error"] is None and r["ram_matched"], r
        assert r["disk_matched"] is True, r  # qemu-img compare ran and found them equal
        assert r["disk_seconds"] > 0 and r["ram_seconds"] > 0
        assert r["seconds"] == pytest.approx(r["disk_seconds"] + r["ram_seconds"])
    summary = {row["mode"]: row for row in report["summary"]}  # type: ignore[attr-defined]
    assert all(row["all_disks_matched"] is True for row in summary.values())
    assert summary["ws"]["ratio_to_tcp"] == pytest.approx(
        summary["ws"]["median_seconds"] / summary["tcp"]["median_seconds"]
    )  # of the totals: disk and RAM
    assert all(row["median_disk_seconds"] > 0 for row in summary.values())
    assert all(row["median_ram_seconds"] > 0 for row in summary.values())
    header, *rows = table.splitlines()
    assert "disk s" in header and "ram s" in header and header.endswith("disk")
    assert [row.split()[0] for row in rows] == ["tcp", "ws"]
    assert all(row.split()[-2:] == ["ok", "ok"] for row in rows)


def test_bench_with_a_baseline_runs_each_tunnel_mode_again_with_its_relays(
    tmp_path: Path,
) -> None:
    # A baseline "checkout" whose .venv/bin/python is this interpreter, noting each
    # command it runs: the base: mode's two relays, and nothing else.
    calls = tmp_path / "baseline-calls"
    python = tmp_path / "base" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    report, table = _bench_with_table(
        tmp_path, "--runs", "1", "--modes", "tcp,ws", "--baseline", str(tmp_path / "base"),
        "--relay-args", "--max-message 2M", "--baseline-relay-args", "--max-message 512K",
    )  # fmt: skip
    assert report["modes"] == ["tcp", "ws", "base:ws"]
    assert report["baseline"] == str(tmp_path / "base")
    assert report["relay_args"] == ["--max-message", "2M"]
    assert report["baseline_relay_args"] == ["--max-message", "512K"]
    results = report["results"]
    assert isinstance(results, list)
    assert [r["mode"] for r in results] == ["tcp", "ws", "base:ws"]  # tcp once, paired
    ws_run, base_run = results[1], results[2]
    assert all(r["outcome"] == "completed" and r["ram_matched"] for r in results), results
    assert sorted(line.split()[2] for line in calls.read_text().splitlines()) == [
        "connect",
        "serve",
    ]  # -m migrelay serve ...
    assert all(line.endswith("--max-message 512K") for line in calls.read_text().splitlines())
    rows = {row["mode"]: row for row in report["summary"]}  # type: ignore[attr-defined]
    assert set(rows) == {"tcp", "ws", "base:ws"}
    ws, base = rows["ws"], rows["base:ws"]
    assert base["ratio_to_tcp"] == pytest.approx(
        base["median_seconds"] / rows["tcp"]["median_seconds"]
    )
    assert set(base["relay_cpu_seconds_per_gib"]) == {"serve", "connect"}
    assert ws["baseline_time_ratio"] == pytest.approx(
        ws["median_seconds"] / base["median_seconds"]
    )
    assert ws["paired_rounds"] == 1 and ws["paired_seconds_diff_stderr"] is None
    assert ws["paired_seconds_diff"] == pytest.approx(ws_run["seconds"] - base_run["seconds"])
    assert ws["rounds_faster_than_baseline"] == (ws["paired_seconds_diff"] < 0)
    assert rows["tcp"]["paired_rounds"] == 0 and base["paired_rounds"] == 0
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["tcp", "ws", "base:ws"]
    assert lines[4].startswith("ws against base:ws: time ")
    assert "paired difference" in lines[4] and lines[4].endswith("of 1 rounds")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--modes tcp,base:ws", "base: modes need a baseline checkout"),
        ("--baseline {missing}", "has no .venv/bin/python"),
        ("--relay-only --baseline {missing}", "has no .venv/bin/python"),
        (
            "--src-qmp s.qmp --dst-qmp d.qmp --modes ws --baseline {checkout}",
            "--baseline is for test VMs",
        ),
    ],
)
def test_bench_refuses_a_baseline_it_cannot_use(tmp_path: Path, args: str, message: str) -> None:
    (tmp_path / "checkout" / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "checkout" / ".venv" / "bin" / "python").touch()
    paths = {"missing": tmp_path / "missing", "checkout": tmp_path / "checkout"}
    result = CliRunner().invoke(app, ["bench", *args.format_map(paths).split()])
    assert result.exit_code == 1
    assert message in result.output


def test_bench_counts_a_disk_that_differs_as_a_failure(
    run_e2e: AsyncRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def differing(*_args: object, **_kwargs: object) -> str:
        return "Content mismatch at offset 0!"

    monkeypatch.setattr(lab_bench, "compare_images", differing)
    report = run_e2e(
        lab_bench.run_bench([lab_bench.Mode.parse("tcp")], 32 << 20, 1, disk_size=8 << 20)
    )
    results = report["results"]
    assert isinstance(results, list) and len(results) == 1
    result = results[0]
    assert result["disk_matched"] is False
    assert (
        result["error"]
        == "destination disk differs from the source: Content mismatch at offset 0!"
    )
    assert lab_bench.any_failed(report)
    assert "MISMATCH" in lab_bench.format_table(report).splitlines()[1]


def test_bench_migrates_given_vms_once_and_leaves_their_ram_to_the_user(
    run_e2e: AsyncRunner, tmp_path: Path, vm_pair: VMPairFactory
) -> None:
    async def scenario() -> dict[str, object]:
        async with vm_pair(32 << 20) as (src, dst):
            report_path = tmp_path / "given.json"
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "migrelay", "bench", "--modes", "ws", "--runs", "1",
                "--src-qmp", str(src.qmp_path), "--dst-qmp", str(dst.qmp_path),
                "--json", str(report_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await process.communicate()
            assert process.returncode == 0, output.decode()
            assert b"RAM not compared" in output
            # The VMs are the user's: still running, the migration done on both sides.
            async with QMP("check-src") as sq, QMP("check-dst") as dq:
                await sq.connect(str(src.qmp_path))
                await dq.connect(str(dst.qmp_path))
                assert (await dq.query_migrate()).status is MigrationStatus.COMPLETED
                await sq.quit()
                await dq.quit()
            await src.wait(30 * FACTOR)
            await dst.wait(30 * FACTOR)
            assert first_difference(src.ram_path, dst.ram_path) is None
            report: dict[str, object] = json.loads(report_path.read_text())
            return report

    report = run_e2e(scenario())
    results = report["results"]
    assert isinstance(results, list) and len(results) == 1
    assert results[0]["ram_matched"] is None and results[0]["error"] is None
    assert results[0]["seconds"] > 0


#: The given VMs' RAM: not --ram's default (1G), nor the 32M of the other tests.
GIVEN_RAM_BYTES = 48 << 20


def test_bench_rates_given_vms_by_their_own_ram_and_says_it_did_not_compare_it(
    run_e2e: AsyncRunner, tmp_path: Path, vm_pair: VMPairFactory
) -> None:
    async def scenario() -> tuple[dict[str, object], str]:
        async with vm_pair(GIVEN_RAM_BYTES) as (src, dst):
            report_path = tmp_path / "given.json"
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "migrelay", "bench", "--modes", "ws", "--runs", "1",
                "--src-qmp", str(src.qmp_path), "--dst-qmp", str(dst.qmp_path),
                "--json", str(report_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            stdout, stderr = await process.communicate()
            assert process.returncode == 0, (stdout + stderr).decode()
            report: dict[str, object] = json.loads(report_path.read_text())
            return report, stdout.decode()

    report, table = run_e2e(scenario())
    # The size and the rate are the migrated VMs', not --ram's default of 1 GiB.
    assert report["ram_bytes"] == GIVEN_RAM_BYTES
    run = _only(report, "results")
    assert run["ram_bytes"] == GIVEN_RAM_BYTES and run["ram_matched"] is None
    assert run["throughput_bytes_per_s"] == pytest.approx(GIVEN_RAM_BYTES / run["seconds"])
    row = _only(report, "summary")
    assert row["median_throughput_bytes_per_s"] == pytest.approx(
        GIVEN_RAM_BYTES / row["median_seconds"]
    )
    # QEMU sent at least the RAM, and not several times as much: the size is the VMs'.
    assert GIVEN_RAM_BYTES <= run["transferred_bytes"] < 2 * GIVEN_RAM_BYTES, run
    # Not compared, and the table says so rather than "ok"; not a failure either.
    assert row["all_ram_matched"] is None
    mode_line = table.splitlines()[1]
    assert mode_line.startswith("ws ") and mode_line.endswith(" not compared"), table
    assert f"{GIVEN_RAM_BYTES / run['seconds'] / (1 << 20):.0f}" in mode_line.split(), table
    assert not lab_bench.any_failed(report)


def test_bench_refuses_a_ram_size_for_given_vms(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "--ram", "256M", "--modes", "ws", "--runs", "1",
         "--src-qmp", str(tmp_path / "a.qmp"), "--dst-qmp", str(tmp_path / "b.qmp")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "--ram is for test VMs; your own VMs' RAM size is read from QEMU" in result.output


def test_bench_refuses_several_runs_of_given_vms(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migrelay", "bench", "--runs", "2", "--modes", "ws",
         "--src-qmp", str(tmp_path / "a.qmp"), "--dst-qmp", str(tmp_path / "b.qmp")],
        capture_output=True, text=True, timeout=60 * FACTOR, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "migrelay: error: your own VMs can be migrated once: give one --modes, --runs 1, no --link"
    )


def test_bench_refuses_a_disk_for_given_vms(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migrelay", "bench", "--runs", "1", "--modes", "ws",
         "--disk", "8M", "--src-qmp", str(tmp_path / "a.qmp"),
         "--dst-qmp", str(tmp_path / "b.qmp")],
        capture_output=True, text=True, timeout=60 * FACTOR, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "migrelay: error: --disk is for test VMs; your own VMs keep their disks"
    )
