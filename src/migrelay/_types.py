"""Type aliases shared across layers (never name this module ``typing``)."""

from __future__ import annotations

from typing import TypeAlias

#: Anything that exposes the buffer protocol for reading.
BytesLike: TypeAlias = bytes | bytearray | memoryview
#: A buffer that may be modified in place.
WritableBuffer: TypeAlias = bytearray | memoryview
