"""How every command runs: logging, signals, errors, exit statuses, in one place.

`run_command` runs a command's coroutine on the event loop with a ``stop`` event that
SIGINT and SIGTERM set (instead of a KeyboardInterrupt in the middle of a QMP exchange),
turns every expected failure into one line on stderr (`report_error`) and exits with
the documented status. `configure_logging` is the only place that sets up handlers
(STYLE.md §7); the library only names its loggers after its modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import typer

from migrelay.aio import runner
from migrelay.aio.source import EXIT_INTERRUPTED
from migrelay.core.mask import mask_implementation_warning
from migrelay.errors import RelayError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "configure_logging",
    "exit_with",
    "report_error",
    "run_command",
]

#: The command did what it was asked.
EXIT_OK: Final = 0
#: It failed; one line on stderr says why.
EXIT_FAILURE: Final = 1
#: The command line or the config file was wrong (click's own status for usage errors).
EXIT_USAGE: Final = 2

#: The package's root logger: every module's logger (``__name__``) is below it.
ROOT_LOGGER: Final = "migrelay"


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object a line, for journald or a log shipper."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging(verbose: int, log_format: str, *, quiet: bool = False) -> None:
    """Send migrelay's log to stderr: INFO by default, DEBUG with ``-v``.

    Args:
        verbose: how many ``-v`` were given.
        log_format: ``text`` or ``json``.
        quiet: the command prints its own results (the QMP commands): its log says
            only what went wrong unless asked, ``-v`` for the steps and ``-vv`` for
            every QMP message.
    """
    if quiet:
        verbose = max(verbose - 1, 0)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger(ROOT_LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    warning = mask_implementation_warning()
    if warning:
        root.warning("%s", warning)
    if quiet and verbose == 0:
        root.setLevel(logging.WARNING)


def report_error(message: str) -> None:
    """Say ``message`` as one line on stderr: ``migrelay: error: ...``.

    Under ``--log-format json`` the line is a JSON record like the log's, so that a
    service's refusal to start reaches the same log pipeline in the same form.
    """
    root = logging.getLogger(ROOT_LOGGER)
    if any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers):
        root.error("%s", message)  # through the log's own formatter
    else:
        typer.echo(f"migrelay: error: {message}", err=True)


def exit_with(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Report ``message`` (`report_error`) and end the command with ``code``."""
    report_error(message)
    raise typer.Exit(code)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT and SIGTERM set, on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def run_command(
    main: Callable[[asyncio.Event], Awaitable[int]],
    *,
    loop: runner.LoopName = "auto",
    on_error: Callable[[str], object] | None = None,
) -> NoReturn:
    """Run ``main(stop)`` on the event loop and exit with the status it returns.

    Args:
        main: the command's body; ``stop`` is set on SIGINT or SIGTERM.
        loop: ``auto`` (uvloop when installed), ``asyncio`` or ``uvloop``.
        on_error: also told every failure's text (``--json`` ends its document with it).

    Every expected failure (`RelayError`, a timeout, an OS error) becomes one line on
    stderr and exit status 1; a KeyboardInterrupt before the handlers were installed
    is `EXIT_INTERRUPTED`. Anything else is a bug and keeps its traceback.
    """

    async def with_signals() -> int:
        return await main(stop_on_signals())

    try:
        code = runner.run(with_signals(), loop)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except (RelayError, TimeoutError, OSError) as exc:
        text = str(exc) or type(exc).__name__
        if on_error is not None:
            on_error(text)
        exit_with(text)
    raise typer.Exit(code)
