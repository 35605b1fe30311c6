"""OPSD's privileged text (`algo.teacher_info: solution`) comes from `data.solution_key`; a record without it is
skipped and counted, never given the answer in its place."""

import json
import sys
from pathlib import Path

import pytest

from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.data.sources import FieldMap, load_dataset_files
from mmrlsd.types import Sample

REPO = Path(__file__).resolve().parents[2]
RECORDS = [
    {"id": "a", "problem": "1+1?", "answer": "2", "trace": "one plus one is two"},
    {"id": "b", "problem": "2+2?", "answer": "4"},  # no trace
    {"id": "c", "problem": "3+3?", "answer": "6", "trace": "   "},  # blank
    {"id": "d", "problem": "4+4?", "answer": "8", "trace": 8},  # not text
]


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_required_solution_skips_and_counts_records_without_it(tmp_path):
    data = load_dataset_files([str(_write(tmp_path))], FieldMap(solution="trace", require_solution=True))
    assert [s.id for s in data.samples] == ["a"]
    assert data.samples[0].solution == "one plus one is two"
    assert [(s.id, s.reason) for s in data.skipped] == [
        (rid, "missing or empty solution field 'trace' (the teacher's privileged text)") for rid in "bcd"
    ]
    # not required (every other method): all four load
    assert len(load_dataset_files([str(_write(tmp_path))], FieldMap(solution="trace")).samples) == 4


def _builder(tmp_path: Path, info: str) -> PromptBuilder:
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ problem }} REF[{{ reference }}]")

    class Proc:  # chat_text only needs apply_chat_template
        @staticmethod
        def apply_chat_template(messages, **kw):
            return messages[0]["content"][-1]["text"]

    return PromptBuilder(Proc(), tpl, tpl, info)


def test_teacher_prompt_uses_the_solution_and_never_falls_back_to_the_answer(tmp_path):
    prompts = _builder(tmp_path, "solution")
    with_trace = Sample(id="a", problem="1+1?", answer="2", images=[], solution="one plus one is two")
    assert prompts.teacher(with_trace) == "1+1? REF[one plus one is two]"
    for missing in (None, "", "  "):
        s = Sample(id="b", problem="2+2?", answer="4", images=[], solution=missing)
        with pytest.raises(
            ValueError, match="record 'b': teacher_info 'solution' but the record has no solution"
        ):
            prompts.teacher(s)
    assert _builder(tmp_path, "answer").teacher(with_trace) == "1+1? REF[2]"


def test_opsd_run_skips_records_without_a_solution(tiny_model, tmp_path):
    """The training loop requires the solution only under teacher_info: solution, and logs the skips."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    sys.path.insert(0, str(REPO / "tests" / "plugins"))
    from test_train_smoke import tiny_overrides
    from tinydata import write_records

    from mmrlsd.config import load_config
    from mmrlsd.train.loop import train

    path = write_records(tmp_path / "data", n=6)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    for r in recs[::2]:
        del r["solution"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = tiny_overrides(tiny_model("qwen2_vl"), path, **{
        "algo.token_adv": "opsd", "algo.teacher_info": "solution", "trainer.total_steps": 1,
        "trainer.save_every": 0, "trainer.threads": 1,
    })  # fmt: skip
    run = train(load_config(None, args), tmp_path / "run", progress=False)
    skipped = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in skipped) == ["r0", "r2", "r4"]
    assert all("solution field 'solution'" in s["reason"] for s in skipped)
