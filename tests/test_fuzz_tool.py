"""``tools/fuzz_frames.py`` runs, so that CI exercises the fuzzer and not only its findings.

* A few seconds of its random-mutation engine (the one CI has: atheris is an extra)
  feed the seed corpus and then mutations to every target, find no crash, exit 0 and
  say how many inputs they ran.
* A target that raises is counted, its input saved under ``--crash-dir``, its traceback
  printed, and the tool exits 1: the zero above is a count, not a tool that cannot see.

The tool runs as a subprocess, as an operator runs it; ``tests/core/test_fuzz.py``
checks the same properties in-process with hypothesis.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests import helpers

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fuzz_frames.py"
FUZZ_SECONDS = 3.0
EXIT_S = 60.0 * helpers.FACTOR
REPORT = re.compile(
    r"engine=random runs=(?P<runs>\d+) crashes=(?P<crashes>\d+) "
    r"seconds=\d+ runs_per_s=\d+"
)
#: Runs the tool with one more target, which fails on every input holding "GET ".
PLANTED_CRASH = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fuzz_frames", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

def planted(data, selector):
    if b"GET " in data:
        raise IndexError("planted crash")

tool.TARGETS["planted"] = planted
sys.argv = sys.argv[1:]
sys.exit(tool.main())
"""


def fuzz(
    tmp_path: Path, seconds: float, *, planted: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the tool's random engine in ``tmp_path`` for ``seconds``."""
    program = ["-c", PLANTED_CRASH] if planted else []
    return subprocess.run(
        [
            sys.executable,
            *program,
            str(TOOL),
            "--seconds",
            str(seconds),
            "--engine",
            "random",
            "--seed",
            "7",
            "--crash-dir",
            str(tmp_path / "crashes"),
            "--corpus-dir",
            str(tmp_path / "corpus"),
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_S,
        check=False,
    )


def report(result: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """The run count and crash count of the tool's one line of output."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result
    match = REPORT.fullmatch(lines[0])
    assert match is not None, lines
    return int(match["runs"]), int(match["crashes"])


def test_random_engine_runs_mutations_for_seconds_and_finds_no_crash(tmp_path: Path) -> None:
    seeds_only = fuzz(tmp_path, 0)
    assert seeds_only.returncode == 0, seeds_only
    seed_runs, crashes = report(seeds_only)
    assert seed_runs > 0 and crashes == 0

    result = fuzz(tmp_path, FUZZ_SECONDS)
    assert result.returncode == 0, result
    assert result.stderr == ""
    runs, crashes = report(result)
    assert crashes == 0
    # Mutations ran after the seeds: at least a few hundred inputs a second.
    assert runs >= seed_runs + 100 * FUZZ_SECONDS, (runs, seed_runs)
    assert not (tmp_path / "crashes").exists()


def test_a_crashing_target_is_counted_saved_and_makes_the_tool_exit_1(tmp_path: Path) -> None:
    result = fuzz(tmp_path, 0, planted=True)
    assert result.returncode == 1, result
    runs, crashes = report(result)
    assert 0 < crashes < runs
    saved = sorted((tmp_path / "crashes").iterdir())
    # The seeds are all different: one file for each crash, holding its input.
    assert len(saved) == crashes
    assert all(path.name.startswith("crash-") for path in saved)
    assert all(b"GET " in path.read_bytes() for path in saved)
    assert result.stderr.count("CRASH on input") == min(crashes, 5)
    assert "IndexError: planted crash" in result.stderr
