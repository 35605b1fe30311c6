"""The lab's records: four synthetic families at levels 1-2, interleaved, with stable ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mmrlsd.data import synth

LAB_FAMILIES = ("count_color", "count_two_colors", "add_digits", "bar_diff")
"""The lab's task families (see `mmrlsd.data.synth.FAMILIES`)."""
LAB_LEVELS = (1, 2)
"""Difficulty levels, interleaved: 56x56 px images (4 vision tokens), answers 0-18."""
CREDIT_FAMILIES = ("digit_chain",)
"""The credit lab's task: read 4-6 digits, add/subtract them in 7-11 written steps (`synth.digit_chain`)."""
CREDIT_LEVELS = (2, 3)
"""5 and 6 digits, interleaved: 140 and 168 x 56 px images (10 and 12 vision tokens), 9 and 11 steps, answers 0-54
(level 1's 4 digits give responses under 40 tokens)."""
TASKS = {"tiny": (LAB_FAMILIES, LAB_LEVELS), "credit": (CREDIT_FAMILIES, CREDIT_LEVELS)}
"""`mmrlsd lab data --task`: families and levels of each lab."""


def lab_records(
    n: int, seed: int, split: str, families: Sequence[str] = LAB_FAMILIES, levels: Sequence[int] = LAB_LEVELS
) -> list[dict]:
    """n records of `split`, levels interleaved (record i has level `levels[i % len(levels)]`), families in
    round-robin within each level; ids are `<split>-L<level>-<index>`. Deterministic in (seed, split); a
    smaller n is a prefix of a larger one."""
    per_level = -(-n // len(levels))
    streams = [synth.generate(per_level, seed, list(families), level=lv, split=split) for lv in levels]
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        rec = dict(streams[i % len(levels)][i // len(levels)])
        rid = f"{split}-L{level}-{i // len(levels):06d}"
        rec["id"], rec["images"] = rid, [f"images/{rid}.png"]
        out.append(rec)
    return out


def write_lab_data(
    out_dir: str | Path, n_train: int = 4000, n_val: int = 512, seed: int = 0,
    families: Sequence[str] = LAB_FAMILIES, levels: Sequence[int] = LAB_LEVELS,
) -> dict:  # fmt: skip
    """Write `train.jsonl`, `val.jsonl`, `images/*.png` and `meta.json` under `out_dir`; returns the meta."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = {"generator": "mmrlsd.lab", "synth_version": synth.GENERATOR_VERSION, "seed": seed,
            "families": list(families), "levels": list(levels), "counts": {}}  # fmt: skip
    for split, n in (("train", n_train), ("val", n_val)):
        records = lab_records(n, seed, split, families, levels) if n else []
        synth.write_split(out, split, records)
        meta["counts"][split] = len(records)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
