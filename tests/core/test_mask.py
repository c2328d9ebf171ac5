"""In-place masking: the C speedup and the pure-Python fallback pass the same tests.

Both implementations are checked against a byte-by-byte transcription of RFC 6455 §5.3
("octet i of the transformed data is the XOR of octet i of the original data with octet
at index i modulo 4 of the masking key"), as websockets' ``SpeedupsTests`` does.
"""

from __future__ import annotations

import importlib
import random
from typing import cast

import pytest

from migrelay.core import mask as mask_module
from migrelay.core.mask import MASK_IMPLEMENTATION, MaskFunction, apply_mask_python

KEY = bytes([0x37, 0xFA, 0x21, 0x3D])

# The build must have produced the extension: a missing module fails here rather than
# quietly testing the fallback twice.
_speedups = importlib.import_module("migrelay._speedups")
apply_mask_c = cast(MaskFunction, _speedups.apply_mask)

IMPLEMENTATIONS = {"c": apply_mask_c, "python": apply_mask_python}


def reference_mask(data: bytes, key: bytes, phase: int = 0) -> bytes:
    """Mask ``data`` byte by byte, straight from the RFC's definition."""
    return bytes(byte ^ key[(phase + i) % 4] for i, byte in enumerate(data))


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def apply_mask(request: pytest.FixtureRequest) -> MaskFunction:
    return IMPLEMENTATIONS[cast(str, request.param)]


def test_build_uses_the_c_extension() -> None:
    assert MASK_IMPLEMENTATION == "c"
    assert mask_module.apply_mask is _speedups.apply_mask
    assert mask_module.mask_implementation_warning() is None


class TestApplyMask:
    @pytest.mark.parametrize("phase", range(4))
    def test_every_length_up_to_64_matches_the_rfc_definition(
        self, apply_mask: MaskFunction, phase: int
    ) -> None:
        # 0..64 covers the byte loop alone (< 16), the 8-byte loop with every tail length,
        # and every alignment of the tail against the key.
        for length in range(65):
            original = random_bytes(length, seed=length)
            buffer = bytearray(original)
            next_phase = apply_mask(buffer, KEY, phase)
            assert bytes(buffer) == reference_mask(original, KEY, phase), length
            assert next_phase == (phase + length) % 4

    @pytest.mark.parametrize("length", [65535, 65536, 65537, (1 << 20) + 3])
    @pytest.mark.parametrize("phase", range(4))
    def test_large_buffers_match_the_rfc_definition(
        self, apply_mask: MaskFunction, length: int, phase: int
    ) -> None:
        original = random_bytes(length, seed=length)
        buffer = bytearray(original)
        next_phase = apply_mask(buffer, KEY, phase)
        # Build the expectation with one translate per key byte: the generator-based
        # reference is too slow for a megabyte.
        expected = bytearray(original)
        for offset in range(4):
            key_byte = KEY[(phase + offset) % 4]
            table = bytes(b ^ key_byte for b in range(256))
            expected[offset::4] = expected[offset::4].translate(table)
        assert buffer == expected
        assert next_phase == (phase + length) % 4

    def test_masking_twice_restores_the_data(self, apply_mask: MaskFunction) -> None:
        original = random_bytes(1000)
        buffer = bytearray(original)
        apply_mask(buffer, KEY, 2)
        assert buffer != original
        apply_mask(buffer, KEY, 2)
        assert buffer == original

    def test_phase_defaults_to_zero(self, apply_mask: MaskFunction) -> None:
        buffer = bytearray(random_bytes(37))
        expected = reference_mask(bytes(buffer), KEY, 0)
        assert apply_mask(buffer, KEY) == 1
        assert buffer == expected

    @pytest.mark.parametrize("total", [7, 64, 1000])
    def test_split_calls_continuing_the_phase_equal_one_call(
        self, apply_mask: MaskFunction, total: int
    ) -> None:
        original = random_bytes(total, seed=total)
        whole = bytearray(original)
        apply_mask(whole, KEY, 0)
        rng = random.Random(total)
        for _ in range(50):
            cuts = sorted(rng.sample(range(total + 1), k=min(5, total + 1)))
            pieces = bytearray(original)
            view = memoryview(pieces)
            phase = 0
            for start, stop in zip([0, *cuts], [*cuts, total], strict=True):
                phase = apply_mask(view[start:stop], KEY, phase)
            assert pieces == whole, cuts
            assert phase == total % 4

    def test_every_split_point_of_a_small_payload_equals_one_call(
        self, apply_mask: MaskFunction
    ) -> None:
        original = random_bytes(40)
        whole = bytearray(original)
        apply_mask(whole, KEY, 3)
        for cut in range(41):
            pieces = bytearray(original)
            view = memoryview(pieces)
            phase = apply_mask(view[:cut], KEY, 3)
            apply_mask(view[cut:], KEY, phase)
            assert pieces == whole, cut

    def test_memoryview_slice_masks_only_that_slice(self, apply_mask: MaskFunction) -> None:
        original = random_bytes(200)
        buffer = bytearray(original)
        apply_mask(memoryview(buffer)[13:170], KEY, 1)
        assert buffer[:13] == original[:13]
        assert buffer[13:170] == reference_mask(original[13:170], KEY, 1)
        assert buffer[170:] == original[170:]

    @pytest.mark.parametrize(
        "readonly",
        [b"", b"abcdefgh", memoryview(b""), memoryview(b"0123456789abcdef" * 4)],
        ids=["empty-bytes", "bytes", "empty-view", "view"],
    )
    def test_read_only_buffer_is_refused(
        self, apply_mask: MaskFunction, readonly: bytes | memoryview
    ) -> None:
        with pytest.raises((TypeError, BufferError)):
            apply_mask(readonly, KEY, 0)  # type: ignore[arg-type]  # the point of the test

    def test_read_only_view_of_a_bytearray_is_refused_and_left_alone(
        self, apply_mask: MaskFunction
    ) -> None:
        buffer = bytearray(b"x" * 32)
        with pytest.raises((TypeError, BufferError)):
            apply_mask(memoryview(buffer).toreadonly(), KEY, 0)
        assert buffer == b"x" * 32

    def test_non_contiguous_view_is_refused(self, apply_mask: MaskFunction) -> None:
        buffer = bytearray(32)
        with pytest.raises((TypeError, BufferError)):
            apply_mask(memoryview(buffer)[::2], KEY, 0)
        assert buffer == bytes(32)

    @pytest.mark.parametrize("key", [b"", b"abc", b"abcde", bytes(8)])
    def test_key_of_wrong_length_raises_value_error(
        self, apply_mask: MaskFunction, key: bytes
    ) -> None:
        buffer = bytearray(16)
        with pytest.raises(ValueError, match="mask key must be 4 bytes"):
            apply_mask(buffer, key, 0)
        assert buffer == bytes(16)

    @pytest.mark.parametrize("phase", [-1, 4, 1 << 40])
    def test_phase_outside_0_to_3_raises_value_error(
        self, apply_mask: MaskFunction, phase: int
    ) -> None:
        buffer = bytearray(16)
        with pytest.raises(ValueError, match="phase must be 0-3"):
            apply_mask(buffer, KEY, phase)
        assert buffer == bytes(16)
