"""``serve --qmp-dir``'s refusals (`migrelay.control.destination.refusal_for`).

A client that may reach one target must learn nothing of the host from a refusal:
every reason is fixed text, and the failure's own text (QEMU's message, a socket path,
a version) is only the refusal's detail, which goes to serve's log.
"""

from __future__ import annotations

import pytest

from migrelay.control.destination import refusal_for
from migrelay.errors import (
    CapabilityMismatchError,
    ConnectError,
    MigrationError,
    StateError,
    UnsupportedError,
)

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
            " source announced; prepare it with the same --multifd and --postcopy as migrate",
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
