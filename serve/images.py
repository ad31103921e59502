"""Untrusted image bytes -> processor views, with the checks a public endpoint needs.

The type is decided by the file's magic bytes, never by a client's Content-Type or file name,
so a renamed executable is a 415 and a PNG labelled ``text/plain`` still works.
"""

from __future__ import annotations

import base64
import binascii
import re

from model.processor import ImageError, ImageProcessor, ProcessedImage
from serve.errors import APIError, bad_request, from_image_error

# (type name, leading magic bytes); WebP (RIFF....WEBP) is checked separately in sniff_image_type.
_SIGNATURES: tuple[tuple[str, bytes], ...] = (
    ("png", b"\x89PNG\r\n\x1a\n"),
    ("jpeg", b"\xff\xd8\xff"),
    ("gif", b"GIF87a"),
    ("gif", b"GIF89a"),
    ("tiff", b"II*\x00"),
    ("tiff", b"MM\x00*"),
    ("bmp", b"BM"),
)
KNOWN_TYPES = ("png", "jpeg", "webp", "bmp", "tiff", "gif")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.DOTALL)


def sniff_image_type(data: bytes) -> str | None:
    """The image format named by the leading magic bytes, or None when it is not a known image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for name, magic in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def decode_base64_image(value: object, field: str = "image_base64") -> bytes:
    """Bytes of a base64 string or a ``data:<mime>;base64,...`` URI (400 when it is neither)."""
    if not isinstance(value, str):
        raise bad_request(f"{field} must be a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        match = _DATA_URI.match(text)
        if match is None:
            raise bad_request(f"{field}: only base64 data URIs (data:<mime>;base64,...) are accepted")
        text = match.group("data")
    text = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{field} is not valid base64 ({exc})") from None


def check_image_bytes(data: bytes, accepted: tuple[str, ...]) -> str:
    """The sniffed type of ``data``; 400 for zero bytes, 415 for anything that is not an accepted image."""
    if not data:
        raise APIError(400, "empty_image", "the image is empty (0 bytes)")
    kind = sniff_image_type(data)
    if kind is None:
        raise APIError(415, "unsupported_media_type",
                       f"the upload is not an image of a supported type ({', '.join(accepted)}); "
                       "the type is read from the file's content, not its name or Content-Type")
    if kind not in accepted:
        raise APIError(415, "unsupported_media_type", f"{kind} images are not accepted here; use one of {', '.join(accepted)}")
    return kind


def preprocess(data: bytes, processor: ImageProcessor, accepted: tuple[str, ...]) -> ProcessedImage:
    """Sniff, decode and cut one image into views; every failure is an :class:`APIError`."""
    check_image_bytes(data, accepted)
    try:
        return processor.process(data)
    except ImageError as exc:
        raise from_image_error(exc) from None


def views_payload(processed: ProcessedImage) -> dict:
    """What travels to the encoder: uint8 numpy arrays (zero-copy through Ray's object store)."""
    return {
        "global_view": processed.global_view,
        "tiles": processed.tiles,
        "crop": tuple(int(v) for v in processed.spatial_crop),
    }
