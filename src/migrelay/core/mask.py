"""In-place WebSocket masking: the C speedup, or a pure-Python fallback that says so.

RFC 6455 §5.3: "the masked octet ``j`` is octet ``i`` of the original data XOR octet
``i MOD 4`` of the masking key". Every byte a client sends is masked, so at migration
speeds this XOR is the only per-byte work the relay does in Python's process. The C
version (``migrelay._speedups``) runs at memory speed; the fallback converts to one big
integer and back, which is about 20× slower and exists only so the package still works
where no compiler was available.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Final, Protocol

from migrelay._types import WritableBuffer


class MaskFunction(Protocol):
    def __call__(self, data: WritableBuffer, key: bytes, phase: int = 0, /) -> int: ...


def apply_mask_python(data: WritableBuffer, key: bytes, phase: int = 0, /) -> int:
    """XOR ``data`` in place with ``key``, starting at key index ``phase``.

    Args:
        data: a writable, C-contiguous buffer (bytearray or memoryview of one).
        key: the 4-byte masking key.
        phase: index into ``key`` of the key byte for ``data[0]`` (0-3).

    Returns:
        The phase of the byte that would follow ``data``, so that a payload can be
        (un)masked in pieces as it arrives.
    """
    if len(key) != 4:
        raise ValueError(f"mask key must be 4 bytes, not {len(key)}")
    if not 0 <= phase <= 3:
        raise ValueError(f"phase must be 0-3, not {phase}")
    view = memoryview(data).cast("B")
    if view.readonly:
        # Refuse even when empty, as the C version does (it asks for PyBUF_WRITABLE).
        raise TypeError("cannot modify read-only memory")
    length = len(view)
    if length:
        rotated = key[phase:] + key[:phase]
        # One XOR of two big integers beats a Python-level byte loop by two orders of
        # magnitude; the key is repeated to the data's length first.
        repeated = rotated * (length // 4 + 1)
        value = int.from_bytes(view, "little") ^ int.from_bytes(repeated[:length], "little")
        view[:] = value.to_bytes(length, "little")
    return (phase + length) & 3


class ScanFunction(Protocol):
    """``migrelay._speedups.scan_data_frames`` (see FrameParser.receive_frames)."""

    def __call__(
        self,
        data: WritableBuffer,
        position: int,
        remaining: int,
        key: bytes | None,
        phase: int,
        fin: bool,
        message_bytes: int,
        expect_masked: bool,
        max_message_bytes: int,
        max_headers: int,
        /,
    ) -> tuple[int, int, bytes | None, int, bool, int, int, list[tuple[int, int]]]: ...


def _import_native() -> ModuleType | None:
    try:
        # Imported by name: the extension ships no stub, so a plain import fails
        # mypy --strict (import-not-found); the Protocols above are its signatures.
        return importlib.import_module("migrelay._speedups")
    except ImportError:  # pragma: no cover - exercised only where the build had no compiler
        return None


#: ``migrelay._speedups`` (masking, the data-frame fast path, and the I/O layer's
#: ``send_nogil``), None where the build had no compiler; imported once, here.
NATIVE: Final = _import_native()
apply_mask: Final[MaskFunction] = apply_mask_python if NATIVE is None else NATIVE.apply_mask
#: The receiving side's data-frame fast path, None without the C extension (the
#: Python parser then does all of it, as it always does for everything unusual).
scan_data_frames: Final[ScanFunction | None] = None if NATIVE is None else NATIVE.scan_data_frames
#: ``"c"`` when the native extension is in use, ``"python"`` for the fallback.
MASK_IMPLEMENTATION: Final[str] = "python" if NATIVE is None else "c"


def mask_implementation_warning() -> str | None:
    """Return a one-line warning when the slow fallback is in use, else None."""
    if MASK_IMPLEMENTATION == "c":
        return None
    return (
        "migrelay._speedups is not built: masking runs in pure Python "
        f"(about 0.5 GB/s) on {sys.implementation.name}; reinstall with a C compiler"
    )
