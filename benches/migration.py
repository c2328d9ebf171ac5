"""Migration throughput: migrelay's tunnel against a direct TCP migration.

Usage: ``.venv/bin/python benches/migration.py [--ram 1G] [--runs 3]
[--modes tcp,ws,wss,ws-multifd4,socat] [--disk 1G] [--relay-args "..."]
[--baseline DIR [--baseline-relay-args "..."]] [--json FILE]``

Interleaved runs (tcp, ws, …, tcp, ws, …) of a paused VM whose RAM is random bytes,
each timed until the destination's query-migrate says ``completed``; medians, the ratio
to direct TCP, and the relays' CPU seconds per GiB. With ``--disk`` the VM also has a
disk of random bytes, copied first as ``migrate --copy-storage`` does (direct TCP:
mirrored to an NBD export on TCP), and the disk and RAM phases are reported apart.
With ``--baseline DIR`` every ws/wss mode also runs with another checkout's relays
(``base:ws``), right after it in each round, and each pair is compared round by round.
``migrelay bench`` runs the same code, and has the options this script lacks (``--workload``,
``--content``, ``--link``, ``--timeout``).

Conclusion (1 GiB, 2-core AMD EPYC, QEMU 7.2 TCG; see README and benches/results/):
the ratio to direct TCP is printed per mode; direct TCP is bound by destination QEMU's
CPU, and the relays cost only the CPU they take from the other core.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from migrelay.lab.bench import (
    RunResult,
    any_failed,
    available_modes,
    baseline_command,
    check_disk_size,
    format_table,
    run_bench,
    write_json,
)
from migrelay.units import parse_size


def _print_run(result: RunResult) -> None:
    took = f"{result.seconds:.2f} s" if result.seconds else "failed"
    ram = "ram ok" if result.ram_matched else "RAM MISMATCH"
    if result.disk_matched is not None:
        ram += ", disk ok" if result.disk_matched else ", DISK MISMATCH"
    if result.disk_seconds is not None and result.ram_seconds is not None:
        took += f" (disk {result.disk_seconds:.2f} + ram {result.ram_seconds:.2f})"
    error = f"  {result.error}" if result.error else ""
    print(f"run {result.run} {result.mode:<12} {took:>9}  {ram}{error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--modes", default="tcp,ws", help="comma-separated modes")
    parser.add_argument("--disk", help="give each VM a disk of this size (default: none)")
    parser.add_argument(
        "--relay-args", default="", help="extra arguments for both migrelay relays (quoted)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout: its .venv/bin/python -m migrelay runs every ws/wss mode"
        " too, as base:MODE, in the same rounds",
    )
    parser.add_argument(
        "--baseline-relay-args", default="", help="extra arguments for the baseline's relays"
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    try:
        modes = available_modes(args.modes.split(","), baseline=args.baseline is not None)
        if args.baseline is not None:
            baseline_command(args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    disk_size = parse_size(args.disk) if args.disk else None
    if disk_size is not None:
        check_disk_size(disk_size)
    report = asyncio.run(
        run_bench(
            modes,
            parse_size(args.ram),
            args.runs,
            on_result=_print_run,
            disk_size=disk_size,
            baseline=args.baseline,
            relay_args=shlex.split(args.relay_args),
            baseline_relay_args=shlex.split(args.baseline_relay_args),
        )
    )
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    return 1 if any_failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
