"""We-Math (`mmrlsd/bench/wemath.py`): official-scorer parity on the synthetic prediction files (per row on
the in-repo subset of 8 whole problems; the official CSVs cell for cell when the full files are present), and
the extraction and four-dimensional quirks on small hand-made inputs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from reference_files import FIXTURES, TIERS, tier_root

from mmrlsd.bench.wemath import (
    INSTRUCTION,
    WeMath,
    _kahan_mean,
    accuracy_row,
    accuracy_table,
    extract_letter,
    four_dimensional,
    official_csv,
    problems,
)

SYNTH = ("wemath_synth_gold", "wemath_synth_allA")


def load_gold(root: Path) -> tuple[WeMath, list[dict]]:
    bench = WeMath()
    gold = bench.load(str(root / "data/testmini.json"), "testmini")  # also reads the knowledge nodes
    assert bench.nodes is not None and len(bench.nodes) == 67
    return bench, gold


@pytest.fixture(scope="module", params=TIERS)
def tier_dir(request) -> Path:
    """The in-repo subset, then (when present) the full files."""
    return tier_root(request.param) / "wemath"


@pytest.fixture(scope="module")
def wemath_dir() -> Path:
    return FIXTURES / "wemath"


@pytest.fixture(scope="module")
def full_dir(reference_dir: Path) -> Path:
    return reference_dir / "wemath"


@pytest.fixture(scope="module")
def bench_gold(wemath_dir: Path) -> tuple[WeMath, list[dict]]:
    return load_gold(wemath_dir)


@pytest.fixture(scope="module")
def full_gold(full_dir: Path) -> tuple[WeMath, list[dict]]:
    return load_gold(full_dir)


def synth(wemath_dir: Path, name: str) -> list[dict]:
    return json.loads((wemath_dir / f"synthetic/{name}.json").read_text())


def by_qn(rows: list[dict]) -> dict[str, dict]:
    return {str(r["question number"]): r for r in rows}


# ---------------------------------------------------------------- parity


def per_item_rows(res: dict) -> list[dict]:
    return [{"ID": it["ID"], "key": it["key"], "processed_answer": it["prediction"], "joker": it["correct"]}
            for it in res["items"].values()]  # fmt: skip


@pytest.mark.parametrize("name", SYNTH)
def test_official_parity_per_row(name, tier_dir):
    bench, gold = load_gold(tier_dir)
    res = bench.score(gold, bench.read_predictions(tier_dir / f"synthetic/{name}.json"))
    per_item = json.loads((tier_dir / f"synthetic/official_scores/{name}_per_item.json").read_text())
    assert per_item_rows(res) == per_item and res["n"] == len(per_item) in (28, 1740)
    assert res["groups_complete"] == len({r["ID"] for r in per_item})  # whole problems only


@pytest.mark.reference_files
@pytest.mark.parametrize("name", SYNTH)
def test_official_csv_parity(name, full_dir, full_gold):
    bench, gold = full_gold
    t0 = time.monotonic()
    res = bench.score(gold, bench.read_predictions(full_dir / f"synthetic/{name}.json"))
    assert time.monotonic() - t0 < 5
    scores = full_dir / "synthetic/official_scores"
    four_dim, acc = official_csv(res, name)
    assert four_dim == (scores / f"{name}_four_dimensional_metrics.csv").read_text()  # cell for cell
    assert acc == (scores / f"{name}_accuracy.csv").read_text()
    assert res["n"] == 1740 and res["groups_complete"] == 525 and not res["warnings"]


@pytest.mark.reference_files
def test_synthetic_headline_numbers(full_dir, full_gold):
    bench, gold = full_gold
    res = bench.score(gold, by_qn(synth(full_dir, "wemath_synth_allA")))
    fd = res["four_dimensional"]
    # allA: 585 rows have gold A; strict (CM 55 + 0.5 * IG 7) / 525 = 58.5 / 525; loose (150 + 3.5) / 525
    assert res["correct"] == 585 and res["accuracy"] == 585 / 1740
    assert {k: fd[k]["count"] for k in ("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose")} == {
        "IK": 365, "IG": 7, "CM_strict": 55, "CM_loose": 150, "RM_strict": 98, "RM_loose": 3,
    }  # fmt: skip
    assert fd["score_strict"] == pytest.approx(58.5 / 525, rel=0, abs=1e-15)
    assert fd["score_loose"] == pytest.approx(153.5 / 525, rel=0, abs=1e-15)
    assert fd["RM_strict"]["rate"] == 98 / (55 + 98) and fd["IK"]["rate"] == 365 / 525
    assert res["step_domain_accuracy"]["Two-step(S2)"] == pytest.approx(107 / 360, rel=0, abs=1e-15)  # 29.72%
    assert res["breakdown"]["key"]["2steps_multi"]["total"] == 360
    assert res["leaderboard"] == {"Score (Strict)": 11.14, "Score (Loose)": 29.24, "One-step(S1)": 35.56,
                                  "Two-step(S2)": 29.72, "Three-step(S3)": 27.88}  # fmt: skip
    json.dumps(res, allow_nan=False)  # the result file is strict JSON


def test_own_predictions_copy_gold_fields(tier_dir, tmp_path):
    # our predictions.jsonl carries {id, response}; ID, key, answer and concept come from the gold rows
    bench, gold = load_gold(tier_dir)
    rows = synth(tier_dir, "wemath_synth_allA")
    path = tmp_path / "predictions.jsonl"
    path.write_text(
        "".join(json.dumps({"id": str(r["question number"]), "response": r["response"]}) + "\n" for r in rows)
    )
    res = bench.score(gold, bench.read_predictions(path))
    per_item = json.loads(
        (tier_dir / "synthetic/official_scores/wemath_synth_allA_per_item.json").read_text()
    )
    assert per_item_rows(res) == per_item
    if len(rows) == 1740:
        official = (
            tier_dir / "synthetic/official_scores/wemath_synth_allA_four_dimensional_metrics.csv"
        ).read_text()
        assert official_csv(res, "wemath_synth_allA")[0] == official
    assert bench.prediction_fields(gold[0]) == {k: gold[0][k] for k in ("ID", "key", "question number",
                                                                        "knowledge concept", "answer")}  # fmt: skip


def test_prompt(bench_gold):
    bench, gold = bench_gold
    rec = gold[0]
    assert bench.prompt(rec) == f"Question: {rec['question']}\nOptions: {rec['option']}\n\n{INSTRUCTION}"
    assert INSTRUCTION.endswith("<Thought process>: <<your thought process>> <Answer>: <<your option>>")
    assert bench.record_id(rec) == "1"


# ---------------------------------------------------------------- extraction quirks


@pytest.mark.parametrize(
    "response, letter",
    [
        ("<Answer>: <<C>>", "C"),
        ("Answer: (C)", None),
        ("The answer is C", None),
        ("answer: c", None),
        ("ANSWER: C", "A"),  # no "Answer" substring: the whole text, which starts with "A"
        ("Answer: C and B", "C"),
        ("Answer: **C**", None),
        ("Answer: B. Final Answer: C", "C"),  # the last "Answer"
        ("Ex: A", "E"),
        ("", None),
        ("<Thought process>: x <Answer>: <<H>>", "H"),
        ("Answer: I", None),  # only A-H
    ],
)
def test_extract_letter_quirks(response, letter):
    assert extract_letter(response) == letter


def test_adversarial_responses(adversarial):
    name, response = adversarial  # shared adversarial responses (tests/bench/conftest.py)
    t0 = time.monotonic()
    letter = extract_letter(response)
    assert time.monotonic() - t0 < 1 and (letter is None or letter in "ABCDEFGH"), name


def test_null_response_and_missing_fields(bench_gold):
    bench, gold = bench_gold
    res = bench.score(gold, {"1": {"id": "1", "response": None}})
    assert res["items"]["1"] == {"prediction": None, "correct": False, "ID": "2steps_1", "key": "2steps_1"}
    with pytest.raises(KeyError, match="record 'x9': missing required field 'answer'"):
        bench.score(gold, {"x9": {"ID": "2steps_1", "key": "2steps_1", "response": "Answer: A"}})
    with pytest.raises(KeyError, match="record '1': missing required field 'response'"):
        bench.score(gold, {"1": {"id": "1"}})


# ---------------------------------------------------------------- four-dimensional metrics


def row(gid: str, key: str, joker: bool, concept: str = "c") -> dict:
    return {"ID": gid, "key": key, "joker": joker, "concept": concept}


def test_four_dimensional_categories_by_hand():
    T, F = True, False
    rows = []
    for gid, steps, multi in [("g1", (T, T), T), ("g2", (T, F), T), ("g3", (F, F), T), ("g4", (T, T), F),
                              ("g5", (T, F), F)]:  # fmt: skip
        rows += [row(gid, f"2steps_{i}", j) for i, j in enumerate(steps, 1)] + [
            row(gid, "2steps_multi", multi)
        ]
    rows += [row("g6", f"3steps_{i}", T) for i in (1, 2, 3)] + [row("g6", "3steps_multi", T)]
    fd = four_dimensional(problems(rows), total=6)
    # CM strict: g1, g6; CM loose: g1, g2, g6; RM strict: g2, g3; RM loose: g3; IG: g4; IK: g5
    counts = {k: fd[k]["count"] for k in ("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose")}
    assert counts == {"IK": 1, "IG": 1, "CM_strict": 2, "CM_loose": 3, "RM_strict": 2, "RM_loose": 1}
    assert fd["score_strict"] == (6 - 0.5 * 1 - 2 - 1) / 6  # 2.5 / 6
    assert fd["score_loose"] == (6 - 0.5 * 1 - 1 - 1) / 6  # 3.5 / 6
    assert fd["RM_strict"]["rate"] == 2 / (2 + 2) and fd["RM_loose"]["rate"] == 1 / (3 + 1)
    assert fd["IK"]["rate"] == 1 / 6 and fd["groups_complete"] == 6


@pytest.mark.reference_files
def test_missing_rows_keep_525_and_can_raise_the_score(full_dir, full_gold):
    bench, gold = full_gold
    rows = synth(full_dir, "wemath_synth_allA")
    base = bench.score(gold, by_qn(rows))
    # drop the multi-step row of the first problem in IK (a one-step F and Jm F): it leaves every category
    ik = next(p for p in problems([{"ID": r["ID"], "key": r["key"], "joker": base["items"][str(r["question number"])]["correct"],
                                    "concept": None} for r in rows])
              if any(j is False for j in p["jokers"]) and p["multi"] is False)  # fmt: skip
    kept = [r for r in rows if (r["ID"], r["key"]) != (ik["ID"], f"{ik['steps']}steps_multi")]
    res = bench.score(gold, by_qn(kept))
    fd = res["four_dimensional"]
    assert fd["IK"]["count"] == 364 and res["groups_complete"] == 524 and res["n"] == 1739
    # strict (525 - 0.5*7 - 98 - 364) / 525 = 59.5/525 = 11.33% (was 11.14%); loose 154.5/525 = 29.43%
    assert res["official"]["four_dimensional"]["Score (Strict)"] == "11.33%"
    assert res["official"]["four_dimensional"]["Score (Loose)"] == "29.43%"
    assert res["official"]["four_dimensional"]["InsufficientKnowledge (Strict)"] == "69.33% (364)"  # 364/525
    assert any("524 of 525" in w for w in res["warnings"])
    # a problem without its base row disappears altogether
    no_base = [r for r in rows if (r["ID"], r["key"]) != ("2steps_1", "2steps_1")]
    assert bench.score(gold, by_qn(no_base))["groups_complete"] == 524


def test_duplicate_id_key_rejected(wemath_dir, bench_gold):
    bench, gold = bench_gold
    rows = synth(wemath_dir, "wemath_synth_gold")
    dup = {**rows[0], "question number": 9999}
    with pytest.raises(
        ValueError, match=r"duplicate \(ID, key\) = \('2steps_1', '2steps_1'\) in records '1' and '9999'"
    ):
        bench.score(gold, by_qn(rows + [dup]))


@pytest.mark.reference_files
def test_rm_denominator_zero_is_na(full_gold):
    # every response empty: all jokers False -> IK = 525 (some F, Jm F), CM = RM = 0
    bench, gold = full_gold
    res = bench.score(gold, {bench.record_id(r): {"id": bench.record_id(r), "response": ""} for r in gold})
    cells = res["official"]["four_dimensional"]
    assert cells["RoteMemorization (Strict)"] == "n/a (0)" and cells["RoteMemorization (Loose)"] == "n/a (0)"
    assert cells["Score (Strict)"] == "0.00%" and cells["InsufficientKnowledge (Strict)"] == "100.00% (525)"
    assert res["four_dimensional"]["RM_strict"]["rate"] is None
    assert sum("rate is n/a" in w for w in res["warnings"]) == 2


# ---------------------------------------------------------------- accuracy table


def test_domain_accuracy_is_unweighted_over_leaves():
    nodes = [{"root2": "Direction", "full node": "Position_Direction_L1"},
             {"root2": "Direction", "full node": "Position_Direction_L2"},
             {"root2": "Route Map", "full node": "Position_Route Map_L3"}]  # fmt: skip
    probs = [
        {"steps": 2, "jokers": [True, False], "concepts": ["L1", "L1"], "multi": True},
        {"steps": 2, "jokers": [False, False], "concepts": ["L1", "L1"], "multi": None},  # Jm missing
        {"steps": 2, "jokers": [True, None], "concepts": ["L2", None], "multi": False},
    ]
    acc = accuracy_table(probs, nodes)
    # L1: T F F F = 0.25; L2: T = 1.0 -> Direction (0.25 + 1.0) / 2 = 0.625 (row-weighted would be 2/5)
    assert acc["Direction"] == 0.625 and acc["One-step(S1)"] == 2 / 5
    assert acc["Two-step(S2)"] == 1 / 2 and math.isnan(acc["Three-step(S3)"]) and math.isnan(acc["Route Map"])
    cells = accuracy_row(acc)
    assert (
        cells["Direction"] == "62.50%" and cells["Route Map"] == "nan%" and cells["Three-step(S3)"] == "nan%"
    )
    assert cells["Position"] == ""  # a domain absent from the nodes: an empty CSV cell


def test_kahan_mean_matches_pandas_groupby():
    # pandas' groupby mean sums with Kahan compensation: ten 0.1s give exactly 0.1, a plain sum does not
    assert _kahan_mean([0.1] * 10) == 0.1 and sum([0.1] * 10) / 10 == 0.09999999999999999
    assert _kahan_mean([0.5, float("nan"), 1.0]) == 0.75 and math.isnan(_kahan_mean([]))


# ---------------------------------------------------------------- reading predictions


def test_read_predictions_formats(wemath_dir, tmp_path):
    bench = WeMath()
    official = bench.read_predictions(wemath_dir / "synthetic/wemath_synth_gold.json")
    assert list(official)[:3] == ["1", "2", "8"] and len(official) == 28  # keyed by question number, in order
    rows = [{"ID": "2steps_1", "key": "2steps_1", "answer": "A", "response": "Answer: A"},
            {"ID": "2steps_1", "key": "2steps_2", "answer": "B", "response": "Answer: B"}]  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert list(bench.read_predictions(tmp_path / "p.json")) == ["2steps_1/2steps_1", "2steps_1/2steps_2"]
    (tmp_path / "dup.json").write_text(json.dumps(rows + rows[:1]))
    with pytest.raises(ValueError, match="duplicate id '2steps_1/2steps_1'"):
        bench.read_predictions(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"ID": "x", "response": ""}]))
    with pytest.raises(ValueError, match="row 0: missing required field 'key'"):
        bench.read_predictions(tmp_path / "bad.json")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "1", "response": "Answer: \xe9 B"}\n')
    assert bench.read_predictions(tmp_path / "latin1.jsonl")["1"]["response"] == "Answer: \ufffd B"
