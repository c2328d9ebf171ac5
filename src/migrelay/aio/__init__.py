"""The I/O layer: the only code that touches transports, sockets and the event loop."""

from __future__ import annotations
