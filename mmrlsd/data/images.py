"""Image loading with a pixel budget: any mode (grayscale, RGBA, palette, 16-bit) becomes RGB, and huge images
are downscaled before they reach the processor so they cannot exhaust memory.

Memory: a file larger than `MAX_DECODE_PIXELS` is refused from its header alone (a decompression bomb is never
decoded). Below that, JPEGs are decoded at 1/2..1/8 scale (`draft`), and any other over-budget image is
box-reduced by an integer factor in its own mode (8-bit grayscale stays 1 byte/pixel) before the RGB
conversion, so the only full-size buffer is the decoded file itself (a 12000x12000 grayscale PNG: 144 MB;
converting it to RGB first and resizing after peaked at 720 MB).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from mmrlsd.errors import ImageError

MAX_DECODE_PIXELS = 20_000 * 20_000
"""Larger files are refused before decoding (PIL's decompression-bomb guard warns above this; we refuse)."""
Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
MIN_SIDE = 32
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F")  # modes `Image.reduce` accepts


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


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Decode `path`, refusing bombs from the header and letting JPEGs decode at a reduced scale."""
    # PIL warns above MAX_IMAGE_PIXELS (and raises above twice that); we refuse below, with our own message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)  # reads the header only
    if img.width * img.height > MAX_DECODE_PIXELS:
        raise ImageError(f"{path}: {img.width}x{img.height} exceeds the {MAX_DECODE_PIXELS:,}-pixel limit")
    if img.width * img.height > max_pixels:  # JPEG: DCT scaling by 1/2..1/8 while decoding; no-op for others
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


def load_image(src: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `src` (a path; http(s)/data URLs go through qwen-vl-utils), return RGB within `max_pixels`."""
    s = str(src)
    try:
        if s.startswith(("http://", "https://", "data:image")):
            from qwen_vl_utils import fetch_image

            img = fetch_image({"image": s, "max_pixels": max_pixels})
        else:
            path = Path(s)
            if not path.is_file():
                raise ImageError(f"{s}: image file not found")
            if path.stat().st_size == 0:
                raise ImageError(f"{s}: image file is empty (0 bytes)")
            img = _reduce(_open(path, max_pixels), max_pixels)
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"{s}: unreadable image ({type(e).__name__}: {e})") from None
    img = to_rgb(img)
    if img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.BICUBIC)
    if min(img.size) < MIN_SIDE:  # the Qwen processors need at least one 28/32-px patch per side
        scale = MIN_SIDE / min(img.size)
        img = img.resize((max(MIN_SIDE, round(img.width * scale)), max(MIN_SIDE, round(img.height * scale))))
    return img
