"""A migration through a ``serve`` that a hostile tenant is attacking (issue 11).

One tenant (its own token, its own target, its own address 127.0.0.2) holds 1,000 idle
connections that never send a byte, floods Pings without reading the Pongs, and
streams 6-byte frames (`migrelay.lab.hostile.HostileTenant`). Meanwhile another
tenant's real migration, with its own token, goes through the same ``serve``: it
completes and the RAM arrives intact, and ``serve``'s resident memory stays within
its documented bound (README, "Threat model"): the idle process plus
`Limits.channel_memory_bound` per open channel, `Limits.control_queue_bound` per
channel the attacker floods, and `INTERPRETER_ALLOWANCE_BYTES`.

How much slower the victim is than against a quiet server is a benchmark figure
(``benches/hostile.py``), not an assertion here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from migrelay.lab.hostile import HostileTenant, discarding_socket
from migrelay.limits import Limits
from migrelay.units import MIB
from tests.e2e.cli_helpers import Commands, check_migrated
from tests.e2e.vms import DEFAULT_RAM_BYTES, VMPairFactory
from tests.helpers import FACTOR, wait_until
from tests.loops import AsyncRunner
from tests.processes import INTERPRETER_ALLOWANCE_BYTES, MigrelayProcesses, RssSampler

pytestmark = pytest.mark.e2e

VICTIM_TOKEN = "victim-5f1d0c3a9b"
ATTACKER_TOKEN = "attacker-77e2b4d1"
IDLE_CONNECTIONS = 1000
#: Channels open at once: the victim's one, the attacker's ping flood and tiny frames.
CHANNELS = 3
FLOODED_CHANNELS = 2


def test_a_migration_completes_intact_while_another_tenant_attacks_the_server(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    tokens = sock_dir / "tokens"
    tokens.write_text(
        f"{VICTIM_TOKEN} vm-dst name=victim\n{ATTACKER_TOKEN} attacker name=attacker\n"
    )
    victim_token = sock_dir / "victim-token"
    victim_token.write_text(f"{VICTIM_TOKEN}\n")
    serve = migrelay_procs.serve("--target-dir", str(sock_dir), "--token-file", str(tokens))
    baseline = serve.rss_bytes()

    async def main() -> HostileTenant:
        async with (
            discarding_socket(sock_dir / "attacker.sock"),
            vm_pair(DEFAULT_RAM_BYTES) as (src, dst),
        ):
            incoming = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(sock_dir / "vm-dst.sock")
            )
            assert incoming.popen.returncode == 0, incoming.describe()
            assert serve.port is not None
            tenant = HostileTenant(
                "127.0.0.1", serve.port, "/attacker", ATTACKER_TOKEN, IDLE_CONNECTIONS
            )
            async with tenant:
                counters = tenant.counters
                # The attack is in full swing before the victim starts.
                await wait_until(
                    lambda: (
                        counters.idle_opened >= IDLE_CONNECTIONS
                        and counters.idle_closed_by_server > 0
                        and counters.pings_written > 0
                        and counters.tiny_frames_written > 0
                    ),
                    30 * FACTOR,
                    f"the attack to be under way ({counters})",
                )
                migrate = commands.migrate(
                    src,
                    "--to",
                    f"{serve.url}/{dst.name}",
                    "--token-file",
                    str(victim_token),
                )
                assert await migrate.wait() == 0, migrate.describe()
                assert counters.websockets_opened >= 2, counters
            await check_migrated(src, dst)
        return tenant

    with RssSampler(serve) as sampler:
        tenant = run_e2e(main())
    limits = Limits()
    bound = (
        CHANNELS * limits.channel_memory_bound
        + FLOODED_CHANNELS * limits.control_queue_bound
        + INTERPRETER_ALLOWANCE_BYTES
    )
    growth = sampler.peak - baseline
    counters = tenant.counters
    print(
        f"\nSOAK: {counters.idle_opened} idle connections opened"
        f" ({counters.idle_closed_by_server} closed by serve),"
        f" {counters.pings_written} pings unread, {counters.tiny_frames_written} 6-byte frames;"
        f" serve RSS idle {baseline / MIB:.1f} MiB, peak {sampler.peak / MIB:.1f} MiB"
        f" (+{growth / MIB:.1f} MiB, bound +{bound / MIB:.1f} MiB)"
    )
    assert sampler.samples > 10
    assert growth <= bound, f"serve grew by {growth / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB"
    log = serve.log()
    assert "dropped connection from 127.0.0.2" in log
    victim = [line for line in log.splitlines() if "token victim" in line]
    assert victim, log[-3000:]
