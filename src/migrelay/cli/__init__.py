"""The ``migrelay`` command line (typer): `app` holds the commands, `main` runs them.

* `migrelay.cli.app`: the commands, each a list of flags and one call to the layer below;
* `migrelay.cli.options`: options several commands share, and ``--config FILE``;
* `migrelay.cli.running`: logging, signals, errors and exit statuses for all of them.
"""

from __future__ import annotations

from migrelay.cli.app import app, main

__all__ = ["app", "main"]
