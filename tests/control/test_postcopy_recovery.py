"""``postcopy-paused`` against a fake QMP server: resume on the source, recover on the target.

The status sequences are those QEMU 7.2 went through in the e2e test (a link cut during
postcopy): the source ``postcopy-active`` → ``postcopy-paused`` (no ``error-desc``) →
``postcopy-recover`` after ``migrate`` with ``resume`` → ``postcopy-active``; a resume that
cannot connect leaves it ``postcopy-paused``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from migrelay.control import commands, destination, migration as migrate_module
from migrelay.control.migration import MigrationOptions, Progress, follow_migration
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.errors import MigrationError, StateError
from tests.control.fake_qmp import FakeQMP, QMPFail, Reply, against, serve
from tests.loops import AsyncRunner

URI = "unix:/tmp/relay.sock"
RESUME = ("migrate", {"uri": URI, "resume": True})


def paused_then(*after: str) -> list[Reply]:
    return [{"status": "postcopy-active"}, {"status": "postcopy-paused"}] + [
        {"status": s, "total-time": 900} for s in after
    ]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every poll that still finds the migration paused makes a new attempt.
    monkeypatch.setattr(migrate_module, "RESUME_RETRY_S", 0.0)


def test_paused_migration_is_resumed_until_active_and_completes(
    run_async: AsyncRunner, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeQMP(
        replies={
            # Seen by the resume loop: paused (attempt 1 fails), paused (attempt 2),
            # recover, active; then the main loop's completed.
            "query-migrate": paused_then(
                "postcopy-paused",
                "postcopy-paused",
                "postcopy-recover",
                "postcopy-active",
                "completed",
            ),
        }
    )
    seen: list[Progress] = []

    async def body(qmp: QMP) -> None:
        result = await follow_migration(qmp, seen.append, interval=0.01, resume_uri=URI)
        assert result.status is MigrationStatus.COMPLETED

    with caplog.at_level(logging.INFO, logger="migrelay"):
        run_async(against(fake, sock_dir, body))
    assert [r for r in fake.received if r[0] == "migrate"] == [RESUME, RESUME]
    assert "migrate_cancel" not in fake.commands
    statuses = [str(p.status) for p in seen]
    assert statuses.count("postcopy-paused") == 3 and "postcopy-recover" in statuses
    # One line tells the operator; progress carries the rest.
    paused = [r.message for r in caplog.records if "postcopy paused" in r.message]
    assert paused == [
        "vm: postcopy paused: the link to the destination failed;"
        " waiting up to 300 s for it to return, then resuming"
    ]
    assert [r.levelno for r in caplog.records if "postcopy paused" in r.message] == [
        logging.WARNING
    ]


def test_paused_migration_without_a_resume_uri_raises_at_once(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-migrate": paused_then("postcopy-paused")})

    async def body(qmp: QMP) -> None:
        with pytest.raises(MigrationError, match=r"^postcopy paused: the link .* failed; "):
            await follow_migration(qmp, interval=0.01)

    run_async(against(fake, sock_dir, body))
    assert "migrate" not in fake.commands and "migrate_cancel" not in fake.commands


def test_link_that_does_not_return_ends_the_wait_with_one_line(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-migrate": paused_then("postcopy-paused")})

    async def body(qmp: QMP) -> None:
        with pytest.raises(MigrationError) as info:
            await follow_migration(qmp, interval=0.01, resume_uri=URI, recover_timeout=0.2)
        assert str(info.value) == (
            "postcopy postcopy-paused: the link to the destination did not return within"
            " 0.2 s; the vm's state is split between both hosts; resume with"
            " migrate --postcopy"
        )

    run_async(against(fake, sock_dir, body))
    assert RESUME in fake.received
    # Never cancelled: the destination already runs on pages the source lacks.
    assert "migrate_cancel" not in fake.commands


def test_stop_while_paused_leaves_it_paused_instead_of_cancelling(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-migrate": paused_then("postcopy-paused")})

    async def body(qmp: QMP) -> None:
        stop = asyncio.Event()

        def on_progress(info: Progress) -> None:
            if info.status is MigrationStatus.POSTCOPY_PAUSED:
                stop.set()

        with pytest.raises(MigrationError, match=r"^interrupted while postcopy was paused"):
            await follow_migration(qmp, on_progress, interval=0.01, resume_uri=URI, stop=stop)

    run_async(against(fake, sock_dir, body))
    assert "migrate_cancel" not in fake.commands and "migrate" not in fake.commands


def test_refused_resume_is_retried(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(
        replies={
            "query-migrate": paused_then(
                "postcopy-paused", "postcopy-paused", "postcopy-active", "completed"
            ),
            "migrate": [QMPFail("Cannot resume if there is no paused migration"), {}],
        }
    )

    async def body(qmp: QMP) -> None:
        await follow_migration(qmp, interval=0.01, resume_uri=URI)

    run_async(against(fake, sock_dir, body))
    assert [r for r in fake.received if r[0] == "migrate"] == [RESUME, RESUME]


# -- the command-level operations ----------------------------------------------------------


def test_migrate_resumes_a_source_found_paused_instead_of_starting(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(
        replies={
            "query-migrate": [
                {"status": "postcopy-paused"},
                {"status": "postcopy-paused"},
                {"status": "postcopy-paused"},
                {"status": "postcopy-active"},
                {"status": "completed", "total-time": 900},
            ]
        }
    )

    async def main() -> None:
        async with serve(fake, sock_dir / "src.qmp") as path:
            result = await commands.migrate(
                path, URI, MigrationOptions(postcopy=True), interval=0.01
            )
            assert result is not None and result.status is MigrationStatus.COMPLETED

    run_async(main())
    # No capabilities (QEMU refuses them mid-migration), no fresh migrate.
    assert "migrate-set-capabilities" not in fake.commands
    assert [r for r in fake.received if r[0] == "migrate"] == [RESUME]


def test_serve_hook_recovers_a_paused_destination(run_async: AsyncRunner, sock_dir: Path) -> None:
    target = sock_dir / "vm.sock"
    fake = FakeQMP(
        replies={
            "query-migrate": [{"status": "postcopy-paused"}, {"status": "postcopy-paused"}],
            "migrate-recover": {},
        }
    )

    async def main() -> None:
        async with serve(fake, sock_dir / "vm.qmp") as path:
            headers = {"migrelay-migration": "multifd=0,postcopy=1"}
            await destination.prepare_target(path, target, headers)

    run_async(main())
    assert ("migrate-recover", {"uri": f"unix:{target}"}) in fake.received
    assert "migrate-incoming" not in fake.commands
    assert "migrate-set-capabilities" not in fake.commands


@pytest.mark.parametrize("state", ["postcopy-active", "postcopy-recover"])
def test_serve_hook_refuses_a_destination_not_yet_paused(
    run_async: AsyncRunner, sock_dir: Path, state: str
) -> None:
    fake = FakeQMP(replies={"query-migrate": {"status": state}})

    async def main() -> None:
        async with serve(fake, sock_dir / "vm.qmp") as path:
            with pytest.raises(MigrationError, match=f"still {state}; not yet paused"):
                await destination.prepare_target(path, sock_dir / "vm.sock", {})

    run_async(main())
    assert fake.commands[-1] == "query-migrate"


def test_incoming_recover_needs_a_paused_migration(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"query-migrate": {"status": "none"}})

    async def main() -> None:
        async with serve(fake, sock_dir / "vm.qmp") as path:
            with pytest.raises(StateError, match="postcopy-paused is required"):
                await commands.incoming(
                    path, "unix:/tmp/d.sock", MigrationOptions(postcopy=True), recover=True
                )

    run_async(main())
    assert "migrate-recover" not in fake.commands
