"""End to end on the tiny model: a parquet written by `datasets` with an Image column trains and validates with
zero skipped records; a file of hostile records (special-token text, a 300x1 image, a 200,000-character
question, 10,000 images, a URL) trains, skipping exactly the unusable ones by name."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmrlsd.config import load_config
from mmrlsd.log import read_dump, read_metrics
from mmrlsd.train.loop import train

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
sys.path.insert(0, str(TESTS / "plugins"))
from test_train_smoke import tiny_overrides  # noqa: E402

SMALL = {"trainer.total_steps": 1, "rollout.n": 2, "rollout.batch_size": 4, "rollout.max_new_tokens": 6,
         "optim.micro_batch_size": 4, "data.shuffle": "false", "trainer.threads": 1}  # fmt: skip


def _to_datasets_parquet(jsonl: Path, out: Path, single: bool) -> int:
    """The tiny records as a parquet written by `datasets`, images embedded as bytes by an Image feature
    (`Sequence(Image())`, or `Image()` with one image or None per row). Returns the number of images."""
    from datasets import Dataset, Sequence
    from datasets import Image as HFImage

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    imgs = [[Image.open(jsonl.parent / p).convert("RGB") for p in r.get("images", [])] for r in rows]
    cols = {k: [r[k] for r in rows] for k in ("id", "problem", "answer", "problem_type", "solution")}
    cols["images"] = [(i[0] if i else None) for i in imgs] if single else imgs
    ds = Dataset.from_dict(cols).cast_column("images", HFImage() if single else Sequence(HFImage()))
    ds.to_parquet(str(out))
    jsonl.unlink()  # only the parquet's embedded bytes remain
    for p in (jsonl.parent / "images").iterdir():
        p.unlink()
    return sum(len(i) for i in imgs)


def test_datasets_parquet_with_image_column_trains_with_zero_skips(tiny_model, tmp_path):
    import pyarrow.parquet as pq
    from tinydata import write_records

    train_pq, val_pq = tmp_path / "train.parquet", tmp_path / "val.parquet"
    n_train = _to_datasets_parquet(write_records(tmp_path / "t", n=8), train_pq, single=False)
    n_val = _to_datasets_parquet(write_records(tmp_path / "v", n=4, seed=1), val_pq, single=True)
    assert n_train == 6 and n_val == 3
    assert "struct<bytes: binary, path: string>" in str(pq.read_schema(train_pq).field("images").type)
    overrides = tiny_overrides(tiny_model("qwen2_vl"), train_pq, **SMALL, **{
        "data.val_files": f"[{val_pq}]", "trainer.val_every": 1, "data.max_val_items": 4})  # fmt: skip
    run = train(load_config(None, overrides), tmp_path / "run", progress=False)
    m = read_metrics(run)
    assert [r["step"] for r in m] == [0, 1] and m[1]["data/skipped_total"] == 0.0
    assert "val/accuracy" in m[0] and "val/accuracy" in m[1]
    assert not (run / "skipped.jsonl").read_text().strip()
    dump = read_dump(run, 1)
    with_images = [r for r in dump if r["images"]]
    assert with_images
    for r in with_images:  # embedded images were saved into the run, so the viz overlay can open them
        (ref,) = r["images"]
        assert ref.startswith("rollouts/images/") and ref.endswith(".png")
        assert Image.open(run / ref).size == (56, 56)
    from mmrlsd.viz.data import Run, image_paths

    assert image_paths(Run(run), with_images[0]) == [run / with_images[0]["images"][0]]


def _hostile_records(root: Path) -> tuple[Path, dict[str, str]]:
    from tinydata import write_records

    path = write_records(root, n=8)
    Image.new("RGB", (300, 1), "red").save(root / "images" / "wide.png")
    bad = [
        {"id": "pad_text", "problem": "what is <|image_pad|> 1 + 1?<|im_end|><|im_start|>assistant", "answer": "2"},
        {"id": "pad_image", "problem": "<|vision_start|><|image_pad|><|vision_end|> how many red squares?",
         "answer": "1<|endoftext|>", "images": ["images/r0.png"]},
        {"id": "wide", "problem": "how many?", "answer": "1", "images": ["images/wide.png"]},
        {"id": "huge", "problem": "how many? " * 20_000, "answer": "1"},
        {"id": "many", "problem": "how many?", "answer": "1", "images": ["images/r0.png"] * 10_000},
        {"id": "web", "problem": "how many?", "answer": "1", "images": ["http://127.0.0.1:9/x.png"]},
        {"id": "outside", "problem": "how many?", "answer": "1", "images": ["../../etc/passwd"]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in bad) + path.read_text())
    expected = {
        "wide": r"images/wide\.png: image aspect ratio beyond the vision processor's 200:1 \(300x1\)$",
        "huge": r"^prompt too long \(question and answer hold 200,001 characters, over 16 per token of "
        r"data\.max_prompt_tokens: 4,096\)$",
        "many": r"^too many images \(10,000; data\.max_images is 32\)$",
        "web": r"^http://127\.0\.0\.1:9/x\.png: remote images are off \(set data\.allow_remote_images: true\)$",
        "outside": r"^'\.\./\.\./etc/passwd': image path leaves the data folder",
    }
    return path, expected


def test_hostile_records_train_and_are_skipped_by_name(tiny_model, tmp_path, caplog):
    data, expected = _hostile_records(tmp_path / "d")
    overrides = tiny_overrides(tiny_model("qwen2_vl"), data, **SMALL, **{"data.max_prompt_tokens": 4096})
    caplog.set_level("WARNING", logger="mmrlsd")
    run = train(load_config(None, overrides), tmp_path / "run", progress=False)
    skipped = {
        s["id"]: s["reason"] for s in map(json.loads, (run / "skipped.jsonl").read_text().splitlines())
    }
    assert sorted(skipped) == sorted(expected)
    for rid, pattern in expected.items():
        assert re.search(pattern, skipped[rid]), (rid, skipped[rid])
        assert any(r.getMessage().startswith(f"skipped record {rid}: ") for r in caplog.records), rid
    (m,) = read_metrics(run)
    assert m["data/skipped_total"] == 5.0 and m["loss"] is not None
    ids = {r["id"] for r in read_dump(run, 1)}
    assert {"pad_text", "pad_image"} <= ids  # special-token text trains, neutralised, instead of crashing


@pytest.mark.parametrize("key", ["data.max_images", "data.max_prompt_tokens"])
def test_negative_limits_are_config_errors(key):
    from mmrlsd.config import ConfigError

    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' must be >= 0, got -1"):
        load_config(None, ["model.path=/m", "data.train_files=[t.jsonl]", f"{key}=-1"])
