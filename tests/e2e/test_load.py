"""Eight migrations at once through one ``migrelay serve``, with its memory sampled.

Eight 32 MiB VMs migrate at the same time, each through its own ``migrelay connect``
(a relay groups the channels QEMU opens into one migration, so one relay carries one
migration at a time) to the same ``serve --target-dir`` (``/vmN`` → ``vmN.sock``). Half
of them use multifd with 2 channels, so serve carries 4 × 1 + 4 × 3 = 16 channels.

Memory: the README bounds a channel's migration data in user space at 4 MiB ("Data path
and memory"). The test samples serve's RSS every 20 ms and checks that its growth over
the idle baseline stays within ``channels × 4 MiB`` (the README's figure, written as a
number, not read from `migrelay.limits.Limits`) plus
:data:`INTERPRETER_ALLOWANCE_BYTES` (Python objects per connection, the handshake, the
log), as the README's "Load" paragraph says.

Run with ``-s`` to see sessions, total throughput and peak memory: the README's figures
are ``benches/results/2026-12-01-load.log``, the output of
``.venv/bin/pytest tests/e2e/test_load.py -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.lab.vm import first_difference
from migrelay.units import MIB
from tests.e2e.vms import VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import INTERPRETER_ALLOWANCE_BYTES, MigrelayProcesses, RssSampler

pytestmark = pytest.mark.e2e

SESSIONS = 8
RAM_BYTES = 32 * MIB
#: multifd channel count per VM: even VMs single-channel, odd VMs multifd 2.
MULTIFD = [None if index % 2 == 0 else 2 for index in range(SESSIONS)]
CHANNELS = sum(1 + (channels or 0) for channels in MULTIFD)
MIGRATION_TIMEOUT_S = 180.0 * FACTOR
#: README, "Data path and memory": "Memory bound per channel: 4 MiB".
README_CHANNEL_BOUND_BYTES = 4 * MIB


def test_eight_concurrent_migrations_through_one_serve_complete_within_memory_bound(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    target_dir = sock_dir / "targets"
    target_dir.mkdir()
    server = migrelay_procs.serve("--target-dir", str(target_dir), "--wait-target", "60")
    clients = [
        migrelay_procs.connect(f"{server.url}/vm{index}", sock_dir / f"src{index}.sock")
        for index in range(SESSIONS)
    ]
    assert len(clients) == SESSIONS
    baseline = server.rss_bytes()
    transferred: list[int] = []

    async def one(
        index: int, stack: contextlib.AsyncExitStack, go: asyncio.Event, all_closed: asyncio.Event
    ) -> None:
        options = MigrationOptions(multifd_channels=MULTIFD[index])
        src, dst = await stack.enter_async_context(vm_pair(RAM_BYTES, name=f"vm{index}"))
        sq = await stack.enter_async_context(QMP(f"src{index}"))
        dq = await stack.enter_async_context(QMP(f"dst{index}"))
        await sq.connect(str(src.qmp_path))
        await dq.connect(str(dst.qmp_path))
        await prepare_incoming(dq, f"unix:{target_dir / f'vm{index}.sock'}", options)
        await go.wait()
        await start_migration(sq, f"unix:{sock_dir / f'src{index}.sock'}", options)
        final = await wait_destination_completed(dq, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        info = await sq.query_migrate()
        assert info.status is MigrationStatus.COMPLETED
        transferred.append(info.transferred or 0)
        # The destination VM lives on in real use: quit it only once serve has closed
        # every channel of the run (see the end of the test).
        await all_closed.wait()
        await sq.quit()
        await dq.quit()
        assert await src.wait(30 * FACTOR) == 0
        assert await dst.wait(30 * FACTOR) == 0
        # DESIGN.md §7: the files are compared once both QEMUs have exited.
        assert first_difference(src.ram_path, dst.ram_path) is None, f"vm{index} RAM differs"

    async def scenario() -> float:
        async with contextlib.AsyncExitStack() as stack:
            go, all_closed = asyncio.Event(), asyncio.Event()
            ready = [asyncio.ensure_future(one(i, stack, go, all_closed)) for i in range(SESSIONS)]
            # All VMs up and prepared, then every migration starts at once.
            await asyncio.sleep(0)
            started = time.monotonic()
            while not all(  # every destination listens
                (target_dir / f"vm{i}.sock").exists() for i in range(SESSIONS)
            ):
                assert not any(task.done() for task in ready), [t for t in ready if t.done()]
                assert time.monotonic() - started < 60 * FACTOR, "VMs did not start"
                await asyncio.sleep(0.02)
            started = time.monotonic()
            go.set()
            while len(transferred) < SESSIONS:
                assert not any(task.done() and task.exception() for task in ready)
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - started
            await asyncio.to_thread(
                server.wait_for_log, rf"(?s)(channel \S+ closed: .*){{{CHANNELS}}}", 60 * FACTOR
            )
            all_closed.set()
            await asyncio.gather(*ready)
            return elapsed

    with RssSampler(server) as sampler:
        elapsed = run_e2e(scenario())
    bound = CHANNELS * README_CHANNEL_BOUND_BYTES + INTERPRETER_ALLOWANCE_BYTES
    growth = sampler.peak - baseline
    total = sum(transferred)
    print(
        f"\nLOAD: {SESSIONS} sessions ({CHANNELS} channels, multifd 2 on {MULTIFD.count(2)}),"
        f" {total / MIB:.0f} MiB in {elapsed:.2f} s = {total / MIB / elapsed:.0f} MiB/s total;"
        f" serve RSS idle {baseline / MIB:.1f} MiB, peak {sampler.peak / MIB:.1f} MiB"
        f" (+{growth / MIB:.1f} MiB, bound +{bound / MIB:.0f} MiB, {sampler.samples} samples)"
    )
    assert sampler.samples > 10
    assert growth <= bound, f"serve grew by {growth} bytes, bound {bound}"
    # Every channel of every (completed, RAM-identical) migration ended cleanly on the
    # server, so that neither relay reports a failure the operator would act on.
    closed = [line for line in server.log().splitlines() if " closed: " in line]
    assert len(closed) == CHANNELS
    unclean = [line for line in closed if "closed: ended by the " not in line]
    assert not unclean, "completed migrations whose channels serve did not close cleanly:\n" + (
        "\n".join(unclean)
    )
