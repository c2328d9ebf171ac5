"""migrelay: live-migrate QEMU virtual machines between hosts over WebSocket."""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger("migrelay").addHandler(logging.NullHandler())
