"""Relay-only throughput and CPU per GiB: migrelay's relays against socat, without QEMU.

Usage: ``.venv/bin/python benches/relay.py [--size 4G] [--runs 5]
[--modes direct,socat,splice,ws,wss] [--channels 1,2,4] [--cores all|1,2]
[--relay-args "..."] [--baseline DIR] [--json FILE]``

A file of random bytes on tmpfs is pushed (``sendfile``, one connection per channel)
through ``migrelay connect`` and ``migrelay serve`` into a sink that drains and counts;
socat in their place is the anchor, ``direct`` (no relay) the harness's own ceiling.
Interleaved rounds, medians: GiB/s, each relay's CPU s/GiB over the timed window, the
ratio to socat (ws) or to the TLS floor (wss: socat + 2 x the cipher's cost from
``openssl speed``). ``migrelay bench --relay-only`` runs the same code; the
methodology is in benches/README.md and `migrelay.lab.relaybench`.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from migrelay.lab.bench import write_json
from migrelay.lab.relaybench import (
    DEFAULT_CHANNELS,
    DEFAULT_MODES,
    DEFAULT_RUNS,
    LEGEND,
    Combination,
    RelayRun,
    any_failed,
    cores_label,
    describe_run,
    format_table,
    parse_channels,
    parse_cores,
    relay_modes,
    run_relay_bench,
)
from migrelay.units import parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4G", help="bytes pushed per run (default 4G)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="rounds (default 5)")
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated: direct,socat,splice,ws,wss (default all but splice)",
    )
    parser.add_argument(
        "--channels",
        default=",".join(map(str, DEFAULT_CHANNELS)),
        help="comma-separated channel counts (default 1,2,4)",
    )
    parser.add_argument(
        "--cores",
        default="all",
        help="comma-separated core counts to pin both relays to (taskset -c 0, 0,1);"
        " all: unpinned (default)",
    )
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
        size = parse_size(args.size)
        modes = relay_modes(args.modes.split(","), baseline=args.baseline is not None)
        channels = parse_channels(args.channels)
        cores = parse_cores(args.cores)
    except ValueError as exc:
        parser.error(str(exc))
    total = args.runs * len(modes) * len(channels) * len(cores)
    done = 0

    def on_start(combination: Combination, run: int) -> None:
        print(
            f"[{done + 1}/{total}] run {run}: {combination.mode.name} x{combination.channels}"
            f" cores {cores_label(combination.cores)} ...",
            file=sys.stderr,
        )

    def on_result(result: RelayRun) -> None:
        nonlocal done
        done += 1
        print(describe_run(result, size), file=sys.stderr)

    report = asyncio.run(
        run_relay_bench(
            modes,
            channels,
            cores,
            size,
            args.runs,
            baseline=args.baseline,
            relay_args=shlex.split(args.relay_args),
            baseline_relay_args=shlex.split(args.baseline_relay_args),
            on_start=on_start,
            on_result=on_result,
        )
    )
    print(format_table(report))
    print(LEGEND, file=sys.stderr)
    if args.json:
        write_json(report, args.json)
    return 1 if any_failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
