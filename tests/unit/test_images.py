"""inspection.images: format sniffing, header checks and normalisation to uint8 RGB."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspection.errors import ImageValidationError
from inspection.images import ImageLimits, decode_image, decode_image_info, sniff_format


def _enc(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    ("data", "fmt", "channels", "depth"),
    [
        (_enc(".png", np.full((40, 50), 7, np.uint16) * 257), "png", 1, 16),
        (_enc(".png", np.zeros((40, 50, 4), np.uint8)), "png", 4, 8),
        (_enc(".bmp", np.zeros((40, 50, 3), np.uint8)), "bmp", 3, 8),
        (_enc(".tif", np.zeros((40, 50, 3), np.uint8)), "tiff", 3, 8),
        (_enc(".jpg", np.zeros((40, 50), np.uint8)), "jpeg", 1, 8),
    ],
)
def test_formats_are_normalised_to_rgb8(data, fmt, channels, depth):
    rgb, info = decode_image_info(data)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert (info.format, info.channels, info.bit_depth, info.width, info.height) == (fmt, channels, depth, 50, 40)
    assert sniff_format(data) == fmt


def test_sixteen_bit_keeps_the_top_byte():
    rgb = decode_image(_enc(".png", np.full((40, 40), 200 * 257, np.uint16)))
    assert (rgb == 200).all()


def test_jpeg_with_random_bytes_after_its_header_is_corrupt_not_a_bomb():
    jpg = _enc(".jpg", np.zeros((64, 64), np.uint8))
    rng = np.random.default_rng(1)
    for _ in range(5):
        bad = jpg[:20] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + b"\xff\xd9"
        with pytest.raises(ImageValidationError) as exc:
            decode_image(bad)
        assert exc.value.reason == "corrupt"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a" + bytes(30), "unsupported_format"),
        (_enc(".png", np.zeros((8, 8), np.uint8)), "too_small"),
        (_enc(".png", np.zeros((40, 300), np.uint8)), "too_large"),
        (_enc(".jpg", np.zeros((64, 64), np.uint8))[:-200], "truncated"),
    ],
)
def test_bad_inputs_have_reasons(data, reason):
    with pytest.raises(ImageValidationError) as exc:
        decode_image(data, ImageLimits(max_side=256))
    assert exc.value.reason == reason
