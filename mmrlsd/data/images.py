"""Image loading with a pixel budget: any mode (grayscale, RGBA, palette, 16-bit) becomes RGB, and huge images
are downscaled before they reach the processor so they cannot exhaust memory.

An image can be a file path, encoded bytes (the `{"bytes": ..., "path": None}` structs that parquet files
written by `datasets` hold), a PIL image (what `datasets` hands over for an Image feature), a `data:image/...`
URL or, when the caller passes a `RemotePolicy`, an `http(s)` URL. Every kind goes through the same checks:

- a picture larger than `MAX_DECODE_PIXELS` is refused from its header alone (a decompression bomb is never
  decoded);
- below that, JPEGs are decoded at 1/2..1/8 scale (`draft`), and any other over-budget image is box-reduced by
  an integer factor in its own mode (8-bit grayscale stays 1 byte/pixel) before the RGB conversion, so the only
  full-size buffer is the decoded file itself (a 12000x12000 grayscale PNG: 144 MB; converting it to RGB first
  and resizing after peaked at 720 MB);
- an aspect ratio above `MAX_ASPECT_RATIO` (the Qwen-VL processors refuse 200:1 and beyond) is a bad image;
- the result is RGB, within the pixel budget, at least `MIN_SIDE` px per side.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, ImageOps

from mmrlsd.errors import ImageError

if TYPE_CHECKING:
    from mmrlsd.data.remote import RemotePolicy

MAX_DECODE_PIXELS = 20_000 * 20_000
"""Larger files are refused before decoding (PIL's decompression-bomb guard warns above this; we refuse)."""
Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
MIN_SIDE = 32
MAX_ASPECT_RATIO = 200
"""Longer side / shorter side above this is refused, before decoding and again after resizing (rounding can
stretch a ratio): the Qwen-VL processors raise beyond 200:1."""
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F")  # modes `Image.reduce` accepts
URL_PREFIXES = ("http://", "https://")


def is_url(src: object) -> bool:
    return isinstance(src, str) and src.lower().startswith(URL_PREFIXES)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")  # 16-bit/float -> 8-bit
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def _check_aspect(w: int, h: int, name: str, when: str = "") -> None:
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{name}: image aspect ratio beyond the vision processor's {MAX_ASPECT_RATIO}:1 ({w}x{h}{when})"
        )


def _check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w * h > MAX_DECODE_PIXELS:
        raise ImageError(f"{name}: {w}x{h} exceeds the {MAX_DECODE_PIXELS:,}-pixel limit")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    _check_aspect(w, h, name)


def _open(fp, name: str, max_pixels: int) -> Image.Image:
    """Decode `fp` (a path or a binary file object), refusing bombs from the header and letting JPEGs decode at
    a reduced scale."""
    # PIL warns above MAX_IMAGE_PIXELS (and raises above twice that); we refuse below, with our own message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)  # reads the header only
        except Image.DecompressionBombError as e:  # above twice the limit PIL refuses in `open`
            raise ImageError(f"{name}: exceeds the {MAX_DECODE_PIXELS:,}-pixel limit ({e})") from None
    return _decode(img, name, max_pixels)


def _decode(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    _check_size(img, name)
    if isinstance(img, ImageFile.ImageFile) and img.tile:  # not decoded yet (a lazy `datasets` image too)
        # JPEG: DCT scaling by 1/2..1/8 while decoding; no-op for others
        if img.width * img.height > max_pixels:
            s = math.sqrt(max_pixels / (img.width * img.height))
            img.draft(img.mode, (math.ceil(img.width * s), math.ceil(img.height * s)))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # not a copy: the default copies even an upright image
    return img


def _reduce(img: Image.Image, max_pixels: int) -> Image.Image:
    """Integer-factor box reduction in the image's own mode, never below `max_pixels` (a resize follows)."""
    k = math.isqrt(img.width * img.height // max_pixels) if max_pixels > 0 else 1
    if k < 2:
        return img
    if img.mode in _REDUCIBLE:
        return img.reduce(k)
    return img.resize((max(1, img.width // k), max(1, img.height // k)), Image.NEAREST)  # P, 1, I;16


def _data_url_bytes(s: str, name: str) -> bytes:
    head, sep, payload = s.partition(",")
    if not sep or ";base64" not in head:
        raise ImageError(f"{name}: a data URL image must be base64-encoded (data:image/...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: data URL is not valid base64 ({e})") from None


def _describe(src: object) -> str:
    if isinstance(src, (str, Path)):
        s = str(src)
        return s[:60] + "..." if s.startswith("data:") and len(s) > 60 else s
    return f"<{type(src).__name__} image>"


def load_image(
    src, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str | None = None, remote: RemotePolicy | None = None
) -> Image.Image:
    """Open `src` and return it as RGB within `max_pixels`.

    `src`: a path, encoded bytes, a `{"bytes": ..., "path": ...}` struct, a PIL image, a `data:image/...;base64`
    URL, or an `http(s)` URL (fetched only under `remote`, a `RemotePolicy`; refused otherwise). `name` labels
    the image in error messages (default: the path). Raises `ImageError` for anything unusable.
    """
    name = name or _describe(src)
    try:
        if isinstance(src, dict):  # a `datasets` Image struct: bytes win over the path they were read from
            src = src.get("bytes") or src.get("path") or ""
            if not src:
                raise ImageError(f"{name}: image entry has neither bytes nor a path")
        if isinstance(src, Image.Image):
            img = _decode(src, name, max_pixels)
        elif isinstance(src, (bytes, bytearray, memoryview)):
            if not len(src):
                raise ImageError(f"{name}: image bytes are empty")
            img = _open(io.BytesIO(bytes(src)), name, max_pixels)
        elif isinstance(src, str) and src.startswith("data:"):
            img = _open(io.BytesIO(_data_url_bytes(src, name)), name, max_pixels)
        elif is_url(src):
            if remote is None:
                raise ImageError(f"{name}: remote images are off (set data.allow_remote_images: true)")
            img = _open(io.BytesIO(remote.fetch(str(src))), name, max_pixels)
        else:
            path = Path(src)
            if not path.is_file():
                raise ImageError(f"{name}: image file not found")
            if path.stat().st_size == 0:
                raise ImageError(f"{name}: image file is empty (0 bytes)")
            img = _open(path, name, max_pixels)
        img = _reduce(img, max_pixels)
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None
    img = to_rgb(img)
    if img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.BICUBIC)
    if min(img.size) < MIN_SIDE:  # the Qwen processors need at least one 28/32-px patch per side
        scale = MIN_SIDE / min(img.size)
        img = img.resize((max(MIN_SIDE, round(img.width * scale)), max(MIN_SIDE, round(img.height * scale))))
    _check_aspect(img.width, img.height, name, " after resizing")
    return img
