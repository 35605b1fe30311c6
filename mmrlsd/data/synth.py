"""Synthetic visual-reasoning data for the tiny lab, drawn with Pillow and deterministic by seed.

Each task family draws a small RGB image on a white background and asks a templated question whose
answer needs the image. Everything is laid out for a few-million-parameter Qwen2-VL (14 px patches,
2x2 spatial merge, one vision token per 28x28 px): images are 56 or 84 px a side, shapes sit one per
14x14 cell of a grid, colours are flat (no anti-aliasing) from a four-colour palette, and digits are
seven-segment glyphs made of rectangles, so no font file is needed and every machine renders the same
pixels.

Families (`FAMILIES`, each with a `level` 1-3 difficulty knob for a curriculum):

    count_color       how many red shapes are there ?                       numeric, 0-9
    count_shape       how many circles are there ?                          numeric, 0-9
    count_two_colors  how many shapes are red or blue ?                     numeric, 0-12, two steps
    compare_count     are there more red or blue shapes ? (A) red (B) blue  multiple choice, two steps
    add_digits        what is the sum of the numbers ?                      numeric, 0-27, two steps
    bar_max           which bar is the tallest ? (A) blue (B) red ...       multiple choice, two steps
    bar_diff          how much taller is the red bar than the blue bar ?    numeric, 1-8, three steps

Long-reasoning families (`LONG_FAMILIES`, opt-in by name: not part of the default mix):

    digit_chain       the digits are a b c d e . what is a + b - c + d - e ?  numeric, 0-54, 7-11 steps

`digit_chain` (the credit lab's task) reads 4-6 seven-segment digits and combines them left to right, every
reading and every partial result written out as its own step (`a = 3 ; b = 7 ; ... ; 3 + 7 = 10 ; 10 - 2 = 8`),
so a response can be right in most steps and wrong in one, and the final answer pins down which partial
results are consistent with it.

Every record carries a short reference solution in the RLSD response format, e.g.
`<thought>red 2 , blue 1 . 2 + 1 = 3</thought><answer>3</answer>` (used for SFT and the OPSD baseline).

Train and val are disjoint by construction: a candidate goes to val only if the hash of its content
(question + pixels) falls in val's bucket (1 in `VAL_BUCKETS`), and to train only otherwise; the two
splits are drawn from independent random streams derived from the seed.

Run:  mmrlsd data synth --out data/synth --n 2000 --seed 0
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

GENERATOR_VERSION = "1"

# --- rendering contract (the tests decode images with these constants) ---
CELL = 14
"""Side of one grid cell in pixels (= the Qwen2-VL patch size); one shape per cell."""
MARGIN = 2
"""Blank border inside a cell; a shape fills the remaining 10x10 px."""
BACKGROUND = (255, 255, 255)
GRID_RGB = (210, 210, 210)
"""Light grey of the chart grid lines (bar families)."""
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 190, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}
BAR_UNIT = 6
"""Pixels per unit of bar height; a bar of value h is h*BAR_UNIT px tall, h in 1..BAR_MAX."""
BAR_MAX = 9
BAR_SLOTS = 4
"""Bar charts are 56x56 px with four 14 px wide slots."""
DIGIT_W, DIGIT_H = 28, 56
"""Each digit gets a 28x56 box; segments are 4 px thick rectangles inside it."""
SEGMENTS: dict[str, tuple[int, int, int, int]] = {
    # name: (x0, y0, x1, y1), inclusive, relative to the digit box
    "a": (6, 6, 21, 9),  # top
    "b": (18, 6, 21, 29),  # top right
    "c": (18, 26, 21, 49),  # bottom right
    "d": (6, 46, 21, 49),  # bottom
    "e": (6, 26, 9, 49),  # bottom left
    "f": (6, 6, 9, 29),  # top left
    "g": (6, 26, 21, 29),  # middle
}
DIGIT_SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")
"""Lit segments of the digits 0-9 (standard seven-segment encoding)."""

LEVELS = (1, 2, 3)
GRID_SIDE = {1: 4, 2: 4, 3: 6}
"""Cells per side of the shape grid at each level: 56x56 px at levels 1-2, 84x84 px at level 3."""
LETTERS = "ABCD"
MAX_ANSWER = 27
"""Largest numeric answer any family emits (3 digits of 9 at add_digits level 3)."""
VAL_BUCKETS = 8
"""A candidate belongs to val iff int(content_hash[:8], 16) % VAL_BUCKETS == 0."""
SPLITS = ("train", "val")
MAX_TRIES = 10_000
"""Candidates drawn for one record before giving up (a family whose content never hashes into the split)."""


@dataclass(frozen=True)
class Example:
    """One drawn task: the image, the question and its answer, and the reasoning that reaches it."""

    image: Image.Image
    """RGB image, sides multiples of 28 px."""
    problem: str
    """Templated question; multiple-choice options are inline as `(A) red (B) blue`."""
    answer: str
    """Final answer: an integer string, or an option letter for multiple choice."""
    problem_type: str
    """"numeric" or "multiple_choice"."""
    thought: str
    """Short step-by-step reasoning, without tags."""

    @property
    def solution(self) -> str:
        """The reference response in the RLSD format, exactly what SFT trains on."""
        return f"<thought>{self.thought}</thought><answer>{self.answer}</answer>"


FamilyFn = Callable[[random.Random, int], Example]
FAMILIES: dict[str, FamilyFn] = {}
"""The default mix (short answers, at most three steps): what `generate` uses when no family is named."""
LONG_FAMILIES: dict[str, FamilyFn] = {}
"""Long-reasoning families, used only when named (`families=["digit_chain"]`)."""


def register_family(name: str, long: bool = False) -> Callable[[FamilyFn], FamilyFn]:
    """Decorator: register `fn(rng, level) -> Example` under `name` (in `LONG_FAMILIES` when `long`)."""

    def wrap(fn: FamilyFn) -> FamilyFn:
        (LONG_FAMILIES if long else FAMILIES)[name] = fn
        return fn

    return wrap


def get_family(name: str) -> FamilyFn:
    """The family registered as `name`; KeyError listing the valid names otherwise."""
    fn = FAMILIES.get(name) or LONG_FAMILIES.get(name)
    if fn is None:
        known = ", ".join(sorted(FAMILIES)) + "; long: " + ", ".join(sorted(LONG_FAMILIES))
        raise KeyError(f"unknown synth family {name!r}; known: {known}")
    return fn


# --- drawing ---


def draw_shape(draw: ImageDraw.ImageDraw, row: int, col: int, shape: str, color: str) -> None:
    """Fill `shape` in grid cell (row, col): square 100 px, circle 76 px, triangle 60 px."""
    x0, y0 = col * CELL + MARGIN, row * CELL + MARGIN
    x1, y1 = (col + 1) * CELL - MARGIN - 1, (row + 1) * CELL - MARGIN - 1
    fill = PALETTE[color]
    if shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        mid = (x0 + x1) // 2
        draw.polygon([(x0, y1), (x1, y1), (mid + 1, y0), (mid, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_grid(rng: random.Random, side: int, items: Sequence[tuple[str, str]]) -> Image.Image:
    """A side x side grid image with each (shape, color) of `items` in its own random cell."""
    img = Image.new("RGB", (side * CELL, side * CELL), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for cell, (shape, color) in zip(rng.sample(range(side * side), len(items)), items):
        draw_shape(draw, cell // side, cell % side, shape, color)
    return img


def draw_digit(draw: ImageDraw.ImageDraw, x0: int, digit: int, color: str) -> None:
    """Draw `digit` as a seven-segment glyph in the DIGIT_W x DIGIT_H box starting at column x0."""
    for seg in DIGIT_SEGMENTS[digit]:
        sx0, sy0, sx1, sy1 = SEGMENTS[seg]
        draw.rectangle((x0 + sx0, sy0, x0 + sx1, sy1), fill=PALETTE[color])


def bar_chart(bars: Sequence[tuple[int, str, int]]) -> Image.Image:
    """A 56x56 chart: grey grid lines every BAR_UNIT px, then one bar per (slot, color, height)."""
    size = BAR_SLOTS * CELL
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for k in range(1, BAR_MAX + 1):
        draw.line((0, size - k * BAR_UNIT, size - 1, size - k * BAR_UNIT), fill=GRID_RGB)
    for slot, color, height in bars:
        x0 = slot * CELL + MARGIN
        draw.rectangle(
            (x0, size - height * BAR_UNIT, x0 + CELL - 2 * MARGIN - 1, size - 1), fill=PALETTE[color]
        )
    return img


def random_bars(rng: random.Random, n: int) -> list[tuple[int, str, int]]:
    """n bars (slot, color, height) left to right: distinct slots and colours, heights 1..BAR_MAX."""
    slots = sorted(rng.sample(range(BAR_SLOTS), n))
    return [(s, c, rng.randint(1, BAR_MAX)) for s, c in zip(slots, rng.sample(COLORS, n))]


# --- question templates (shared by the families and corpus()) ---


def with_choices(question: str, options: Sequence[str]) -> str:
    """`question (A) opt1 (B) opt2 ...`: multiple-choice options inline, one word each."""
    return " ".join([question] + [f"({L}) {o}" for L, o in zip(LETTERS, options)])


def q_count_color(color: str) -> str:
    return f"how many {color} shapes are there ?"


def q_count_shape(shape: str) -> str:
    return f"how many {PLURALS[shape]} are there ?"


def q_count_two_colors(c1: str, c2: str) -> str:
    return f"how many shapes are {c1} or {c2} ?"


def q_compare_count(c1: str, c2: str) -> str:
    return with_choices(f"are there more {c1} or {c2} shapes ?", [c1, c2])


def q_add_digits() -> str:
    return "what is the sum of the numbers ?"


def q_bar_max(options: Sequence[str]) -> str:
    return with_choices("which bar is the tallest ?", options)


def q_bar_diff(c1: str, c2: str) -> str:
    return f"how much taller is the {c1} bar than the {c2} bar ?"


CHAIN_NAMES = "abcdef"
"""Names of the digits of `digit_chain`, left to right."""
CHAIN_DIGITS = {1: 4, 2: 5, 3: 6}
"""Digits drawn by `digit_chain` at each level (a 112, 140 or 168 x 56 px image)."""
CHAIN_MAX = 9 * max(CHAIN_DIGITS.values())
"""Largest answer (or partial result) of `digit_chain`."""


def q_digit_chain(ops: Sequence[str]) -> str:
    """`the digits are a b c d . what is a + b - c + d ?` for ops `["+", "-", "+"]`."""
    names = CHAIN_NAMES[: len(ops) + 1]
    expr = " ".join([names[0], *(f"{op} {n}" for op, n in zip(ops, names[1:]))])
    return f"the digits are {' '.join(names)} . what is {expr} ?"


def chain_steps(digits: Sequence[int], ops: Sequence[str]) -> list[str]:
    """The reasoning of `digit_chain` as steps: one reading per digit (`a = 3`), then one partial result per
    operation, left to right (`3 + 7 = 10`). The thought is `" ; ".join(steps)`."""
    steps = [f"{n} = {d}" for n, d in zip(CHAIN_NAMES, digits)]
    acc = digits[0]
    for op, d in zip(ops, digits[1:]):
        new = acc + d if op == "+" else acc - d
        steps.append(f"{acc} {op} {d} = {new}")
        acc = new
    return steps


# --- families ---


@register_family("count_color")
def count_color(rng: random.Random, level: int) -> Example:
    """Count the shapes of one colour among shapes of other colours."""
    kmax, dmax = {1: (3, 2), 2: (6, 5), 3: (9, 9)}[level]
    target = rng.choice(COLORS)
    others = [c for c in COLORS if c != target]
    k, d = rng.randint(0, kmax), rng.randint(0, dmax)
    items = [(rng.choice(SHAPES), target) for _ in range(k)]
    items += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(d)]
    img = shape_grid(rng, GRID_SIDE[level], items)
    return Example(img, q_count_color(target), str(k), "numeric", f"{target} {k}")


@register_family("count_shape")
def count_shape(rng: random.Random, level: int) -> Example:
    """Count the shapes of one kind (square, circle, triangle), whatever their colour."""
    kmax, dmax = {1: (3, 2), 2: (6, 5), 3: (9, 9)}[level]
    target = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != target]
    k, d = rng.randint(0, kmax), rng.randint(0, dmax)
    items = [(target, rng.choice(COLORS)) for _ in range(k)]
    items += [(rng.choice(others), rng.choice(COLORS)) for _ in range(d)]
    img = shape_grid(rng, GRID_SIDE[level], items)
    return Example(img, q_count_shape(target), str(k), "numeric", f"{PLURALS[target]} {k}")


@register_family("count_two_colors")
def count_two_colors(rng: random.Random, level: int) -> Example:
    """Count two colours separately, then add (two steps)."""
    kmax, dmax = {1: (2, 2), 2: (4, 4), 3: (6, 8)}[level]
    c1, c2 = rng.sample(COLORS, 2)
    others = [c for c in COLORS if c not in (c1, c2)]
    k1, k2, d = rng.randint(0, kmax), rng.randint(0, kmax), rng.randint(0, dmax)
    items = [(rng.choice(SHAPES), c) for c, k in ((c1, k1), (c2, k2)) for _ in range(k)]
    items += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(d)]
    img = shape_grid(rng, GRID_SIDE[level], items)
    thought = f"{c1} {k1} , {c2} {k2} . {k1} + {k2} = {k1 + k2}"
    return Example(img, q_count_two_colors(c1, c2), str(k1 + k2), "numeric", thought)


@register_family("compare_count")
def compare_count(rng: random.Random, level: int) -> Example:
    """Which of two colours has more shapes: count both, compare (two steps); answer A or B."""
    kmax, gap, dmax = {1: (4, 2, 2), 2: (6, 1, 4), 3: (9, 1, 8)}[level]
    c1, c2 = rng.sample(COLORS, 2)
    others = [c for c in COLORS if c not in (c1, c2)]
    k1, k2 = 0, 0
    while abs(k1 - k2) < gap:
        k1, k2 = rng.randint(0, kmax), rng.randint(0, kmax)
    d = rng.randint(0, dmax)
    items = [(rng.choice(SHAPES), c) for c, k in ((c1, k1), (c2, k2)) for _ in range(k)]
    items += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(d)]
    img = shape_grid(rng, GRID_SIDE[level], items)
    winner, letter = (c1, "A") if k1 > k2 else (c2, "B")
    thought = f"{c1} {k1} , {c2} {k2} . more {winner}"
    return Example(img, q_compare_count(c1, c2), letter, "multiple_choice", thought)


@register_family("add_digits")
def add_digits(rng: random.Random, level: int) -> Example:
    """Read two (level 3: three) seven-segment digits, then add them (two steps)."""
    n, dmax = {1: (2, 4), 2: (2, 9), 3: (3, 9)}[level]
    digits = [rng.randint(0, dmax) for _ in range(n)]
    img = Image.new("RGB", (n * DIGIT_W, DIGIT_H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, digit in enumerate(digits):
        draw_digit(draw, i * DIGIT_W, digit, rng.choice(COLORS))
    thought = " + ".join(map(str, digits)) + f" = {sum(digits)}"
    return Example(img, q_add_digits(), str(sum(digits)), "numeric", thought)


@register_family("bar_max")
def bar_max(rng: random.Random, level: int) -> Example:
    """Read the bar heights, then pick the tallest (two steps); options list the colours in random order."""
    n, gap = {1: (2, 3), 2: (3, 2), 3: (4, 1)}[level]
    bars = random_bars(rng, n)
    while _top_gap([h for _, _, h in bars]) < gap:
        bars = random_bars(rng, n)
    winner = max(bars, key=lambda b: b[2])[1]
    options = rng.sample([c for _, c, _ in bars], n)
    readings = " , ".join(f"{c} {h}" for _, c, h in bars)
    thought = f"{readings} . tallest {winner}"
    return Example(
        bar_chart(bars), q_bar_max(options), LETTERS[options.index(winner)], "multiple_choice", thought
    )


@register_family("digit_chain", long=True)
def digit_chain(rng: random.Random, level: int) -> Example:
    """Read 4-6 seven-segment digits (each in a random colour), then add or subtract them left to right, one
    written step per reading and per partial result (7, 9 or 11 steps). An operation is `-` only where the
    running value stays >= 0, so every partial result lies in 0..CHAIN_MAX."""
    n = CHAIN_DIGITS[level]
    digits = [rng.randint(0, 9) for _ in range(n)]
    ops, acc = [], digits[0]
    for d in digits[1:]:
        op = rng.choice("+-") if acc >= d else "+"
        acc = acc + d if op == "+" else acc - d
        ops.append(op)
    img = Image.new("RGB", (n * DIGIT_W, DIGIT_H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, digit in enumerate(digits):
        draw_digit(draw, i * DIGIT_W, digit, rng.choice(COLORS))
    thought = " ; ".join(chain_steps(digits, ops))
    return Example(img, q_digit_chain(ops), str(acc), "numeric", thought)


def _top_gap(heights: Sequence[int]) -> int:
    """Tallest minus second tallest."""
    top, second = sorted(heights, reverse=True)[:2]
    return top - second


@register_family("bar_diff")
def bar_diff(rng: random.Random, level: int) -> Example:
    """Read two named bars of a chart, then subtract (three steps); other bars are distractors."""
    n = {1: 2, 2: 3, 3: 4}[level]
    while True:
        bars = random_bars(rng, n)
        (_, ca, ha), (_, cb, hb) = rng.sample(bars, 2)
        if ha != hb:  # the asked pair must differ in height
            break
    (c1, h1), (c2, h2) = sorted([(ca, ha), (cb, hb)], key=lambda t: -t[1])
    thought = f"{c1} {h1} , {c2} {h2} . {h1} - {h2} = {h1 - h2}"
    return Example(bar_chart(bars), q_bar_diff(c1, c2), str(h1 - h2), "numeric", thought)


# --- records and splits ---


def content_hash(ex: Example) -> str:
    """sha256 over the question and the raw pixels: what makes two records the same item."""
    h = hashlib.sha256(ex.problem.encode())
    h.update(repr(ex.image.size).encode())
    h.update(ex.image.tobytes())
    return h.hexdigest()


def split_of(digest: str) -> str:
    """The split a content hash belongs to: 1 in VAL_BUCKETS items are val-only, the rest train-only."""
    return "val" if int(digest[:8], 16) % VAL_BUCKETS == 0 else "train"


def resolve_families(families: Sequence[str] | str | None) -> list[str]:
    """Family names in a fixed order: the default mix (`FAMILIES`, not the long ones) when None; a
    comma-separated string works too."""
    if families is None:
        return list(FAMILIES)
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    for name in families:
        get_family(name)
    if not families:
        raise ValueError("no synth family given")
    return list(families)


def draw_example(rng: random.Random, family: str, level: int | None, split: str) -> tuple[Example, int]:
    """Draw candidates of `family` until one hashes into `split`; returns it and its level."""
    fn = get_family(family)
    for _ in range(MAX_TRIES):
        lvl = level if level is not None else rng.choice(LEVELS)
        ex = fn(rng, lvl)
        if split_of(content_hash(ex)) == split:
            return ex, lvl
    raise RuntimeError(f"{family} level {level}: no {split} item in {MAX_TRIES} draws")


def generate(
    n: int,
    seed: int,
    families: Sequence[str] | str | None = None,
    level: int | None = None,
    *,
    split: str = "train",
) -> list[dict]:
    """n records of `split`, families in round-robin, levels uniform in LEVELS unless `level` is given.

    Each record holds the training-format fields plus `pil_images` (the PIL images, not serialised).
    The random stream depends on (seed, split) only, so `generate(100, s)` is a prefix of
    `generate(200, s)`, and train and val come from independent streams.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    names = resolve_families(families)
    rng = random.Random(f"mmrlsd-synth:{seed}:{split}")
    records = []
    for i in range(n):
        family = names[i % len(names)]
        ex, lvl = draw_example(rng, family, level, split)
        rid = f"{split}-{i:06d}"
        records.append(
            {
                "id": rid,
                "images": [f"images/{rid}.png"],
                "problem": ex.problem,
                "answer": ex.answer,
                "problem_type": ex.problem_type,
                "solution": ex.solution,
                "family": family,
                "level": lvl,
                "pil_images": [ex.image],
            }
        )
    return records


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with fixed options (no metadata), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_split(out_dir: Path, split: str, records: Sequence[dict]) -> None:
    """`out_dir/<split>.jsonl` plus one PNG per image under `out_dir/images/`."""
    with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            for rel, img in zip(rec["images"], rec["pil_images"]):
                (out_dir / rel).write_bytes(png_bytes(img))
            f.write(json.dumps({k: v for k, v in rec.items() if k != "pil_images"}) + "\n")


def write_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int,
    families: Sequence[str] | str | None = None,
    level: int | None = None,
) -> dict:
    """Write train.jsonl, val.jsonl, images/*.png and meta.json under out_dir; returns the meta dict.

    Existing files of the same names are overwritten; other files in out_dir are left alone.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = resolve_families(families)
    meta: dict = {
        "generator": "mmrlsd.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "families": names,
        "level": level,
        "val_buckets": VAL_BUCKETS,
        "counts": {},
        "levels": {},
    }
    for split, n in (("train", n_train), ("val", n_val)):
        records = generate(n, seed, names, level, split=split)
        write_split(out, split, records)
        meta["counts"][split] = dict(Counter(r["family"] for r in records))
        meta["levels"][split] = {str(k): v for k, v in sorted(Counter(r["level"] for r in records).items())}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# --- tokenizer corpus ---

TAGS = ("<thought>", "</thought>", "<answer>", "</answer>")
THOUGHT_WORDS = ("more", "tallest", ",", ".", "+", "-", "=")
"""Words that appear in solutions besides colours, shape plurals and numbers."""
CHAIN_WORDS = (";", "=", "+", "-", *CHAIN_NAMES)
"""Further words of the long families' solutions (`a = 3 ; ...`)."""


def corpus() -> list[str]:
    """Every question the generator can ask, every answer, and every other word a solution can use.

    The questions are enumerated in full (about 100 strings); solutions are built from colour names,
    shape plurals, the numbers 0..MAX_ANSWER, THOUGHT_WORDS and the four TAGS, listed one per entry.
    Tags are glued to their content in a solution (`<thought>red 2</thought>`), so a tokenizer should
    treat them as special tokens.
    """
    pairs = list(itertools.permutations(COLORS, 2))
    questions = [q_count_color(c) for c in COLORS] + [q_count_shape(s) for s in SHAPES]
    questions += [q(c1, c2) for q in (q_count_two_colors, q_compare_count, q_bar_diff) for c1, c2 in pairs]
    questions.append(q_add_digits())
    for n in (2, 3, 4):
        questions += [q_bar_max(opts) for opts in itertools.permutations(COLORS, n)]
    answers = [str(k) for k in range(MAX_ANSWER + 1)] + list(LETTERS)
    words = list(COLORS) + list(PLURALS.values()) + list(THOUGHT_WORDS) + list(TAGS)
    return questions + answers + words


def long_corpus() -> list[str]:
    """As `corpus`, for the long families: every `digit_chain` question, every number up to CHAIN_MAX and the
    solutions' extra words."""
    questions = [
        q_digit_chain(ops) for n in CHAIN_DIGITS.values() for ops in itertools.product("+-", repeat=n - 1)
    ]
    return questions + [str(k) for k in range(CHAIN_MAX + 1)] + list(CHAIN_WORDS)


def vocabulary() -> list[str]:
    """Sorted distinct whitespace-separated words of corpus(), tags included as words."""
    return sorted({w for line in corpus() for w in line.split()})
