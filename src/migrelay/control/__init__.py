"""Control plane: QEMU's QMP (`qmp`), migration orchestration (`migrate`), test VMs (`vm`).

Only `migrelay.control.qmp` speaks QMP; the CLI and the benchmarks call the functions of
`migrelay.control.migration` and never spell a QMP command themselves.
"""

from __future__ import annotations

from migrelay.control.migration import (
    MigrationOptions,
    MigrationResult,
    Progress,
    cancel,
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
    "cancel",
    "follow_migration",
    "prepare_incoming",
    "require",
    "start_migration",
    "wait_destination_completed",
]
