"""Safe decoding and validation of camera images, shared by ingest and the runner (no torch).

Every image that enters the system passes `decode_image`: it either returns a uint8 (H, W, 3) RGB array or
raises `ImageValidationError` with a short reason code, so a bad file is quarantined or held, never passed.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from inspection.errors import ImageValidationError

logger = logging.getLogger(__name__)

# OpenCV refuses larger images itself, but only after allocating; we check the header first.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 32  # smaller than this cannot show a casting defect
    max_side: int = 8192  # bigger than any line camera we support
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked on the header before decoding
    max_bytes: int = 50_000_000  # refuse absurd uploads before touching them


# reason codes (stable: they appear in the manifest and in the runner's 4xx answers)
REASONS = (
    "empty",
    "too_large_file",
    "unsupported_format",
    "corrupt",
    "truncated",
    "too_small",
    "too_large",
    "decompression_bomb",
    "bad_channels",
    "bad_depth",
)

FORMATS = ("jpeg", "png", "bmp", "tiff")


def sniff_format(data: bytes) -> str | None:
    """Format from the magic bytes (never from the file name)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the header without decoding, or None if the header does not say."""
    try:
        if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if fmt == "bmp" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "jpeg":
            i = 2
            n = len(data)
            while i + 9 < n:
                if data[i] != 0xFF:
                    # segments follow each other directly: anything else means the header is damaged, and
                    # reading on would take random bytes for a frame size
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte before a marker
                    i += 1
                    continue
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    i += 2
                    continue
                if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
                    return None
                seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + seg_len
    except struct.error:
        return None
    return None


def _jpeg_is_truncated(data: bytes) -> bool:
    # libjpeg pads a truncated stream with grey and only warns; the end-of-image marker tells us.
    return not data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _png_is_truncated(data: bytes) -> bool:
    return b"IEND" not in data[-32:]


@dataclass(frozen=True)
class ImageInfo:
    """What the file held before normalisation (recorded in the manifest)."""

    format: str  # jpeg, png, bmp or tiff, from the magic bytes
    width: int
    height: int
    channels: int  # 1 grey, 3 colour, 4 with alpha
    bit_depth: int  # bits per channel: 8 or 16 (32 for float TIFF)


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode bytes to a uint8 (H, W, 3) RGB array, or raise ImageValidationError(reason, message).

    8- and 16-bit depth, grey, RGB and RGBA are normalised; alpha is dropped (composited on black), 16-bit
    scaled to 8-bit.
    """
    return decode_image_info(data, limits)[0]


def decode_image_info(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[np.ndarray, ImageInfo]:
    """Like `decode_image`, and also say what the file held (format, size, channels, bit depth)."""
    if not data:
        raise ImageValidationError("empty", "the file or body is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageValidationError("too_large_file", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:8].hex()
        raise ImageValidationError(
            "unsupported_format", f"content is not JPEG, PNG, BMP or TIFF (first bytes {head}); allowed: {FORMATS}"
        )
    size = _header_size(data, fmt)
    if size is not None:
        _check_size(*size, limits)
    if fmt == "jpeg" and _jpeg_is_truncated(data):
        raise ImageValidationError("truncated", "JPEG data ends before its end-of-image marker")
    if fmt == "png" and _png_is_truncated(data):
        raise ImageValidationError("truncated", "PNG data ends before its IEND chunk")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageValidationError("corrupt", f"{fmt.upper()} data could not be decoded: {exc}") from None
    if img is None or img.size == 0:
        raise ImageValidationError("corrupt", f"{fmt.upper()} data could not be decoded")
    _check_size(img.shape[1], img.shape[0], limits)
    channels = 1 if img.ndim == 2 else img.shape[2]
    info = ImageInfo(fmt, img.shape[1], img.shape[0], channels, img.dtype.itemsize * 8)
    return _to_rgb8(img), info


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageValidationError("too_small", f"image is {width}x{height}; zero dimensions are not an image")
    if width * height > limits.max_pixels:
        raise ImageValidationError(
            "decompression_bomb", f"image claims {width}x{height} = {width * height} pixels; limit {limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise ImageValidationError(
            "too_large", f"image is {width}x{height}; the longest side allowed is {limits.max_side}"
        )
    if min(width, height) < limits.min_side:
        raise ImageValidationError(
            "too_small", f"image is {width}x{height}; the shortest side must be ≥ {limits.min_side}"
        )


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # keep the top byte: exact for 8-bit data stored as 16-bit
    elif img.dtype == np.float32:
        img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageValidationError("bad_depth", f"pixel type {img.dtype} is not supported; allowed: 8- or 16-bit")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim != 3:
        raise ImageValidationError("bad_channels", f"image has shape {img.shape}; expected (H, W) or (H, W, C)")
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        alpha = img[:, :, 3:4].astype(np.uint16)
        rgb = (img[:, :, :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
        return cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB)
    raise ImageValidationError("bad_channels", f"image has {channels} channels; allowed: 1 (grey), 3 (RGB), 4 (RGBA)")


def read_image(path, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Read and decode a file with the same rules as `decode_image`."""
    with open(path, "rb") as fh:
        data = fh.read(limits.max_bytes + 1)
    return decode_image(data, limits)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()
