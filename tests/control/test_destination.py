"""``serve --qmp-dir``'s refusals (`migrelay.control.destination.refusal_for`).

A client that may reach one target must learn nothing of the host from a refusal:
every reason is fixed text, and the failure's own text (QEMU's message, a socket path,
a version) is only the refusal's detail, which goes to serve's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from migrelay.control.destination import prepare_hook, refusal_for
from migrelay.errors import (
    CapabilityMismatchError,
    CompatibilityError,
    ConnectError,
    MigrationError,
    Refusal,
    StateError,
    UnsupportedError,
)
from migrelay.units import MIB
from tests.control.fake_qmp import FakeQMP, serve
from tests.loops import AsyncRunner

SECRET = "/srv/tenant-b/vm7.qmp qemu 7.2.19"


@pytest.mark.parametrize(
    ("error", "status", "reason", "retry_after"),
    [
        (
            ValueError(f"Migrelay-Migration names unknown capability {SECRET!r}"),
            400,
            "invalid Migrelay-Migration header",
            None,
        ),
        (
            CapabilityMismatchError(f"listening with {SECRET}", "multifd 2 channels"),
            409,
            "destination vm not ready: it was prepared with other capabilities than the"
            " source announced; prepare it with the same --multifd, --compress and --postcopy"
            " as migrate",
            None,
        ),
        (
            StateError(f"inmigrate, already listening on unix:{SECRET}", "no listener"),
            409,
            "destination vm not ready: it is not waiting for this migration (start it with"
            " -incoming defer, and prepare it once)",
            None,
        ),
        (
            UnsupportedError(f"qemu of {SECRET} cannot migrate with multifd"),
            409,
            "destination qemu cannot: it lacks a capability the source announced",
            None,
        ),
        (
            ConnectError("cannot connect", OSError(SECRET)),
            503,
            "destination qemu not prepared",
            "5",
        ),
        (MigrationError(SECRET), 503, "destination qemu not prepared", "5"),
        (TimeoutError(SECRET), 503, "destination qemu not prepared", "5"),
        (TimeoutError(), 503, "destination qemu not prepared", "5"),
    ],
)
def test_a_refusal_gives_the_peer_fixed_text_and_keeps_the_cause_for_the_log(
    error: Exception, status: int, reason: str, retry_after: str | None
) -> None:
    refusal = refusal_for(error)
    assert (refusal.status, refusal.reason) == (status, reason)
    assert dict(refusal.headers).get("Retry-After") == retry_after
    assert SECRET not in refusal.reason
    assert refusal.detail is not None
    assert SECRET in refusal.detail or not str(error)


# -- Migrelay-Vm: the destination VM must match the source's ------------------------------

#: What ``migrate --to`` announces for a 64 MiB ``-machine pc`` VM with one disk.
SOURCE_VM = "qemu=7.2.22; machine=pc-i440fx-7.2; ram=67108864; devices=disk0:virtio-blk-pci"
#: The queries that gather the destination's facts (`migrelay.control.compat.vm_facts`).
FACT_QUERIES = ["query-version", "qom-get", "query-memory-size-summary", "qom-list"]


def _destination(ram_bytes: int, **replies: object) -> FakeQMP:
    """A destination QEMU 7.2 started with ``-incoming defer``, one disk, ``ram_bytes``."""
    return FakeQMP(
        replies={
            "query-status": {"status": "inmigrate", "running": False},
            "qom-get": "pc-i440fx-7.2-machine",
            "qom-list": [[{"name": "disk0", "type": "child<virtio-blk-pci>"}]],
            "query-memory-size-summary": {"base-memory": ram_bytes},
            **replies,
        }
    )


async def _prepare(fake: FakeQMP, sock_dir: Path, headers: dict[str, str]) -> None:
    """Run serve --qmp-dir's hook for the session ``/vm``, as the server does."""
    hook = prepare_hook(None, sock_dir)
    assert hook is not None
    async with serve(fake, sock_dir / "vm.qmp"):
        await hook("vm", sock_dir / "vm.sock", headers)


def test_a_destination_vm_that_differs_is_refused_before_disks_are_exported_or_it_listens(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = _destination(128 * MIB)
    headers = {
        "migrelay-migration": "multifd=0,postcopy=0",
        "migrelay-storage": "disk0=1073741824",
        "migrelay-vm": SOURCE_VM,
    }
    with pytest.raises(Refusal) as info:
        run_async(_prepare(fake, sock_dir, headers))
    refusal = info.value
    assert (refusal.status, refusal.reason) == (
        409,
        "destination vm does not match the source: ram size differs: source 64 MiB,"
        " destination 128 MiB",
    )
    # Only questions: no export, no capability, no migrate-incoming.
    assert fake.commands == ["query-migrate", *FACT_QUERIES]


def test_a_destination_vm_that_matches_is_prepared(run_async: AsyncRunner, sock_dir: Path) -> None:
    listening = {"socket-address": [{"type": "unix", "path": str(sock_dir / "vm.sock")}]}
    fake = _destination(64 * MIB, **{"query-migrate": [{}, {}, listening]})
    headers = {"migrelay-migration": "multifd=0,postcopy=0", "migrelay-vm": SOURCE_VM}
    run_async(_prepare(fake, sock_dir, headers))
    assert fake.commands[:5] == ["query-migrate", *FACT_QUERIES]
    assert "migrate-incoming" in fake.commands


@pytest.mark.parametrize("prepared", ["already-listening", "postcopy-resume"])
def test_a_destination_already_prepared_is_not_compared_again(
    prepared: str, run_async: AsyncRunner, sock_dir: Path
) -> None:
    if prepared == "already-listening":
        # An operator's `incoming` made it listen: check_prepared_for compares that.
        target = {"type": "unix", "path": str(sock_dir / "vm.sock")}
        current: dict[str, object] = {"socket-address": [target]}
        migration = "multifd=0,postcopy=0"
    else:
        # The source resuming a paused postcopy migration: compared when it started.
        current = {"status": "postcopy-paused"}
        migration = "multifd=0,postcopy=1"
    fake = _destination(128 * MIB, **{"query-migrate": current, "migrate-recover": {}})
    run_async(
        _prepare(fake, sock_dir, {"migrelay-migration": migration, "migrelay-vm": SOURCE_VM})
    )
    assert not set(FACT_QUERIES) & set(fake.commands), fake.commands


@pytest.mark.parametrize(
    "value",
    [
        SOURCE_VM + "; cpu=host",
        SOURCE_VM.replace("67108864", "64M"),
        SOURCE_VM.replace("disk0:", "disk0 "),
        "x" * 5000,
    ],
)
def test_a_malformed_vm_header_is_a_400_before_qemu_is_asked(
    value: str, run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = _destination(64 * MIB)
    with pytest.raises(Refusal) as info:
        run_async(_prepare(fake, sock_dir, {"migrelay-vm": value}))
    assert (info.value.status, info.value.reason) == (400, "invalid Migrelay-Vm header")
    assert info.value.detail is not None and info.value.detail.startswith("Migrelay-Vm ")
    assert fake.commands == []


def test_a_mismatch_names_both_sides_to_the_client_and_in_the_log() -> None:
    # The source announced its own side; the line is what the operator must read.
    error = CompatibilityError(
        "machine type differs: source pc-i440fx-7.2, destination pc-q35-7.2"
    )
    refusal = refusal_for(error)
    assert (refusal.status, refusal.reason) == (
        409,
        "destination vm does not match the source: machine type differs: source"
        " pc-i440fx-7.2, destination pc-q35-7.2",
    )
    assert refusal.detail is None  # the reason already says it all (serve logs it)


@pytest.mark.parametrize(
    ("announced", "command"),
    [
        # Precopy, nothing said: the guest resumes here if it ran at the source
        # (autostart on, whatever -S the destination has; QEMU applies the source's
        # runstate at the end).
        ("multifd=0,postcopy=0", "cont"),
        (None, "cont"),
        # migrate --keep-paused.
        ("multifd=0,postcopy=0,resume=0", "stop"),
        # Postcopy sends no runstate: migrate --to says whether the source ran...
        ("multifd=0,postcopy=1,resume=1", "cont"),
        ("multifd=0,postcopy=1,resume=0", "stop"),
        # ...and without it (a plain connect) this QEMU's own -S decides.
        ("multifd=0,postcopy=1", None),
    ],
)
def test_the_destination_resumes_unless_the_source_says_keep_paused(
    run_async: AsyncRunner, sock_dir: Path, announced: str | None, command: str | None
) -> None:
    listening = {"socket-address": [{"type": "unix", "path": str(sock_dir / "vm.sock")}]}
    fake = _destination(64 * MIB, **{"query-migrate": [{}, {}, listening]})
    headers = {"migrelay-migration": announced} if announced is not None else {}
    run_async(_prepare(fake, sock_dir, headers))
    # Set once it listens, on the inmigrate VM: it changes only QEMU's autostart flag.
    if command is None:
        assert fake.commands[-1] == "query-migrate", fake.commands
        assert "cont" not in fake.commands and "stop" not in fake.commands
    else:
        assert fake.commands[-2:] == ["query-migrate", command], fake.commands
