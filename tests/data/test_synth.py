"""Tests for mmrlsd/data/synth.py: answers re-derived from the pixels, determinism, schema, splits, CLI.

The decoders below read the drawn images back (colour and area of each grid cell, the lit segments of
each seven-segment digit, the height of each bar) and never look at the generator's variables, so a
wrong answer, a swapped label or a mis-drawn glyph fails here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrlsd.data import synth

WHITE = (255, 255, 255)
GREY = (210, 210, 210)
RGB_TO_COLOR = {rgb: name for name, rgb in synth.PALETTE.items()}
CELL = 14  # px per grid cell = Qwen2-VL patch size
# Filled area of each shape in its 10x10 box (cell 14 px, 2 px margin), counted row by row:
# square   10 rows of 10                          = 100
# circle   4+6+8+10+10+10+10+8+6+4                = 76
# triangle 2+2+4+4+6+6+8+8+10+10                  = 60
AREA_TO_SHAPE = {100: "square", 76: "circle", 60: "triangle"}
# Seven-segment: one probe pixel in the middle of each segment of a 28x56 digit box, and the
# standard encoding (bit 0 = a ... bit 6 = g) of the digits 0-9.
PROBES = {
    "a": (13, 7),
    "b": (19, 17),
    "c": (19, 37),
    "d": (13, 47),
    "e": (7, 37),
    "f": (7, 17),
    "g": (13, 27),
}
SEVEN_SEG = [0x3F, 0x06, 0x5B, 0x4F, 0x66, 0x6D, 0x7D, 0x07, 0x7F, 0x6F]
PATTERN_TO_DIGIT = {
    frozenset(s for bit, s in enumerate("abcdefg") if code >> bit & 1): d for d, code in enumerate(SEVEN_SEG)
}
BAR_UNIT_PX = 6  # px per unit of bar height


# --- decoders: image -> content ---


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)  # (H, W, 3)


def ink_colours(px: np.ndarray) -> dict[tuple[int, int, int], int]:
    """Pixel count per non-white colour of a (..., 3) uint8 array."""
    codes = (px[..., 0].astype(np.int64) << 16 | px[..., 1].astype(np.int64) << 8 | px[..., 2]).ravel()
    values, counts = np.unique(codes, return_counts=True)
    found = {(int(v) >> 16, int(v) >> 8 & 255, int(v) & 255): int(n) for v, n in zip(values, counts)}
    found.pop(WHITE, None)
    return found


def decode_cells(img: Image.Image) -> list[tuple[str, str]]:
    """(shape, colour) of every non-empty 14x14 cell; each cell holds one flat-coloured shape in its interior."""
    arr = pixels(img)
    h, w, _ = arr.shape
    assert h % 28 == 0 and w % 28 == 0
    found = []
    for y0 in range(0, h, CELL):
        for x0 in range(0, w, CELL):
            colours = ink_colours(arr[y0 : y0 + CELL, x0 : x0 + CELL])
            if not colours:
                continue
            assert len(colours) == 1, f"cell at ({x0},{y0}) mixes colours {colours}"
            ((rgb, area),) = colours.items()
            border = np.ones((CELL, CELL), bool)
            border[2:-2, 2:-2] = False
            assert (arr[y0 : y0 + CELL, x0 : x0 + CELL][border] == 255).all(), (
                "shape leaks into the cell margin"
            )
            found.append((AREA_TO_SHAPE[area], RGB_TO_COLOR[rgb]))
    return found


def decode_digits(img: Image.Image) -> list[int]:
    """Digits left to right, one per 28x56 box, read from the lit segment probes."""
    arr = pixels(img)
    assert arr.shape[0] == 56 and arr.shape[1] % 28 == 0
    digits = []
    for x0 in range(0, arr.shape[1], 28):
        inks = set(ink_colours(arr[:, x0 : x0 + 28]))
        assert len(inks) == 1 and inks <= set(RGB_TO_COLOR), inks  # one palette colour per digit
        lit = frozenset(s for s, (x, y) in PROBES.items() if tuple(arr[y, x0 + x]) != WHITE)
        digits.append(PATTERN_TO_DIGIT[lit])
    return digits


def decode_bars(img: Image.Image) -> list[tuple[str, int]]:
    """(colour, value) of each bar left to right, from the centre pixel column of each 14 px slot."""
    arr = pixels(img)
    assert arr.shape == (56, 56, 3)
    bars = []
    for x in range(CELL // 2, 56, CELL):
        col = [tuple(int(v) for v in p) for p in arr[:, x]]
        ink = [p for p in col if p not in (WHITE, GREY)]
        if not ink:
            continue
        assert len(set(ink)) == 1 and ink[0] in RGB_TO_COLOR
        height = len(ink)
        assert all(p == ink[0] for p in col[56 - height :]), "bar not contiguous from the bottom"
        assert height % BAR_UNIT_PX == 0
        bars.append((RGB_TO_COLOR[ink[0]], height // BAR_UNIT_PX))
    return bars


def options(problem: str) -> dict[str, str]:
    """Letter -> option word of an inline multiple-choice question."""
    return dict(re.findall(r"\(([A-D])\) (\w+)", problem))


# --- per-family oracles: (record, image) -> (answer, thought) from the pixels and the question ---


def check_count_color(problem: str, img: Image.Image) -> tuple[str, str]:
    (colour,) = re.fullmatch(r"how many (\w+) shapes are there \?", problem).groups()
    k = sum(c == colour for _, c in decode_cells(img))
    return str(k), f"{colour} {k}"


def check_count_shape(problem: str, img: Image.Image) -> tuple[str, str]:
    (plural,) = re.fullmatch(r"how many (\w+) are there \?", problem).groups()
    k = sum(s + "s" == plural for s, _ in decode_cells(img))
    return str(k), f"{plural} {k}"


def check_count_two_colors(problem: str, img: Image.Image) -> tuple[str, str]:
    c1, c2 = re.fullmatch(r"how many shapes are (\w+) or (\w+) \?", problem).groups()
    counts = Counter(c for _, c in decode_cells(img))
    k1, k2 = counts[c1], counts[c2]
    return str(k1 + k2), f"{c1} {k1} , {c2} {k2} . {k1} + {k2} = {k1 + k2}"


def check_compare_count(problem: str, img: Image.Image) -> tuple[str, str]:
    c1, c2 = re.match(r"are there more (\w+) or (\w+) shapes \?", problem).groups()
    assert options(problem) == {"A": c1, "B": c2}
    counts = Counter(c for _, c in decode_cells(img))
    assert counts[c1] != counts[c2], "no unique answer"
    winner = c1 if counts[c1] > counts[c2] else c2
    letter = {v: k for k, v in options(problem).items()}[winner]
    return letter, f"{c1} {counts[c1]} , {c2} {counts[c2]} . more {winner}"


def check_add_digits(problem: str, img: Image.Image) -> tuple[str, str]:
    assert problem == "what is the sum of the numbers ?"
    digits = decode_digits(img)
    return str(sum(digits)), " + ".join(map(str, digits)) + f" = {sum(digits)}"


def check_bar_max(problem: str, img: Image.Image) -> tuple[str, str]:
    assert problem.startswith("which bar is the tallest ? (A)")
    bars = decode_bars(img)
    opts = options(problem)
    assert sorted(opts.values()) == sorted(c for c, _ in bars)
    top = max(h for _, h in bars)
    (winner,) = [c for c, h in bars if h == top]  # unique tallest
    letter = {v: k for k, v in opts.items()}[winner]
    return letter, " , ".join(f"{c} {h}" for c, h in bars) + f" . tallest {winner}"


def check_bar_diff(problem: str, img: Image.Image) -> tuple[str, str]:
    c1, c2 = re.fullmatch(r"how much taller is the (\w+) bar than the (\w+) bar \?", problem).groups()
    heights = dict(decode_bars(img))
    h1, h2 = heights[c1], heights[c2]
    assert h1 > h2
    return str(h1 - h2), f"{c1} {h1} , {c2} {h2} . {h1} - {h2} = {h1 - h2}"


ORACLES = {
    "count_color": check_count_color,
    "count_shape": check_count_shape,
    "count_two_colors": check_count_two_colors,
    "compare_count": check_compare_count,
    "add_digits": check_add_digits,
    "bar_max": check_bar_max,
    "bar_diff": check_bar_diff,
}
ANSWER_RANGE = {  # family -> allowed answers over all levels
    "count_color": {str(k) for k in range(10)},
    "count_shape": {str(k) for k in range(10)},
    "count_two_colors": {str(k) for k in range(13)},
    "compare_count": {"A", "B"},
    "add_digits": {str(k) for k in range(28)},
    "bar_max": set("ABCD"),
    "bar_diff": {str(k) for k in range(1, 9)},
}
SOLUTION_RE = re.compile(r"<thought>([^<]+)</thought><answer>([^<]+)</answer>")
TRAIN_KEYS = ["id", "images", "problem", "answer", "problem_type", "solution", "family", "level"]


def test_every_family_has_an_oracle():
    assert sorted(synth.FAMILIES) == sorted(ORACLES)
    assert len(synth.FAMILIES) >= 4


@pytest.mark.parametrize("family", sorted(ORACLES))
@pytest.mark.parametrize("level", synth.LEVELS)
def test_answers_correct_by_construction(family, level):
    """100 records per (family, level): answer and reasoning re-derived from the pixels match the record."""
    records = synth.generate(100, seed=7, families=[family], level=level)
    for rec in records:
        assert rec["family"] == family and rec["level"] == level
        (img,) = rec["pil_images"]
        answer, thought = ORACLES[family](rec["problem"], img)
        assert rec["answer"] == answer, rec
        assert rec["solution"] == f"<thought>{thought}</thought><answer>{answer}</answer>"
        assert rec["answer"] in ANSWER_RANGE[family]
        assert rec["problem_type"] == (
            "multiple_choice" if family in ("compare_count", "bar_max") else "numeric"
        )


def test_answers_are_spread():
    """No family collapses to one answer: over 210 mixed-level records each shows several distinct answers."""
    records = synth.generate(7 * 30, seed=3)
    by_family: dict[str, set[str]] = {}
    for rec in records:
        by_family.setdefault(rec["family"], set()).add(rec["answer"])
    assert {f: len(a) >= 2 for f, a in by_family.items()} == {f: True for f in ORACLES}
    assert {"A", "B"} <= by_family["compare_count"] and {"A", "B", "C"} <= by_family["bar_max"]


def test_level_sets_image_size():
    # shape grids: 4x4 cells = 56 px at levels 1-2, 6x6 = 84 px at level 3; 3 digits at add_digits level 3
    sizes = {
        (r["family"], r["level"]): r["pil_images"][0].size
        for lv in synth.LEVELS
        for r in synth.generate(7, 0, level=lv)
    }
    assert sizes[("count_color", 1)] == (56, 56) and sizes[("count_color", 3)] == (84, 84)
    assert sizes[("add_digits", 2)] == (56, 56) and sizes[("add_digits", 3)] == (84, 56)
    assert sizes[("bar_max", 3)] == (56, 56)


def test_generate_is_deterministic_and_prefix_stable():
    a, b = synth.generate(30, seed=5), synth.generate(60, seed=5)
    strip = lambda r: ({k: v for k, v in r.items() if k != "pil_images"}, r["pil_images"][0].tobytes())  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b[:30]]
    assert [strip(r) for r in a] != [strip(r) for r in synth.generate(30, seed=6)]


def test_train_and_val_are_disjoint():
    key = lambda r: (r["problem"], r["pil_images"][0].size, r["pil_images"][0].tobytes())  # noqa: E731
    train = {key(r) for r in synth.generate(700, seed=0, split="train")}
    val = [key(r) for r in synth.generate(140, seed=0, split="val")]
    assert train.isdisjoint(val)
    assert len(set(val)) > 100  # val is its own stream, not a handful of repeats


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_write_dataset_is_byte_identical_by_seed(tmp_path):
    metas = [
        synth.write_dataset(tmp_path / name, 35, 14, seed=s) for name, s in (("a", 1), ("b", 1), ("c", 2))
    ]
    da, db, dc = (tree_digest(tmp_path / n) for n in "abc")
    assert len(da) == 35 + 14 + 3  # PNGs + train.jsonl + val.jsonl + meta.json
    assert da == db and metas[0] == metas[1]
    assert da["train.jsonl"] != dc["train.jsonl"] and da["val.jsonl"] != dc["val.jsonl"]


def test_written_records_schema(tmp_path):
    meta = synth.write_dataset(tmp_path, 70, 21, seed=0)
    assert meta["counts"] == {"train": {f: 10 for f in synth.FAMILIES}, "val": {f: 3 for f in synth.FAMILIES}}
    assert meta["seed"] == 0 and meta["version"] == synth.GENERATOR_VERSION
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    ids = set()
    for split, n in (("train", 70), ("val", 21)):
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            rec = json.loads(line)
            assert list(rec) == TRAIN_KEYS
            assert rec["id"] not in ids
            ids.add(rec["id"])
            assert rec["images"] == [f"images/{rec['id']}.png"]
            img = Image.open(tmp_path / rec["images"][0])  # relative to the JSONL file
            assert img.mode == "RGB" and img.width % 28 == 0 and img.height % 28 == 0
            thought, answer = SOLUTION_RE.fullmatch(rec["solution"]).groups()
            assert answer == rec["answer"] and len(thought.split()) <= 24
            assert rec["problem_type"] in ("numeric", "multiple_choice") and rec["level"] in synth.LEVELS
            # the PNG round-trips to the pixels the answer was derived from
            assert ORACLES[rec["family"]](rec["problem"], img.convert("RGB"))[0] == rec["answer"]


def test_vocabulary_covers_everything_emitted():
    vocab = set(synth.vocabulary())
    questions = set(synth.corpus())
    tag_re = re.compile(r"(</?(?:thought|answer)>)")
    for rec in synth.generate(7 * 3 * 20, seed=11):
        assert rec["problem"] in questions
        words = rec["problem"].split() + tag_re.sub(r" \1 ", rec["solution"]).split() + [rec["answer"]]
        assert set(words) <= vocab, set(words) - vocab
    assert len(vocab) < 80  # small, regular vocabulary for a word-level tokenizer


def test_family_registry_lookup():
    assert synth.get_family("bar_max") is synth.bar_max
    with pytest.raises(KeyError, match="known: add_digits, bar_diff"):
        synth.get_family("bars")
    assert synth.resolve_families("count_color, bar_max") == ["count_color", "bar_max"]
    with pytest.raises(ValueError, match="level"):
        synth.generate(1, 0, level=4)


def test_cli_main(tmp_path, capsys):
    from mmrlsd.cli import main

    argv = ["data", "synth", "--out", str(tmp_path), "--n", "6", "--n-val", "4", "--seed", "3"]
    assert main([*argv, "--families", "add_digits,bar_diff"]) == 0
    assert "wrote 6 train + 4 val records" in capsys.readouterr().out
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["counts"] == {
        "train": {"add_digits": 3, "bar_diff": 3},
        "val": {"add_digits": 2, "bar_diff": 2},
    }
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--families", "nope"]) == 2
    assert "unknown synth family 'nope'" in capsys.readouterr().err
