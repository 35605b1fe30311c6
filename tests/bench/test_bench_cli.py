"""`mmrlsd eval`: argument handling, usage errors, score-only mode on the official files (the in-repo subsets,
and the full files when present), packaged protocols, fail-fast on a missing model path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from reference_files import FIXTURES, TIERS, tier_root

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


@pytest.mark.parametrize("tier", TIERS)
def test_score_only_mathvista(tier, tmp_path, capsys):
    root = tier_root(tier) / "mathvista"
    out = tmp_path / "o" / "bard.json"
    rc = run(["--bench", "mathvista", "--predictions", str(root / "results/bard/output_bard.json"),
              "--data", str(root / "data/testmini.json"), "--mode", "official", "--output", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    official = json.loads((root / "official_rerun/per_item_bard.json").read_text())
    n, correct = len(official), sum(ref["true_false"] for ref in official.values())
    assert SCHEMA <= set(result) and (result["n"], result["correct"]) == (n, correct)
    assert (n, correct) in ((26, 7), (1000, 348))  # the subset, or the whole file (34.8%)
    assert result["mode"] == "official" and result["split"] == "testmini"
    assert result["items"]["5"]["prediction"] == "97" and result["items"]["5"]["correct"] is True
    assert f"| {n} | {correct} | {100 * correct / n:.2f}% |" in capsys.readouterr().out


@pytest.mark.parametrize("tier", TIERS)
def test_score_only_mathvista_rule_mode_is_labelled(tier, tmp_path):
    root = tier_root(tier) / "mathvista"
    rc = run(["--bench", "mathvista", "--predictions", str(root / "results/gpt4/output_gpt4.json"),
              "--data", str(root / "data/testmini.json"), "--mode", "rule-v1", "--output-dir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert (
        result["mode"] == "rule-v1" and "not comparable to official" in (tmp_path / "summary.md").read_text()
    )
    if result["n"] == 1000:
        assert result["correct"] == 254


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "preds, ref, correct",
    [("llava1.5_13b", "eval_only_llava1.5_13b_total_val_output.json", 330),
     ("llava1.5_13b/total_val_output.json", "eval_only_llava1.5_13b_total_val_output.json", 330),
     ("llava1.5_13b_val.json", "eval_only_llava1.5_13b_val.json", 324)],
)  # fmt: skip
def test_score_only_mmmu_both_input_forms(tier, tmp_path, preds, ref, correct):
    root = tier_root(tier) / "mmmu"
    out = tmp_path / "mmmu.json"
    rc = run(["--bench", "mmmu", "--predictions", str(root / "mmmu/example_outputs" / preds),
              "--data", str(root / "mmmu/answer_dict_val.json"), "--output", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert SCHEMA <= set(result) and result["n"] in (120, 900)
    if result["n"] == 900:
        assert result["correct"] == correct
    else:  # 4 whole subjects: the official per-subject accuracies (3 d.p. of 30 items) give the count
        official = json.loads((root / "official_rerun" / ref).read_text())
        subjects = ("Design", "Geography", "Pharmacy", "Psychology")
        assert result["correct"] == sum(round(official[s]["acc"] * official[s]["num"]) for s in subjects)
    assert result["split"] == "validation" and result["mode"] == "official"
    assert set(result["breakdown"]) == {"subject", "discipline", "question_type"}


def test_score_only_reads_our_predictions_jsonl(tmp_path):
    root = FIXTURES / "mathvista"
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(json.dumps({"id": "1", "prompt": "p", "response": "so d = \\boxed{1.2} m"}) + "\n")
    rc = run(["--bench", "mathvista", "--predictions", str(pred), "--data", str(root / "data/testmini.json"),
              "--mode", "rule-v1", "--output", str(tmp_path / "s.json")])  # fmt: skip
    result = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0 and result["items"]["1"] == {"prediction": "1.2", "correct": True, "extraction": "1.2"}
    assert result["warnings"] == ["scored 1 pids, not the 1000 of testmini"]


def test_protocols_ship_inside_the_package():
    from importlib import resources

    from mmrlsd.bench import BENCHES, get_bench
    from mmrlsd.bench.run import default_config_path, load_eval_config

    shipped = sorted(p.name for p in resources.files("mmrlsd.bench").joinpath("protocols").iterdir())
    assert shipped == sorted(f"{name}.yaml" for name in BENCHES)
    for name in BENCHES:
        cfg = load_eval_config(default_config_path(name))  # read through importlib.resources
        bench = get_bench(name)
        assert cfg.split in bench.splits and cfg.mode in bench.modes, name
    zerobench = load_eval_config(default_config_path("zerobench"))
    assert (zerobench.samples, zerobench.temperature, zerobench.max_new_tokens) == (5, 0.0, 4096)
    assert default_config_path("no-such-bench") is None


def test_protocols_are_in_the_built_wheel(tmp_path):
    # a non-editable install gets only what pyproject declares: build the wheel from a copy of the sources
    import importlib.util
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(REPO / "mmrlsd", src / "mmrlsd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)]
    if importlib.util.find_spec("setuptools"):  # else pip fetches setuptools into an isolated build env
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mmrlsd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mmrlsd/bench/protocols/{p.name}" for p in (REPO / "mmrlsd/bench/protocols").glob("*.yaml")}
    assert expected and expected <= names


def test_missing_model_fails_before_reading_data(tmp_path, capsys, monkeypatch):
    from mmrlsd.bench.base import Bench
    from mmrlsd.cli.eval import model_problem

    def no_reads(*args, **kwargs):
        raise AssertionError("data was read before the model path was checked")

    monkeypatch.setattr(Bench, "load", no_reads)
    local = [str(tmp_path / "run" / "checkpoint-7"), "runs/nope/checkpoint-100", "./ckpt", "~/nowhere/m"]
    for model in local:
        assert run(["--bench", "zerobench", "--model", model, "--data", "gold.parquet"]) == 2
        err = capsys.readouterr().err
        assert f"--model {model}: no such file or directory" in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, a hub id must be in the cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert run(["--bench", "zerobench", "--model", "no-such-org/no-such-model", "--data", "g.parquet"]) == 2
    assert "not in the Hugging Face cache (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
    assert model_problem(str(tmp_path)) is None  # exists
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert model_problem("Qwen/Qwen2.5-VL-7B-Instruct") is None  # online, a hub id is left to the loader
