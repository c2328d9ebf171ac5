"""``python -m migrelay``."""

from __future__ import annotations

from migrelay.cli import main

main()
