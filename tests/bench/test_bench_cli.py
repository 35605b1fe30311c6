"""`mmrlsd eval`: argument handling, usage errors and score-only mode on the shared files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrlsd.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
SCHEMA = {"bench", "split", "mode", "n", "correct", "accuracy", "breakdown", "items"}


def run(argv: list[str]) -> int:
    return main(["eval", *argv])


def test_help_is_fast_and_ends_with_examples():
    out = subprocess.run([sys.executable, "-m", "mmrlsd", "eval", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "--predictions" in out and "examples:" in out and "mmrlsd eval --bench mmmu" in out


def test_parsing_does_not_import_torch():
    code = "import sys; from mmrlsd.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_lead_cli_wires_eval():
    args = build_parser().parse_args(["eval", "--bench", "mmmu", "--predictions", "p.json"])
    assert args.bench == "mmmu" and args.predictions == "p.json"


def test_usage_errors(capsys):
    assert run(["--bench", "nope", "--predictions", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "mathvista" in err and "mmmu" in err
    assert run(["--bench", "mmmu", "--predictions", "x", "--mode", "rule-v1"]) == 2
    assert "unknown mode 'rule-v1'; known: official" in capsys.readouterr().err
    assert run(["--bench", "mathvista", "--predictions", "x", "--split", "val"]) == 2
    assert "known: testmini, test" in capsys.readouterr().err
    assert (
        run(["--bench", "mmmu", "--predictions", "x", "--judge-url", "http://h/v1", "--judge-model", "m"])
        == 2
    )
    assert "are for mode llm (MathVista)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --model or --predictions is required
        build_parser().parse_args(["eval", "--bench", "mmmu"])
    with pytest.raises(SystemExit):  # not both
        build_parser().parse_args(["eval", "--bench", "mmmu", "--model", "m", "--predictions", "p"])


def test_score_only_mathvista(benchdata, tmp_path, capsys):
    root = benchdata / "mathvista"
    out = tmp_path / "o" / "bard.json"
    rc = run(["--bench", "mathvista", "--predictions", str(root / "results/bard/output_bard.json"),
              "--data", str(root / "data/testmini.json"), "--mode", "official", "--output", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert SCHEMA <= set(result) and (result["n"], result["correct"], result["accuracy"]) == (
        1000,
        348,
        0.348,
    )
    assert result["mode"] == "official" and result["split"] == "testmini"
    assert result["items"]["5"]["prediction"] == "97" and result["items"]["5"]["correct"] is True
    assert "| 1000 | 348 | 34.80% |" in capsys.readouterr().out


def test_score_only_mathvista_rule_mode_is_labelled(benchdata, tmp_path):
    root = benchdata / "mathvista"
    rc = run(["--bench", "mathvista", "--predictions", str(root / "results/gpt4/output_gpt4.json"),
              "--data", str(root / "data/testmini.json"), "--mode", "rule-v1", "--output-dir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert result["mode"] == "rule-v1" and result["correct"] == 254
    assert "not comparable to official" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "preds, correct",
    [("llava1.5_13b", 330), ("llava1.5_13b/total_val_output.json", 330), ("llava1.5_13b_val.json", 324)],
)
def test_score_only_mmmu_both_input_forms(benchdata, tmp_path, preds, correct):
    root = benchdata / "mmmu" / "mmmu"
    out = tmp_path / "mmmu.json"
    rc = run(["--bench", "mmmu", "--predictions", str(root / "example_outputs" / preds),
              "--data", str(root / "answer_dict_val.json"), "--output", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert SCHEMA <= set(result) and (result["n"], result["correct"]) == (900, correct)
    assert result["split"] == "validation" and result["mode"] == "official"
    assert set(result["breakdown"]) == {"subject", "discipline", "question_type"}


def test_score_only_reads_our_predictions_jsonl(benchdata, tmp_path):
    root = benchdata / "mathvista"
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(json.dumps({"id": "1", "prompt": "p", "response": "so d = \\boxed{1.2} m"}) + "\n")
    rc = run(["--bench", "mathvista", "--predictions", str(pred), "--data", str(root / "data/testmini.json"),
              "--mode", "rule-v1", "--output", str(tmp_path / "s.json")])  # fmt: skip
    result = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0 and result["items"]["1"] == {"prediction": "1.2", "correct": True, "extraction": "1.2"}
    assert result["warnings"] == ["scored 1 pids, not the 1000 of testmini"]
