"""How every command ends (`migrelay.cli.running.run_command`): status, one line, JSON.

The commands themselves run as subprocesses in the integration and e2e tests; this
table pins the wrapper they all share, so that no command grows its own error printer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator

import pytest
import typer

from migrelay.cli.running import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    configure_logging,
    run_command,
)
from migrelay.errors import ConfigError, ConnectError, MigrationError
from tests.helpers import FACTOR

Body = Callable[[asyncio.Event], Awaitable[int]]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("migrelay")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


def _returns(code: int) -> Body:
    async def body(stop: asyncio.Event) -> int:
        return code

    return body


def _raises(error: BaseException) -> Body:
    async def body(stop: asyncio.Event) -> int:
        raise error

    return body


def _exit_code(body: Body, on_error: Callable[[str], object] | None = None) -> int:
    with pytest.raises(typer.Exit) as ended:
        run_command(body, loop="asyncio", on_error=on_error)
    return ended.value.exit_code


@pytest.mark.parametrize(
    ("body", "code", "stderr"),
    [
        (_returns(EXIT_OK), EXIT_OK, ""),
        (_returns(EXIT_INTERRUPTED), EXIT_INTERRUPTED, ""),
        (_raises(ConfigError("--tls-cert and --tls-key go together")), EXIT_FAILURE,
         "migrelay: error: --tls-cert and --tls-key go together\n"),
        (_raises(ConnectError("cannot connect to vm", OSError("gone\nfor good"))), EXIT_FAILURE,
         "migrelay: error: cannot connect to vm: gone for good\n"),
        (_raises(MigrationError("Unable to write to socket: Broken pipe")), EXIT_FAILURE,
         "migrelay: error: Unable to write to socket: Broken pipe\n"),
        (_raises(TimeoutError()), EXIT_FAILURE, "migrelay: error: TimeoutError\n"),
        (_raises(FileNotFoundError(2, "No such file")), EXIT_FAILURE,
         "migrelay: error: [Errno 2] No such file\n"),
        (_raises(KeyboardInterrupt()), EXIT_INTERRUPTED, ""),
    ],
)  # fmt: skip
def test_every_command_ends_with_its_status_and_at_most_one_line(
    body: Body, code: int, stderr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(0, "text")
    assert _exit_code(body) == code
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", stderr)


def test_an_unexpected_exception_is_a_bug_and_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        run_command(_raises(ZeroDivisionError("bug")), loop="asyncio")


def test_under_json_logs_the_error_line_is_a_json_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(0, "json")
    assert _exit_code(_raises(ConfigError("refusing to listen"))) == EXIT_FAILURE
    record = json.loads(capsys.readouterr().err)
    assert record["level"] == "error" and record["message"] == "refusing to listen"


def test_the_error_is_also_handed_to_on_error() -> None:
    told: list[str] = []
    assert _exit_code(_raises(ConfigError("no")), on_error=told.append) == EXIT_FAILURE
    assert told == ["no"]


def test_sigterm_sets_the_stop_event_instead_of_killing_the_command() -> None:
    async def body(stop: asyncio.Event) -> int:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5 * FACTOR)
        return EXIT_INTERRUPTED

    assert _exit_code(body) == EXIT_INTERRUPTED
