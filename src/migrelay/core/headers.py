"""The ``Migrelay-*`` handshake headers (DESIGN.md §3): names, formats and parsers, sans-IO.

One vocabulary for the source relay that sends them, the server that checks them and
the control plane that announces a migration::

    Migrelay-Session: 3f2a9c0d1e4b5a67      (opaque id, chosen by the source relay)
    Migrelay-Channel: 2                      (0, 1, 2 … in the order QEMU connected)
    Migrelay-Migration: multifd=4,postcopy=0

Every parser is strict and raises :class:`ValueError` with a message that is safe to
log; header values come from the network, so they are checked character by character
(``str.isdigit()`` accepts "²", which ``int()`` then refuses with a traceback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: The migration this channel belongs to (the source relay's id for it).
SESSION_HEADER: Final = "Migrelay-Session"
#: The channel's place in QEMU's accept order; the server connects channel N to the
#: destination only after channels 0..N-1 (QEMU tells channels apart by that order).
CHANNEL_HEADER: Final = "Migrelay-Channel"
#: The source's migration capabilities, for a server that prepares the destination.
MIGRATION_HEADER: Final = "Migrelay-Migration"

#: Migrelay-Session values: opaque ids chosen by the source relay.
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Channel numbers run from 0 to MAX_CHANNEL - 1 (QEMU's multifd allows up to 255
#: channels, plus the main channel).
MAX_CHANNEL: Final = 256
#: The most multifd channels QEMU accepts (migration.c, migrate_params_check).
MAX_MULTIFD_CHANNELS: Final = 255
#: The longest Migrelay-Migration value accepted; the real one is about 20 bytes.
MAX_MIGRATION_HEADER_CHARS: Final = 200

# Character classes spelled out: in a str pattern, \d also matches "²" and "٣".
_CHANNEL_RE: Final = re.compile(r"0|[1-9][0-9]*")
_ASCII_DIGITS_RE: Final = re.compile(r"[0-9]+")


def channel_headers(session_id: str, channel: int) -> list[tuple[str, str]]:
    """The headers the source relay sends to open channel ``channel`` of a session.

    Not checked here: a channel number the server does not accept (``MAX_CHANNEL`` and
    above, or above its ``--max-channels``) is its refusal to give, as a 400 or 429 the
    source relay logs like any other refusal.
    """
    return [(SESSION_HEADER, session_id), (CHANNEL_HEADER, str(channel))]


def parse_session_id(value: str) -> str:
    """Check a ``Migrelay-Session`` value (1-64 of ``A-Z a-z 0-9 _ -``); return it.

    Raises:
        ValueError: anything else.
    """
    if SESSION_ID_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {SESSION_HEADER}")
    return value


def parse_channel(value: str) -> int:
    """Parse a ``Migrelay-Channel`` value: a channel number, 0 to ``MAX_CHANNEL - 1``.

    Strict: ASCII digits only, no sign, no spaces, no leading zeros (one number has one
    spelling), so a value the server accepts is exactly what :func:`channel_headers`
    sends.

    Raises:
        ValueError: anything else.
    """
    # The length check comes first: int() of a 10 000-digit string is slow, then refused.
    if len(value) > len(str(MAX_CHANNEL)) or _CHANNEL_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {CHANNEL_HEADER}")
    number = int(value)
    if number >= MAX_CHANNEL:
        raise ValueError(f"invalid {CHANNEL_HEADER}")
    return number


@dataclass(frozen=True, slots=True)
class MigrationAnnouncement:
    """What a ``Migrelay-Migration`` header announces.

    Attributes:
        multifd_channels: multifd with this many channels; ``None`` when multifd is off
            (``multifd=0``).
        postcopy: whether the source may switch to postcopy.
    """

    multifd_channels: int | None = None
    postcopy: bool = False

    def __post_init__(self) -> None:
        # The range is QEMU's: a header outside it would only fail once QEMU is asked.
        channels = self.multifd_channels
        if channels is not None and not 1 <= channels <= MAX_MULTIFD_CHANNELS:
            raise ValueError(f"multifd channels must be 1..{MAX_MULTIFD_CHANNELS}, got {channels}")


def format_migration_header(multifd_channels: int | None, postcopy: bool) -> str:
    """The ``Migrelay-Migration`` value: ``multifd=4,postcopy=0``; both keys always.

    ``multifd_channels`` None or 0 means multifd off (``multifd=0``).

    Raises:
        ValueError: ``multifd_channels`` is outside 0..255.
    """
    announced = MigrationAnnouncement(multifd_channels or None, postcopy)
    return f"multifd={announced.multifd_channels or 0},postcopy={int(announced.postcopy)}"


def parse_migration_header(value: str | None) -> MigrationAnnouncement:
    """Parse a ``Migrelay-Migration`` value; ``None`` (no header) gives the defaults.

    Spaces around items, keys and numbers are accepted (``" multifd = 2 , postcopy=1 "``);
    numbers are ASCII digits. An unknown key is refused rather than ignored: a
    capability the destination did not set makes QEMU hang or fail mid-migration, long
    after the handshake.

    Raises:
        ValueError: the value is malformed, or names a key or value this version does
            not know; the message says which.
    """
    if value is None:
        return MigrationAnnouncement()
    if len(value) > MAX_MIGRATION_HEADER_CHARS:
        raise ValueError(f"{MIGRATION_HEADER} longer than {MAX_MIGRATION_HEADER_CHARS} characters")
    multifd: int | None = None
    postcopy = False
    for item in value.split(","):
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or _ASCII_DIGITS_RE.fullmatch(text) is None:
            raise ValueError(f"{MIGRATION_HEADER} item {item.strip()!r} is not key=number")
        number = int(text)
        if key == "multifd":
            multifd = number or None
        elif key == "postcopy" and number in (0, 1):
            postcopy = bool(number)
        elif key == "postcopy":
            raise ValueError(f"{MIGRATION_HEADER} postcopy must be 0 or 1, not {number}")
        else:
            raise ValueError(f"{MIGRATION_HEADER} names unknown capability {key!r}")
    return MigrationAnnouncement(multifd_channels=multifd, postcopy=postcopy)
