"""Tiny on-disk training data for tests (importable as `tinydata`: tests/ is on sys.path via the root
conftest; `from conftest import ...` is ambiguous because tests/bench has its own conftest)."""

from __future__ import annotations

from pathlib import Path


def write_records(root: Path, n: int = 8, text_only_every: int = 4, seed: int = 0) -> Path:
    """A few JSONL records with generated PNGs (and some text-only ones) under `root`; returns the JSONL path."""
    import json
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        k = rng.randint(0, 3)
        rec = {"id": f"r{i}", "problem": "how many red squares?", "answer": str(k), "problem_type": "numeric",
               "solution": f"<thought>count {k}</thought><answer>{k}</answer>"}  # fmt: skip
        if text_only_every and i % text_only_every == text_only_every - 1:
            rec["problem"] = f"what is {k} + 0?"
        else:
            img = Image.new("RGB", (56, 56), "white")
            d = ImageDraw.Draw(img)
            for j in range(k):
                d.rectangle([4 + 13 * j, 20, 14 + 13 * j, 30], fill="red")
            img.save(root / "images" / f"r{i}.png")
            rec["images"] = [f"images/r{i}.png"]
        lines.append(json.dumps(rec))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
