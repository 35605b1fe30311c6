"""Pixel rows per row of an encoding (`mmrlsd.data.encoding.row_pixel_spans` / `row_pixels`): consecutive rows are
one view, rows stored once per group read their group's first row's rows."""

import pytest
import torch

from mmrlsd.data.encoding import row_pixel_spans, row_pixels


def test_plain_rows_are_consecutive_views():
    thw = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])  # 4, 8 and 4 pixel rows
    pixels = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    spans = row_pixel_spans([1, 0, 2], thw)  # row 0: image 0; row 1: none; row 2: images 1 and 2
    assert spans == [(0, 4), (4, 4), (4, 16)]
    view = row_pixels(pixels, spans, 0, 3)
    assert view.data_ptr() == pixels.data_ptr() and torch.equal(view, pixels)
    assert row_pixels(pixels, spans, 1, 2) is None
    assert torch.equal(row_pixels(pixels, spans, 2, 3), pixels[4:])


def test_rows_stored_once_per_group():
    thw = torch.tensor([[1, 2, 2]] * 3 + [[1, 2, 3]] * 3)  # groups of 3 rows: 4 pixel rows each, then 6
    pixels = torch.randn(10, 3)  # each group's first row's rows only
    spans = row_pixel_spans([1] * 6, thw, group=3)
    assert spans == [(0, 4)] * 3 + [(4, 10)] * 3
    assert torch.equal(row_pixels(pixels, spans, 2, 4), torch.cat([pixels[:4], pixels[4:]]))
    assert torch.equal(row_pixels(pixels, spans, 0, 6), torch.cat([pixels[:4]] * 3 + [pixels[4:]] * 3))
    assert row_pixels(pixels, spans, 3, 4).data_ptr() == pixels[4:].data_ptr()  # one row: a view
    with pytest.raises(ValueError, match="row 1 has other images"):
        row_pixel_spans([1, 0, 1], thw[:2], group=3)
