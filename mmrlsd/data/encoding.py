"""Prompt encoding: chat-formatted texts and their images through the processor, and the bookkeeping of which
rows own which images and pixel rows.

A processor encoding of N left-padded prompt rows holds `input_ids`, `attention_mask`, `mm_token_type_ids` (1 on
image tokens) and, when any row has an image, `pixel_values` (the patches of all images, row order) and
`image_grid_thw` (one row per image). Rows `b*G .. b*G+G-1` repeat prompt b when the encoding comes from
`repeat_encoding`, which keeps each prompt's pixel rows once: its `pixel_values` hold the rows of each group's
first row only, `PIXEL_GROUP` says so (G), and `image_grid_thw` still lists every row's images. Read a row's pixel
rows through `row_pixel_spans` / `row_pixels` (or `slice_encoding`, which gives a plain encoding).
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np
import torch

IMAGE_MARKER = "<image>"


def user_messages(text: str, n_images: int) -> list[dict]:
    """One user turn. With one ``<image>`` marker per image, each image replaces its marker and the text pieces
    between them are kept exactly (empty pieces dropped); otherwise the images come first, then the text (Qwen's
    convention).

    >>> [c.get("text", "IMG") for c in user_messages("Look:<image>What?", 1)[0]["content"]]
    ['Look:', 'IMG', 'What?']
    >>> [c.get("text", "IMG") for c in user_messages("What?", 2)[0]["content"]]
    ['IMG', 'IMG', 'What?']
    """
    pieces = text.split(IMAGE_MARKER)
    if n_images and len(pieces) - 1 == n_images:
        content = []
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def chat_text(processor, text: str, n_images: int) -> str:
    return processor.apply_chat_template(
        user_messages(text, n_images), add_generation_prompt=True, tokenize=False
    )


def encode(processor, texts: list[str], images: list[list]):
    """Tokenise chat texts with their images, left-padded: a BatchFeature with input_ids, attention_mask,
    mm_token_type_ids and (when any image is present) pixel_values and image_grid_thw."""
    flat = [img for imgs in images for img in imgs]
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=flat or None, return_tensors="pt", padding=True)


def image_offsets(images_per_row: list[int], image_grid_thw: torch.Tensor) -> tuple[list[int], list[int]]:
    """`(img, pix)`: row r owns images img[r] .. img[r+1]-1, image i owns pixel rows pix[i] .. pix[i+1]-1 (each
    list ends with the total)."""
    return [0, *accumulate(images_per_row)], [0, *accumulate(image_grid_thw.prod(dim=1).tolist())]


# the key of a `repeat_encoding` result: its pixel rows are stored once per G rows
PIXEL_GROUP = "pixel_group_size"


def pixel_group(enc) -> int:
    """G when `enc` stores the pixel rows once per group of G rows (`repeat_encoding`), else 1."""
    return int(enc.get(PIXEL_GROUP, 1))


def row_pixel_spans(images_per_row: list[int], image_grid_thw: torch.Tensor, group: int = 1) -> list[tuple]:
    """`(start, stop)` of each row's pixel rows in `pixel_values`: consecutive in row order, or with `group` > 1
    (pixel rows stored once per group, `PIXEL_GROUP`) every row of a group at its first row's."""
    img, pix = image_offsets(images_per_row, image_grid_thw)  # pix: over every row's images
    spans, at = [], 0
    for r in range(len(images_per_row)):
        size = pix[img[r + 1]] - pix[img[r]]
        if r % group == 0:
            first, at = (at, at + size), at + size
        elif size != first[1] - first[0]:
            raise ValueError(f"encoding: row {r} has other images than the first row of its group of {group}")
        spans.append(first)
    return spans


def row_pixels(pixel_values: torch.Tensor, spans: list[tuple], start: int, stop: int) -> torch.Tensor | None:
    """The pixel rows of rows start..stop in row order (`row_pixel_spans`): a view where they are stored
    consecutively, else a copy. None if those rows have no image."""
    merged: list[list[int]] = []
    for a, b in spans[start:stop]:
        if b > a and merged and merged[-1][1] == a:
            merged[-1][1] = b
        elif b > a:
            merged.append([a, b])
    parts = [pixel_values[a:b] for a, b in merged]
    return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)


def rows_images(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, images_per_row: list[int], start: int,
                stop: int, group: int = 1) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """`(pixel rows, image grids)` of rows start..stop, in row order, of an encoding whose pixel rows are stored per
    row (`group` 1) or once per group of `group` rows; `(None, None)` if those rows have no image."""
    pixels = row_pixels(pixel_values, row_pixel_spans(images_per_row, image_grid_thw, group), start, stop)
    if pixels is None:
        return None, None
    img, _ = image_offsets(images_per_row, image_grid_thw)
    return pixels, image_grid_thw[img[start] : img[stop]]


def slice_encoding(enc, start: int, stop: int, images: bool = True) -> dict:
    """Rows start..stop of a left-padded prompt encoding, with their images' pixel rows (a plain encoding: pixel
    rows stored once per group are repeated for the rows here); `images=False`: the tokens only."""
    out = {k: enc[k][start:stop] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in enc}
    if images and enc.get("pixel_values") is not None:
        image_token = enc["mm_token_type_ids"] if "mm_token_type_ids" in enc else None
        pixels, thw = rows_images(enc["pixel_values"], enc["image_grid_thw"], _images_per_row(enc, image_token),
                                  start, stop, pixel_group(enc))  # fmt: skip
        if pixels is not None:
            out["pixel_values"], out["image_grid_thw"] = pixels, thw
    return out


def _images_per_row(enc, mm_types) -> list[int]:
    """Images in each row: count maximal runs of image tokens (each image is one contiguous run)."""
    if mm_types is None:
        raise ValueError("encoding has pixel_values but no mm_token_type_ids")
    is_img = (mm_types == 1).int()  # (N, L)
    starts = is_img[:, 1:] & (1 - is_img[:, :-1])
    return (starts.sum(dim=1) + is_img[:, 0]).tolist()


def images_per_row(enc) -> list[int]:
    if enc.get("pixel_values") is None:
        return [0] * enc["input_ids"].shape[0]
    return _images_per_row(enc, enc["mm_token_type_ids"])


def select_rows(enc, rows: list[int]) -> dict:
    """Rows `rows` (in that order) of a left-padded prompt encoding, with their images' pixel rows."""
    parts = [slice_encoding(enc, r, r + 1) for r in rows]
    keys = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
            if any(k in p for p in parts)]  # fmt: skip
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in keys}


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`torch.equal`, through NumPy for CPU tensors of NumPy's dtypes: the same answer (NaN equals nothing), and on
    a prompt's pixel rows (1.2 MB) about 2.5x faster on one thread."""
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != b.dtype or a.dtype not in _NUMPY_DTYPES:
        return torch.equal(a, b)
    return bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))


def groups_repeat(enc, group_size: int) -> bool:
    """Whether rows b*G .. b*G+G-1 of `enc` are one prompt repeated (tokens, mask, image pixels and grids):
    the structure `repeat_encoding` makes, which shared prefill relies on. Cheap tensor compares."""
    G, n = group_size, enc["input_ids"].shape[0]
    if G <= 1 or n % G:
        return False
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k in enc:
            x = enc[k].view(n // G, G, -1)  # (B, G, L)
            if not torch.equal(x, x[:, :1].expand_as(x)):
                return False
    if enc.get("pixel_values") is None:
        return True
    thw, pixels, per_row = enc["image_grid_thw"], enc["pixel_values"], images_per_row(enc)
    img, _ = image_offsets(per_row, thw)
    try:
        spans = row_pixel_spans(per_row, thw, pixel_group(enc))
    except ValueError:  # rows of a stored group with other images
        return False
    for r in range(n):
        f = r - r % G  # the group's first row
        (a, b), (c, d) = spans[r], spans[f]
        if r != f and not (
            torch.equal(thw[img[r] : img[r + 1]], thw[img[f] : img[f + 1]])
            and ((a, b) == (c, d) or _equal(pixels[a:b], pixels[c:d]))  # one stored copy: equal
        ):
            return False
    return True


def repeat_encoding(enc, group_size: int) -> dict:
    """A processor encoding of B prompts with every row repeated G times (prompt b owns rows b*G .. b*G+G-1): the
    tokens and image grids of the B*G repeated prompts, each prompt tokenised and its images preprocessed once.
    The pixel rows are not copied: `pixel_values` keeps each prompt's once (the input's tensor) and `PIXEL_GROUP`
    is G (`slice_encoding` and `row_pixels` give any rows' pixel rows). At the recipes' pixel budget G copies of
    a batch's pixel rows took gigabytes of host memory; on the CPU perf config the copy took ~15 ms per step."""
    G = group_size
    if pixel_group(enc) != 1:
        raise ValueError("repeat_encoding: the encoding is already repeated")
    out = {
        k: enc[k].repeat_interleave(G, dim=0)
        for k in ("input_ids", "attention_mask", "mm_token_type_ids")
        if k in enc
    }
    if enc.get("pixel_values") is not None:
        img_start, _ = image_offsets(images_per_row(enc), enc["image_grid_thw"])
        thw = []
        for b in range(enc["input_ids"].shape[0]):
            thw += [enc["image_grid_thw"][img_start[b] : img_start[b + 1]]] * G
        out["pixel_values"], out["image_grid_thw"] = enc["pixel_values"], torch.cat(thw)
        out[PIXEL_GROUP] = G
    return out
