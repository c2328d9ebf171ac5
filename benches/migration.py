"""Migration throughput: migrelay's tunnel against a direct TCP migration.

Usage: ``.venv/bin/python benches/migration.py [--ram 1G] [--runs 3]
[--modes tcp,ws,wss,ws-multifd4,socat] [--json FILE]``

Interleaved runs (tcp, ws, …, tcp, ws, …) of a paused VM whose RAM is random bytes,
each timed until the destination's query-migrate says ``completed``; medians, the ratio
to direct TCP, and the relays' CPU seconds per GiB. ``migrelay bench`` runs the same code.

Conclusion (1 GiB, 2-core AMD EPYC, QEMU 7.2 TCG; see README and benches/results/):
the ratio to direct TCP is printed per mode; direct TCP is bound by destination QEMU's
CPU, and the relays cost only the CPU they take from the other core.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from migrelay.lab.bench import (
    RunResult,
    available_modes,
    format_table,
    run_bench,
    write_json,
)
from migrelay.units import parse_size


def _print_run(result: RunResult) -> None:
    took = f"{result.seconds:.2f} s" if result.seconds else "failed"
    ram = "ram ok" if result.ram_matched else "RAM MISMATCH"
    error = f"  {result.error}" if result.error else ""
    print(f"run {result.run} {result.mode:<12} {took:>9}  {ram}{error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--modes", default="tcp,ws", help="comma-separated modes")
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    modes = available_modes(args.modes.split(","))
    report = asyncio.run(run_bench(modes, parse_size(args.ram), args.runs, on_result=_print_run))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    return 0 if all(row["all_ram_matched"] for row in report["summary"]) else 1  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
