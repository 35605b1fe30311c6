"""End to end: `mmrlsd eval` generates with a tiny random Qwen2.5-VL on a few fixture records per benchmark
(records in each benchmark's real format, images drawn here), then scores and writes the output files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmrlsd.bench import BENCHES, get_bench
from mmrlsd.cli import main

SCHEMA = {"bench", "split", "mode", "n", "correct", "accuracy", "breakdown", "items"}


def _image(path: Path | None = None, k: int = 2) -> bytes:
    img = Image.new("RGB", (64, 48), "white")
    d = ImageDraw.Draw(img)
    for j in range(k):
        d.rectangle([4 + 14 * j, 16, 14 + 14 * j, 26], fill="red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return buf.getvalue()


def mathvista_data(root: Path) -> tuple[Path, str]:
    """`testmini.json`: pid -> record, with `images/<pid>.jpg`."""
    meta = {"split": "testmini", "language": "english", "img_width": 64, "img_height": 48, "source": "synthetic",
            "category": "math-targeted-vqa", "task": "figure question answering", "context": "synthetic scene",
            "grade": "elementary school", "skills": ["arithmetic reasoning"]}  # fmt: skip
    records = {
        "1": {"question": "How many red squares are there?", "image": "images/1.jpg", "choices": None, "unit": None,
              "precision": None, "answer": "2", "question_type": "free_form", "answer_type": "integer", "pid": "1",
              "metadata": meta},
        "2": {"question": "What colour are the squares?", "image": "images/2.jpg", "choices": ["red", "blue"],
              "unit": None, "precision": None, "answer": "red", "question_type": "multi_choice",
              "answer_type": "text", "pid": "2", "metadata": meta},
        "3": {"question": "How wide is a square?", "image": "images/3.jpg", "choices": None, "unit": "px",
              "precision": 1.0, "answer": "10.0", "question_type": "free_form", "answer_type": "float", "pid": "3",
              "metadata": meta},
    }  # fmt: skip
    for pid in records:
        _image(root / "images" / f"{pid}.jpg")
    path = root / "testmini.json"
    path.write_text(json.dumps(records))
    return path, "testmini"


def mmmu_data(root: Path) -> tuple[Path, str]:
    """HF layout: `<Subject>/validation-00000-of-00001.parquet` with image structs `{bytes, path}`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "Art": {"id": "validation_Art_1", "question": "<image 1> Which colour dominates?",
                "options": "['red', 'blue', 'green']", "answer": "A", "question_type": "multiple-choice"},
        "Math": {"id": "validation_Math_1", "question": "How many squares are in <image 1>?", "options": "[]",
                 "answer": "2", "question_type": "open"},
    }  # fmt: skip
    for subject, row in rows.items():
        full = {**row, "explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Easy", "subfield": "x",
                "image_1": {"bytes": _image(), "path": "1.png"}}  # fmt: skip
        for k in range(2, 8):
            full[f"image_{k}"] = None
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        schema = pa.schema([(k, image_type if k.startswith("image_") else pa.string()) for k in full])
        (root / subject).mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist([full], schema=schema), root / subject / "validation-00000-of-00001.parquet"
        )
    return root, "validation"


def mathvision_data(root: Path) -> tuple[Path, str]:
    """`test.jsonl` with `images/<id>.jpg`."""
    rows = [
        {"id": "1", "question": "How many squares?\n<image1>", "options": [], "answer": "2", "solution": None,
         "level": 1, "subject": "counting", "image": "images/1.jpg"},
        {"id": "2", "question": "Which colour?\n<image1>", "options": ["red", "blue", "green", "black", "white"],
         "answer": "A", "solution": None, "level": 2, "subject": "logic", "image": "images/2.jpg"},
    ]  # fmt: skip
    for r in rows:
        _image(root / r["image"])
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, "test"


def wemath_data(root: Path) -> tuple[Path, str]:
    """`testmini.json`: a list of rows; one two-step group (3 rows)."""
    rows = []
    keys = [("2steps_1", "How many squares?"), ("2steps_2", "What colour?"), ("2steps_multi", "Both?")]
    for number, (key, q) in enumerate(keys, 1):  # one group: the same ID, one row per key
        rows.append({"ID": "2steps_1", "split": "testmini", "knowledge concept": "Counting", "question": q,
                     "option": "A. 1;B. 2;C. 3;D. 4; E. No correct answer", "answer": "B",
                     "image_path": f"2steps/image/{key}.png", "key": key, "question number": number,
                     "knowledge concept description": "Counting things"})  # fmt: skip
        _image(root / rows[-1]["image_path"])
    path = root / "testmini.json"
    path.write_text(json.dumps(rows))
    return path, "testmini"


FIXTURES = {
    "mathvista": mathvista_data,
    "mmmu": mmmu_data,
    "mathvision": mathvision_data,
    "wemath": wemath_data,
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_eval_generates_scores_and_writes_files(name, tiny_model, tmp_path):
    if name not in BENCHES:
        pytest.skip(f"benchmark {name!r} is not registered yet")
    data, split = FIXTURES[name](tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--bench", name, "--model", str(tiny_model("qwen2_5_vl")), "--data", str(data), "--split", split,
            "--output-dir", str(out), "--max-new-tokens", "4", "--batch-size", "2", "--engine", "hf",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(["eval", *argv]) == 0
    bench = get_bench(name)()
    records = bench.load(str(data), split)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [bench.record_id(r) for r in records]
    assert all(
        isinstance(r["response"], str) and r["prompt"] == bench.prompt(rec) for r, rec in zip(rows, records)
    )

    result = json.loads((out / "scores.json").read_text())
    assert SCHEMA <= set(result)
    assert (result["bench"], result["split"], result["mode"]) == (name, split, bench.generate_mode)
    assert result["n"] == len(records) and 0 <= result["correct"] <= result["n"]
    assert result["accuracy"] == pytest.approx(result["correct"] / result["n"], abs=0, rel=0)
    assert set(result["items"]) == {r["id"] for r in rows}
    assert all({"prediction", "correct"} <= set(it) for it in result["items"].values())
    for table in result["breakdown"].values():
        for cell in table.values():
            assert set(cell) == {"correct", "total", "accuracy"} and cell["correct"] <= cell["total"]
    assert result["generation"]["max_new_tokens"] == 4 and result["generation"]["engine"] == "hf"
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"# {name} {split}") and "| n | correct | accuracy |" in summary

    # scoring the written predictions.jsonl again (score-only) gives the same items
    again = bench.score(
        records, bench.read_predictions(out / "predictions.jsonl"), mode=result["mode"], split=split
    )
    assert again["items"] == result["items"] and again["correct"] == result["correct"]


def test_mathvista_test_split_only_exports_predictions(tiny_model, tmp_path):
    data, _ = mathvista_data(tmp_path / "data")
    test = {pid: {**r, "answer": "", "metadata": {**r["metadata"], "split": "test"}}
            for pid, r in json.loads(data.read_text()).items()}  # fmt: skip
    data.with_name("test.json").write_text(json.dumps(test))
    out = tmp_path / "out"
    argv = ["--bench", "mathvista", "--model", str(tiny_model("qwen2_5_vl")), "--data",
            str(data.with_name("test.json")), "--split", "test", "--limit", "2", "--output-dir", str(out),
            "--max-new-tokens", "2", "--engine", "hf", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(["eval", *argv]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert not (out / "scores.json").exists()
