"""Shared fixtures: the `../shared` folder and tiny random Qwen-VL checkpoints built locally (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout; tests that need it skip with the reason when it is absent."""
    if not (SHARED / "benchdata").is_dir():
        pytest.skip(f"../shared/benchdata not found at {SHARED} (reference data lives outside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: `tiny_model("qwen2_5_vl")` -> directory of a tiny random checkpoint (built once per session)."""
    from mmrlsd.model.tiny import make_tiny

    cache: dict[str, Path] = {}

    def build(arch: str = "qwen2_5_vl") -> Path:
        if arch not in cache:
            cache[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), seed=0)
        return cache[arch]

    return build


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


@pytest.fixture
def tiny_records(tmp_path) -> Path:
    return write_records(tmp_path / "data")
