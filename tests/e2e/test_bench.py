"""``migrelay bench`` end to end: every mode this machine supports, small RAM, real QEMU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

#: Every mode: direct TCP and unix, the tunnel plain and over TLS, multifd both ways,
#: and socat (installed by tools/setup) as the WebSocket-free reference.
MODES = ["tcp", "unix", "ws", "wss", "tcp-multifd2", "ws-multifd2", "socat"]


def _bench(tmp_path: Path, *args: str) -> dict[str, object]:
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "migrelay", "bench", "--ram", "32M", "--json",
         str(report_path), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, object] = json.loads(report_path.read_text())
    # The table went to stdout, the progress lines to stderr.
    assert "x tcp" in result.stdout
    assert "run 1:" in result.stderr
    return report


def test_bench_reports_every_mode_with_matching_ram_and_ratios(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    report = _bench(tmp_path, "--runs", "2", "--modes", ",".join(MODES), "--plot", str(plot))
    assert report["modes"] == MODES
    assert report["ram_bytes"] == 32 << 20
    results = report["results"]
    assert isinstance(results, list)
    assert [(r["run"], r["mode"]) for r in results] == [
        (run, mode) for run in (1, 2) for mode in MODES
    ]  # interleaved: every mode once per round
    assert all(r["ram_matched"] and r["error"] is None for r in results)
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


def test_bench_across_a_shaped_link_between_two_namespaces(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--runs", "1", "--modes", "tcp,ws", "--link", "1gbit")
    assert report["link"] == "1gbit"
    summary = report["summary"]
    assert isinstance(summary, list)
    assert all(row["all_ram_matched"] and not row["failures"] for row in summary)
