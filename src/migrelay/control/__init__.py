"""Control plane: everything migrelay says to QEMU, over QMP.

* `qmp`: the only module that spells a QMP command or event (typed wrappers over
  ``qemu.qmp``: runstates, ``query-migrate`` snapshots, capabilities, parameters);
* `migration`: the steps of one migration on an open QMP connection (prepare the
  destination, start the source, follow it, cancel, wait for the destination);
* `commands`: what each command does (``incoming``, ``migrate``, ``status``,
  ``cancel``), each on a QMP connection of its own, since a QEMU monitor serves one
  client at a time; ``migrate --to`` runs the source relay in-process here;
* `destination`: ``serve --qmp/--qmp-dir``'s hook that prepares destination QEMU when
  a migration arrives, and the fixed refusal a client gets when it cannot;
* `progress`: renders ``query-migrate`` snapshots as a bar, lines or JSON.

The CLI calls `commands` and `destination`; the lab (`migrelay.lab`) calls `migration`.
"""

from __future__ import annotations

from migrelay.control.migration import (
    MigrationOptions,
    MigrationResult,
    Progress,
    cancel_outgoing,
    follow_migration,
    prepare_incoming,
    require,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationInfo, MigrationStatus, RunState

__all__ = [
    "QMP",
    "MigrationInfo",
    "MigrationOptions",
    "MigrationResult",
    "MigrationStatus",
    "Progress",
    "RunState",
    "cancel_outgoing",
    "follow_migration",
    "prepare_incoming",
    "require",
    "start_migration",
    "wait_destination_completed",
]
