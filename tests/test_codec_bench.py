"""Smoke test: ``benches/codec.py --quick`` runs and writes JSON of the documented shape.

Speed is not asserted: CI hosts are shared and noisy (STYLE.md §10), so real figures
come from fixed hosts. This only keeps the benchmark from rotting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import FACTOR

BENCH = Path(__file__).resolve().parent.parent / "benches" / "codec.py"
SIZES = [64 * 1024, 1024 * 1024, 4 * 1024 * 1024]
CASES = {
    ("encode", "migrelay"),
    ("encode", "wsproto"),
    ("decode", "migrelay"),
    ("decode", "wsproto"),
    ("mask", "migrelay"),
    ("copy-bytearray", "python"),
    ("copy-memoryview", "python"),
}


def is_positive_number(value: object) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and value > 0


def test_quick_codec_bench_writes_json_with_every_size_and_case(tmp_path: Path) -> None:
    output = tmp_path / "codec.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120 * FACTOR,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "migrelay GB/s" in completed.stdout
    assert "mask/copy" in completed.stdout

    report: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
    for key in ("host", "cpu", "python", "platform", "wsproto", "malloc_env"):
        assert key in report, key
    assert report["python"] == sys.version.split()[0]
    assert report["mask_implementation"] == "c"
    assert report["quick"] is True
    assert report["sizes"] == SIZES

    results = report["results"]
    assert {(r["size_bytes"], r["operation"], r["codec"]) for r in results} == {
        (size, operation, codec) for size in SIZES for operation, codec in CASES
    }
    assert len(results) == len(SIZES) * len(CASES)
    for result in results:
        assert is_positive_number(result["median_gbps"]), result
        assert is_positive_number(result["best_gbps"]), result
        assert result["best_gbps"] >= result["median_gbps"]
        assert isinstance(result["loops"], int) and result["loops"] >= 1
        assert len(result["seconds"]) == report["repeat"]

    assert {(r["size_bytes"], r["operation"]) for r in report["ratios"]} == {
        (size, operation) for size in SIZES for operation in ("encode", "decode")
    }
    assert all(is_positive_number(r["migrelay_over_wsproto"]) for r in report["ratios"])
    assert [m["size_bytes"] for m in report["mask_vs_copy"]] == SIZES
    for entry in report["mask_vs_copy"]:
        assert is_positive_number(entry["mask_over_copy_bytearray"])
        assert is_positive_number(entry["mask_over_copy_memoryview"])
