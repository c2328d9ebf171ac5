"""Whether a precopy migration converges, and what migrelay does when it does not.

Precopy sends RAM in passes; each pass resends what the guest dirtied during the last
one. QEMU completes once what is left fits in ``downtime-limit`` at the measured rate.
A guest that dirties memory faster than the link carries it never gets there: without
a policy the migration runs for ever (DESIGN.md §8).

`ConvergenceWatch` is fed the source's ``query-migrate`` snapshots and the time, and
answers with `Action` values for `migrelay.control.migration.follow_migration` to carry
out; it does no I/O, so every rule is testable with made-up snapshots.

The rules, in order:

- **Detection.** The size of a pass is what was left right after its dirty-bitmap
  sync (the largest ``remaining`` seen during it). A migration is *not converging* once
  `WINDOW_PASSES` passes after the first have not shrunk that size below
  `SHRINK_FACTOR` of the best one before them. The cause is told as the guest's dirty
  rate against the link's rate (QEMU's ``dirty-pages-rate`` and ``mbps``).
- **Default policy.** Raise ``downtime-limit`` in `DowntimeSteps` (one step per pass
  that still does not converge) up to a ceiling; then, at the deadline, cancel: the
  source runs on and the error names the cause.
- **Opt-in.** ``postcopy``: switch to postcopy as soon as precopy is found not
  converging (or at the deadline); a migration in postcopy can only complete or pause
  for recovery, so the deadline no longer applies. ``on_timeout=pause``: at the
  deadline lift the downtime limit, so that QEMU stops the guest and sends the rest.
  ``auto-converge`` (a capability set at the start) lets QEMU throttle the guest; the
  throttle is shown, the rules above still apply.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from migrelay.control.qmp import MigrationInfo, MigrationStatus
from migrelay.units import MIB, format_bytes, format_duration, format_rate

__all__ = [
    "ASSUMED_LINK_RATE",
    "DEFAULT_MAX_DOWNTIME_MS",
    "DEFAULT_TIMEOUT_FLOOR_S",
    "MAX_DOWNTIME_LIMIT_MS",
    "Action",
    "Cancel",
    "ConvergencePolicy",
    "ConvergenceWatch",
    "DowntimeSteps",
    "OnTimeout",
    "SetDowntime",
    "StartPostcopy",
    "default_timeout",
]

#: Passes after the first in which the dirty set must shrink; fewer would take a pass
#: that merely varies for a stall, more would let a slow link waste minutes.
WINDOW_PASSES = 3

#: A pass shrinks the dirty set when its size is below this share of the best before it.
#: A converging migration's passes shrink by a third or more each; a stalled one's vary
#: by 10-15 % (seen with a guest rewriting a fixed set: 19-23 MiB per pass), which a
#: tighter factor would take for progress, restarting the window.
SHRINK_FACTOR = 0.8

#: The downtime ceiling the default policy raises the limit to: 2 s, what a guest's
#: TCP connections and most applications ride out (Nova's default steps end at 0.5 s
#: for a whole cloud; one operator's migration can afford more).
DEFAULT_MAX_DOWNTIME_MS = 2000

#: Steps from the starting limit to the ceiling.
DEFAULT_DOWNTIME_STEPS = 4

#: QEMU's largest ``downtime-limit`` (2000 s): what ``on_timeout=pause`` sets, so that
#: QEMU stops the guest and sends whatever is left.
MAX_DOWNTIME_LIMIT_MS = 2_000_000

#: The link rate the default deadline assumes when ``--max-bandwidth`` does not say a
#: lower one: 16 MiB/s (134 Mbit/s), a modest WAN link, so that the deadline is
#: generous on the slow links this tool is for; faster links finish well before it.
ASSUMED_LINK_RATE = 16 * MIB

#: Fixed part of the default deadline: set-up, the relays' handshakes, the last pass.
DEFAULT_TIMEOUT_FLOOR_S = 60.0

#: The default deadline allows this many full copies of RAM and disks at the assumed
#: rate: the first pass, and as much again for a guest that keeps writing.
_COPIES_ALLOWED = 2


def default_timeout(
    ram_bytes: int, disk_bytes: int = 0, max_bandwidth: int | None = None
) -> float:
    """The default ``--timeout``: 60 s + 2 copies of RAM and disks at the link's rate.

    The rate is `ASSUMED_LINK_RATE`, or ``max_bandwidth`` when that is lower: 188 s for
    1 GiB of RAM, 316 s with a 1 GiB disk, 35 min for 16 GiB (KubeVirt allows 150 s
    per GiB; Nova 800 s per GiB).
    """
    rate = min(ASSUMED_LINK_RATE, max_bandwidth or ASSUMED_LINK_RATE)
    return DEFAULT_TIMEOUT_FLOOR_S + _COPIES_ALLOWED * (ram_bytes + disk_bytes) / rate


class OnTimeout(enum.StrEnum):
    """What happens when precopy reaches the deadline (``--on-timeout``)."""

    #: Cancel; the source VM runs on as it was (the default).
    CANCEL = "cancel"
    #: Switch to postcopy (needs the ``postcopy`` capability on both sides).
    POSTCOPY = "postcopy"
    #: Lift the downtime limit: QEMU pauses the guest and sends the rest (explicit only:
    #: the pause may be long).
    PAUSE = "pause"


@dataclass(frozen=True, slots=True)
class DowntimeSteps:
    """Downtime limits from ``start_ms`` up to ``ceiling_ms`` in ``steps`` geometric steps.

    ``300 → 482 → 775 → 1245 → 2000`` ms by default: each step lets QEMU finish with
    a dirty set ~1.6× larger than the one before.
    """

    start_ms: int = 300
    ceiling_ms: int = DEFAULT_MAX_DOWNTIME_MS
    steps: int = DEFAULT_DOWNTIME_STEPS

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"downtime steps must be >= 0, got {self.steps}")
        if self.start_ms < 0 or self.ceiling_ms < 0:
            raise ValueError("downtime limits must be >= 0")

    def limits(self) -> list[int]:
        """The limits after the start, in order; none if the ceiling is not above it."""
        if self.steps == 0 or self.ceiling_ms <= self.start_ms:
            return []
        low = max(self.start_ms, 1)
        ratio = self.ceiling_ms / low
        return [round(low * ratio ** (k / self.steps)) for k in range(1, self.steps + 1)]


@dataclass(frozen=True, slots=True)
class ConvergencePolicy:
    """What `ConvergenceWatch` does about a migration that does not converge.

    Attributes:
        timeout_s: the precopy deadline, in seconds from the start of ``migrate``;
            ``None``: `default_timeout` of the VM's sizes (`with_default_timeout`).
        downtime: the steps of the downtime limit.
        postcopy: postcopy may be used: switch to it once precopy stalls, and at the
            deadline.
        on_timeout: what the deadline does (with ``postcopy``, the switch comes first).
    """

    timeout_s: float | None = None
    downtime: DowntimeSteps = DowntimeSteps()
    postcopy: bool = False
    on_timeout: OnTimeout = OnTimeout.CANCEL

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.on_timeout is OnTimeout.POSTCOPY and not self.postcopy:
            raise ValueError("--on-timeout postcopy needs --postcopy on both sides")

    def with_default_timeout(
        self, ram_bytes: int, disk_bytes: int = 0, max_bandwidth: int | None = None
    ) -> ConvergencePolicy:
        """This policy with ``timeout_s`` set: as given, else `default_timeout`."""
        if self.timeout_s is not None:
            return self
        timeout = default_timeout(ram_bytes, disk_bytes, max_bandwidth)
        return dataclasses.replace(self, timeout_s=timeout)

    @property
    def deadline_s(self) -> float:
        """``timeout_s``, which must be set by now."""
        if self.timeout_s is None:
            raise ValueError("the policy's timeout is not resolved (with_default_timeout)")
        return self.timeout_s


@dataclass(frozen=True, slots=True)
class SetDowntime:
    """Set ``downtime-limit`` to ``limit_ms`` (``migrate-set-parameters``)."""

    limit_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartPostcopy:
    """Switch to postcopy (``migrate-start-postcopy``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the migration (``migrate_cancel``); ``reason`` is the operator's one line.

    ``verdict`` is the short phrase for the progress (``not converging``, or ``deadline``
    for a migration that converged too slowly).
    """

    reason: str
    verdict: str = "not converging"


Action = SetDowntime | StartPostcopy | Cancel


class ConvergenceWatch:
    """Follows a migration's passes and applies a `ConvergencePolicy` to them.

    Args:
        policy: what to do.
        started_at: when ``migrate`` started, on the clock ``observe`` is given
            (``time.monotonic()``): the deadline counts from there.
    """

    def __init__(self, policy: ConvergencePolicy, started_at: float) -> None:
        self.policy = policy
        self.deadline = started_at + policy.deadline_s
        #: The largest ``remaining`` seen in each pass, by ``dirty-sync-count``.
        self._pass_sizes: dict[int, int] = {}
        self._steps = policy.downtime.limits()
        #: The downtime limit in force (the start until a step raised it).
        self.downtime_limit_ms = policy.downtime.start_ms
        #: The pass in which the last step was taken (one step per pass).
        self._stepped_in: int | None = None
        self.postcopy_requested = False
        self.deadline_reached = False
        #: ``not converging: …`` once detected, else None.
        self.stall: str | None = None
        self._dirty_rate: float | None = None
        self._link_rate: float | None = None

    # -- reading the snapshots ---------------------------------------------------------

    def _record(self, info: MigrationInfo) -> None:
        passes = info.dirty_sync_count
        if passes is not None and info.remaining is not None:
            self._pass_sizes[passes] = max(self._pass_sizes.get(passes, 0), info.remaining)
        # Zero is no measurement (the last instants of a migration): keep the last one.
        if info.dirty_pages_rate and info.page_size:
            self._dirty_rate = float(info.dirty_pages_rate * info.page_size)
        if info.rate_bytes_per_s:
            self._link_rate = info.rate_bytes_per_s

    def passes_without_shrinking(self, current_pass: int) -> int:
        """How many finished passes after the first have not shrunk the dirty set."""
        best = math.inf
        since = 0
        for number in sorted(p for p in self._pass_sizes if 2 <= p < current_pass):
            size = self._pass_sizes[number]
            if size < best * SHRINK_FACTOR:
                best, since = size, 0
            else:
                since += 1
        return since

    def cause(self) -> str:
        """``the guest dirties 60.0 MiB/s, the link carries 11.9 MiB/s`` (what is known)."""
        dirty = format_rate(self._dirty_rate) if self._dirty_rate is not None else "?"
        link = format_rate(self._link_rate) if self._link_rate is not None else "?"
        text = f"the guest dirties {dirty}, the link carries {link}"
        # The latest *finished* pass: the one under way has not shown its size yet.
        current = max(self._pass_sizes, default=0)
        sizes = [
            size for number, size in sorted(self._pass_sizes.items()) if 2 <= number < current
        ]
        if sizes and self._link_rate:
            last = sizes[-1]
            text += (
                f"; each pass resends ~{format_bytes(last)}, which would pause the guest"
                f" ~{format_duration(last / self._link_rate)}"
            )
        return text

    @property
    def raised(self) -> bool:
        """Whether the downtime limit was raised from where it started."""
        return self.downtime_limit_ms != self.policy.downtime.start_ms

    def describe(self) -> str | None:
        """A short phrase for the progress display, or None while nothing is to say."""
        if self.postcopy_requested:
            return "postcopy"
        if self.stall is not None:
            return "not converging"
        return None

    # -- deciding ----------------------------------------------------------------------

    def observe(self, info: MigrationInfo, now: float) -> list[Action]:
        """Take a snapshot; return what to do now (usually nothing)."""
        if info.status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED):
            self.postcopy_requested = True
            return []
        if info.status is not MigrationStatus.ACTIVE or self.postcopy_requested:
            return []
        self._record(info)
        current = info.dirty_sync_count or 0
        policy = self.policy
        # Re-judged every time: a throttled guest (auto-converge) may start converging
        # again; while stalled, the text follows the latest rates.
        stalled = self.passes_without_shrinking(current) >= WINDOW_PASSES
        self.stall = f"not converging: {self.cause()}" if stalled else None
        if now >= self.deadline:
            return self._at_deadline(info)
        if self.stall is None:
            return []
        if policy.postcopy:
            self.postcopy_requested = True
            return [StartPostcopy(self.stall)]
        if self._steps and self._stepped_in != current:
            self._stepped_in = current
            self.downtime_limit_ms = self._steps.pop(0)
            return [SetDowntime(self.downtime_limit_ms, self.stall)]
        return []

    def _at_deadline(self, info: MigrationInfo) -> list[Action]:
        policy = self.policy
        timeout = format_duration(policy.deadline_s)
        if policy.postcopy:
            self.postcopy_requested = True
            return [StartPostcopy(f"precopy reached the {timeout} deadline (--timeout)")]
        if policy.on_timeout is OnTimeout.PAUSE:
            if self.deadline_reached:
                return []
            self.deadline_reached = True
            self.downtime_limit_ms = MAX_DOWNTIME_LIMIT_MS
            return [
                SetDowntime(
                    MAX_DOWNTIME_LIMIT_MS,
                    f"precopy reached the {timeout} deadline (--timeout): pausing the guest"
                    " to send the rest (--on-timeout pause)",
                )
            ]
        self.deadline_reached = True
        if self.stall is not None:
            why = self.stall
        else:
            sent = format_bytes(info.transferred) if info.transferred is not None else "?"
            why = (
                f"not completed: {sent} sent in pass {info.dirty_sync_count or '?'},"
                f" {format_bytes(info.remaining)} left at"
                f" {format_rate(self._link_rate) if self._link_rate else '?'}"
            )
        return [
            Cancel(
                f"{why}; cancelled at the {timeout} deadline (--timeout);"
                " the source vm runs on as it was",
                "not converging" if self.stall is not None else "deadline",
            )
        ]
