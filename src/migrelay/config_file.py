"""``--config FILE``: a TOML file that sets any flag of ``serve``, ``connect`` and ``migrate``.

One table per command (``[serve]``, ``[connect]``, ``[migrate]``); keys are the long flag
names, with dashes or underscores::

    [serve]
    listen = "0.0.0.0:8765"
    target-dir = "/run/migrelay"
    token-file = "/etc/migrelay/tokens"
    tls-cert = "/etc/migrelay/cert.pem"
    tls-key = "/etc/migrelay/key.pem"
    max-sessions = 8
    allow-origin = ["https://console.example.com"]
    trusted-proxy = ["127.0.0.1"]

    [connect]
    url = "wss://dst.example.com:8765/vm"
    ca = "/etc/migrelay/ca.pem"

    [migrate]
    token-file = "/root/.migrelay-token"
    ca = "/etc/migrelay/ca.pem"
    multifd = 4

Precedence, highest first: the command line, ``MIGRELAY_*`` environment variables, the
config file, the built-in defaults. Other tables (for commands that do not read the
file) are ignored; an unknown key in the command's own table is an error, so that a
typo never silently leaves a default (such as an open listener) in place.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from migrelay.errors import ConfigError

__all__ = ["ConfigError", "load_section"]


def load_section(path: Path, command: str, known: Collection[str]) -> dict[str, Any]:
    """Read ``[command]`` from the TOML file at ``path``.

    Args:
        path: the config file.
        command: the table to read (``serve``, ``connect``, ``migrate``).
        known: the command's parameter names (underscores).

    Returns:
        Parameter name (underscores) → value, as a default map for the command line.

    Raises:
        ConfigError: the file is unreadable, not TOML, or has an unknown key.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid toml: {exc}") from None
    section = document.get(command, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{command}] must be a table")
    values: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in known or name in ("config", "config_file"):
            raise ConfigError(f"{path}: unknown setting {key!r} in [{command}]")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: setting {key!r} in [{command}] must not be a table")
        values[name] = value
    return values
