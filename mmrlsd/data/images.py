"""Image loading with a pixel budget: any mode (grayscale, RGBA, palette, 16-bit) becomes RGB, and huge images
are downscaled before they reach the processor so they cannot exhaust memory."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageOps

from mmrlsd.errors import ImageError

# Refuse absurd files outright (PIL's decompression-bomb guard); below this we downscale to the budget.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
MIN_SIDE = 32


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
            img = Image.open(path)
            if img.width * img.height > max_pixels:
                img.draft("RGB", (img.width // 2, img.height // 2))  # cheap JPEG downscale while decoding
            img.load()
            img = ImageOps.exif_transpose(img)
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
