"""User errors in every subcommand are one `error:` line naming the file, key, record or id, with a non-zero exit
and no traceback; internal bugs still raise (or show with --debug). Eval predictions are never scored against
answers the predictions file carries itself."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

from mmrlsd.cli import main

REPO = Path(__file__).resolve().parents[2]
MATHVISTA = REPO / "eval" / "fixtures" / "mathvista"
GOLD = str(MATHVISTA / "data" / "testmini.json")
BARD = MATHVISTA / "results" / "bard" / "output_bard.json"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _score(capsys, preds: Path, *extra: str) -> tuple[int, str, str]:
    return _cli(capsys, "eval", "--bench", "mathvista", "--predictions", str(preds), "--data", GOLD, *extra)


def _bard() -> dict:
    return json.loads(BARD.read_text())


def test_predictions_carrying_their_own_answers_are_scored_against_gold(tmp_path, capsys):
    rows = _bard()
    for row in rows.values():  # every row claims the gold answer is its own (normalised) prediction
        row["answer"] = row["prediction"]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(rows))
    out = tmp_path / "r.json"
    code, _, err = _score(capsys, forged, "--output", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert (result["n"], result["correct"]) == (26, 7)  # the same as the honest file, not 26/26


def test_unknown_prediction_ids_are_dropped_and_counted(tmp_path, capsys):
    rows = _bard()
    rows["999999"] = {**rows["1"], "pid": "999999", "answer": "0.11", "extraction": "0.11"}
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "r.json"
    code, stdout, err = _score(capsys, path, "--output", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert (result["n"], result["correct"]) == (26, 7) and "999999" not in result["items"]
    warning = "1 prediction ids are not in the gold data and were not scored (first: '999999')"
    assert warning in result["warnings"] and warning in stdout


def test_no_prediction_id_in_gold_is_an_error(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "response": "1"}) + "\n" for i in range(3)))
    code, _, err = _score(capsys, path)
    assert code == 2 and "error: none of the 3 prediction ids is in the gold data (first: 'x0')" in err
    assert "Traceback" not in err


def test_duplicate_prediction_ids_are_an_error(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "response": "1"}) + "\n" for i in ("1", "2", "1")))
    code, _, err = _score(capsys, path)
    assert code == 2 and f"error: {path}: duplicate id '1'" in err


def test_damaged_prediction_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "1", "response": "1"}) + "\n{oops\n")
    code, _, err = _score(capsys, path)
    assert code == 2 and f"error: {path}:2: not valid JSON" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_200mb_of_junk_fails_fast_without_reading_it_all(tmp_path, capsys, suffix):
    path = tmp_path / f"junk{suffix}"
    rng = __import__("random").Random(0)
    block = bytes(rng.randrange(256) for _ in range(1 << 16)).replace(b"\n", b"\x00")
    with open(path, "wb") as f:
        for _ in range(200 * 16):  # 200 MB; one newline per 64 KB (JSONL lines)
            f.write(block[:-1] + b"\n")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code, _, err = _score(capsys, path)
    seconds = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert code == 2 and f"error: {path}" in err and "not" in err and "JSON" in err, err
    assert seconds < 10 and grown_mb < 50, (seconds, grown_mb)


def test_eval_output_that_is_a_directory(tmp_path, capsys):
    code, _, err = _score(capsys, BARD, "--output", str(tmp_path))
    assert code == 2 and f"error: --output {tmp_path}: is a directory" in err


def test_export_into_a_file_and_a_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "hf"))
    assert code == 2 and f"error: {tmp_path / 'nope'}: not a complete mmrlsd checkpoint" in err


def test_train_output_dir_that_is_a_file_or_under_a_file(tmp_path, capsys):
    cfg = str(REPO / "configs" / "tiny_cpu.yaml")
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, "train", cfg, "--output-dir", str(tmp_path / "file"))
    assert code == 2 and f"error: --output-dir {tmp_path / 'file'}: exists and is not a directory" in err
    code, _, err = _cli(capsys, "train", cfg, "--output-dir", str(tmp_path / "file" / "run"))
    assert (
        code == 2
        and f"error: --output-dir {tmp_path / 'file' / 'run'}: cannot create it (Not a directory)" in err
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_train_output_dir_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, _, err = _cli(
        capsys, "train", str(REPO / "configs" / "tiny_cpu.yaml"), "--output-dir", str(ro / "run")
    )
    assert code == 2 and f"error: --output-dir {ro / 'run'}: cannot create it (Permission denied)" in err


def test_internal_bugs_still_show_a_traceback(monkeypatch, capsys):
    """Only user errors become `error:` lines: a bug in our code propagates (and --debug re-raises ours)."""
    from mmrlsd.cli import validate

    def boom(args):
        raise AttributeError("a bug")

    monkeypatch.setattr(validate, "run", boom)
    with pytest.raises(AttributeError, match="a bug"):
        main(["validate", "x.yaml"])
    monkeypatch.undo()
    with pytest.raises(Exception, match="config file not found"):
        main(["--debug", "validate", "/nonexistent.yaml"])
