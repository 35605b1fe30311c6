"""`mmrlsd train` on a dataset with 10% broken records finishes and reports how many were skipped and why: in the
log, in `skipped.jsonl` and in the `data/skipped_total` metric."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from mmrlsd import cli
from mmrlsd.data.sources import FieldMap, load_dataset_files
from mmrlsd.log import read_metrics

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
sys.path.insert(0, str(TESTS / "plugins"))
from test_train_smoke import tiny_overrides  # noqa: E402

# 30 records, 3 broken (10%): one is not JSON, one has no answer (both found when the file is read), and one
# has a corrupt image (found when a batch loads it). The image one comes first and the data are not shuffled,
# so step 1 draws it.
BROKEN_IMAGE = {
    "id": "broken_image",
    "problem": "how many red squares?",
    "answer": "2",
    "images": ["images/bad.png"],
}
NO_ANSWER = {"id": "no_answer", "problem": "how many red squares?", "images": ["images/r0.png"]}


def _broken_dataset(root: Path) -> tuple[Path, str]:
    from tinydata import write_records

    path = write_records(root, n=27)
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    good = path.read_text().splitlines()
    lines = [json.dumps(BROKEN_IMAGE), *good[:13], '{"id": "cut", "problem": "how many', *good[13:],
             json.dumps(NO_ANSWER)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    assert len(lines) == 30
    return path, f"train.jsonl:{lines.index(lines[14]) + 1}"  # the not-JSON line's default id: file:line


@pytest.fixture
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_train_on_ten_percent_broken_records(tiny_model, tmp_path, caplog, _threads):
    data, not_json_id = _broken_dataset(tmp_path / "data")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model("qwen2_vl"), data, **{
        "trainer.total_steps": 2, "rollout.n": 2, "rollout.batch_size": 2, "rollout.max_new_tokens": 8,
        "optim.micro_batch_size": 2, "data.shuffle": "false", "trainer.threads": 1,
    })  # fmt: skip
    caplog.set_level(logging.WARNING, logger="mmrlsd")
    assert cli.main(["train", str(cfg), *overrides, "--output-dir", str(out), "--no-progress"]) == 0

    expected = {not_json_id: r"^line is not JSON \(Unterminated string",
                "no_answer": r"^missing or empty answer field 'answer'$",
                "broken_image": r"images/bad\.png: unreadable image \("}  # fmt: skip
    # skipped.jsonl: one line per skipped record, with its id and reason
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in skipped) == sorted(expected)
    for s in skipped:
        assert re.search(expected[s["id"]], s["reason"]), s
    # the metric: all three counted from step 1 on (the broken image is drawn by step 1)
    assert [(m["step"], m["data/skipped_total"]) for m in read_metrics(out)] == [(1, 3.0), (2, 3.0)]
    # the log: one warning per record naming it and the reason, and the total with where to look
    messages = [r.getMessage() for r in caplog.records]
    for rid in expected:
        assert any(m.startswith(f"skipped record {rid}: ") for m in messages), rid
    assert f"3 records skipped (see {out / 'skipped.jsonl'})" in messages
    assert (out / "checkpoint-2" / "COMPLETE").is_file()  # it finished


def test_skip_counts_summarise_why(tmp_path):
    """`Dataset.skip_counts()`: the same three skips grouped by kind of reason (paths and details dropped)."""
    data, _ = _broken_dataset(tmp_path / "data")
    ds = load_dataset_files([str(data)], FieldMap(), shuffle=False)
    assert len(ds.samples) == 28 and len(ds.skipped) == 2  # the image is only found when drawn
    ds.next_batch(4)
    assert ds.skip_counts() == {"line is not JSON": 1, "missing or empty answer field 'answer'": 1,
                                "unreadable image": 1}  # fmt: skip
