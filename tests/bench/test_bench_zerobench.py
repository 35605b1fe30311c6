"""ZeroBench (`mmrlsd/bench/zerobench.py`): the official extraction and matching rule with each of its quirks,
pass@k and k/k reliability, the prompt, score-only from a parquet gold file, and generate-and-score with a
tiny model on a local gold file whose images are stored as bytes."""

from __future__ import annotations

import io
import json
import random
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from mmrlsd.bench.zerobench import INSTRUCTION, ZeroBench, build_prompt, is_correct, parse_answer
from mmrlsd.cli import main

BENCH = ZeroBench()
SCHEMA = {"bench", "split", "mode", "n", "correct", "accuracy", "breakdown", "items"}


def official(response: str, gold: str) -> bool:
    """The rule exactly as published with the dataset (regex and all), for comparison."""
    formatted = response.strip().lower()
    try:
        parsed = re.findall(r"\{(.*?)\}", formatted)[-1]
    except IndexError:
        parsed = ""
    return parsed[: len(gold)].lower() == gold.strip().lower() and len(parsed) == len(gold.strip())


@pytest.mark.parametrize(
    "response, gold, parsed, correct",
    [
        ("So the total is {11.90}", "11.90", "11.90", True),
        ("{ Paris }", "Paris", " paris ", False),  # the text inside the braces is not stripped
        ("{PARIS}", "Paris", "paris", True),  # lower-cased on both sides
        ("first {3} then {4}", "3", "4", False),  # the last {...} wins
        ("{11.9}", "11.90", "11.9", False),  # numbers compare as strings
        ("{$11.90}", "11.90", "$11.90", False),
        ("The answer is 11.90.", "11.90", "", False),  # no braces: empty prediction
        ("no braces at all", "", "", True),  # ...which matches an empty gold
        ("{{x}}", "x", "{x", False),  # lazy match from the first "{"
        ("{a{b}", "a{b", "a{b", True),
        ("{11.\n90}", "11.90", "", False),  # "." does not cross a line break
        ("{7}\nthen {11.\n90}", "7", "7", True),  # so the last complete {...} on one line wins
        ("{11.90}", " 11.90 ", "11.90", True),  # the gold is stripped
        ("   {Yes}   ", "yes", "yes", True),
        # "İ".lower() has 2 code points: the length test, on the gold as written, always fails
        ("{İ}", "İ", "i\u0307", False),
        ("{}", "0", "", False),
        ("{a}{b}", "b", "b", True),
    ],
)
def test_official_rule_quirks(response, gold, parsed, correct):
    assert parse_answer(response) == parsed
    assert is_correct(parse_answer(response), gold) is correct
    assert official(response, gold) is correct  # the published rule agrees, quirks included


def test_parse_answer_equals_the_published_regex_on_random_strings():
    rng = random.Random(0)
    parts = ["{", "}", "a", "B", " ", "\n", "{x}", "\r", "İ", "1.5"]
    for _ in range(30_000):
        s = "".join(rng.choice(parts) for _ in range(rng.randint(0, 14)))
        found = re.findall(r"\{(.*?)\}", s.strip().lower())
        assert parse_answer(s) == (found[-1] if found else ""), repr(s)


def test_adversarial_responses_are_wrong_fast(adversarial):
    name, response = adversarial  # shared adversarial responses (tests/bench/conftest.py)
    gold = [{"question_id": "1", "question_answer": "11.90"}, {"question_id": "2", "question_answer": "7"}]
    t0 = time.perf_counter()
    preds = {rid: {"id": rid, "response": response} for rid in ("1", "2")}
    result = BENCH.score(gold, preds)
    assert time.perf_counter() - t0 < 1.0, name
    assert result["correct"] == 0, name


def test_unbalanced_braces_stay_linear():
    # upstream's regex rescans to the end of the line from every "{": quadratic without a "}"
    t0 = time.perf_counter()
    assert parse_answer("{" * 200_000) == "" and parse_answer("{" * 200_000 + "}") == "{" * 199_999
    assert time.perf_counter() - t0 < 1.0


def test_prompt_appends_the_instruction():
    rec = {"question_id": "1", "question_text": "How much do I save? Give your final answer in dollars."}
    assert build_prompt(rec) == (
        "How much do I save? Give your final answer in dollars.\n\n\n"
        "Let's think step by step and give the final answer in curly braces, like this: {final answer}"
    )
    assert BENCH.prompt(rec).endswith(INSTRUCTION) and BENCH.record_id({"question_id": 7}) == "7"


GOLD = [
    {"question_id": "1", "question_answer": "11.90"},
    {"question_id": "2", "question_answer": "Paris"},
    {"question_id": "3", "question_answer": "42"},
    {"question_id": "4", "question_answer": "blue"},
]


def test_pass_at_k_and_reliability():
    # samples correct: 5/5, 1/5, 0/5, 4/5 (the last sample of "4" has no braces)
    preds = {
        "1": {"id": "1", "response": "{11.90}", "responses": ["{11.90}"] * 5},
        "2": {"id": "2", "response": "{ Paris }", "responses": ["{x}", "{x}", "{paris}", "{x}", "{x}"]},
        "3": {"id": "3", "response": "{41}", "responses": ["{41}"] * 5},
        "4": {"id": "4", "response": "{blue}", "responses": ["{Blue}"] * 4 + ["blue"]},
    }
    result = BENCH.score(GOLD, preds, split="zerobench")
    assert SCHEMA <= set(result) and result["bench"] == "zerobench" and result["mode"] == "official"
    assert (result["n"], result["correct"], result["accuracy"]) == (4, 2, 0.5)  # pass@1: the greedy responses
    assert result["pass_at_k"] == {"k": 5, "n": 4, "pass@5": 3 / 4, "5/5": 1 / 4}
    assert result["leaderboard"] == {"pass@1": 50.0, "pass@5": 75.0, "5/5": 25.0}
    assert result["items"]["2"] == {"prediction": " paris ", "correct": False, "samples_correct": 1}
    assert [result["items"][r]["samples_correct"] for r in "1234"] == [5, 1, 0, 4]
    json.dumps(result, allow_nan=False)


def test_pass_at_k_needs_the_same_k_everywhere():
    preds = {"1": {"id": "1", "response": "{11.90}", "responses": ["{11.90}"] * 5},
             "2": {"id": "2", "response": "{paris}", "responses": ["{paris}"] * 4}}  # fmt: skip
    with pytest.raises(ValueError, match=r"same number k >= 1 .*counts \[4, 5\]"):
        BENCH.score(GOLD, preds)
    with pytest.raises(ValueError, match="'2' has none"):
        BENCH.score(GOLD, {"1": preds["1"], "2": {"id": "2", "response": "{paris}"}})
    with pytest.raises(ValueError, match="record '1': 'responses' must be a list"):
        BENCH.score(GOLD, {"1": {"id": "1", "response": "x", "responses": "{11.90}"}})


def test_greedy_only_has_no_pass_at_k_and_warns_about_gaps():
    result = BENCH.score(GOLD, {"1": {"id": "1", "response": "{11.90}"}, "9": {"id": "9", "response": "{1}"},
                                "2": {"id": "2", "response": None}})  # fmt: skip
    assert "pass_at_k" not in result and result["leaderboard"] == {"pass@1": 50.0}
    assert result["items"]["2"] == {"prediction": "", "correct": False}
    assert "1 prediction ids are not in the gold" in result["warnings"][0]
    assert "2 of 4 gold ids have no prediction" in result["warnings"][1]
    with pytest.raises(ValueError, match="none of the 1 prediction ids is in the gold zerobench_sub"):
        BENCH.score(GOLD, {"1_1": {"id": "1_1", "response": "{1}"}}, split="zerobench_subquestions")
    with pytest.raises(KeyError, match="record '1': missing required field 'question_answer'"):
        BENCH.score([{"question_id": "1"}], {"1": {"id": "1", "response": "{1}"}})
    numeric = BENCH.score([{"question_id": 5, "question_answer": 12}], {"5": {"response": "{12}"}})
    assert numeric["correct"] == 1  # a gold read from JSON as a number compares as its str


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def write_gold_parquet(path: Path, split: str = "zerobench") -> Path:
    """A gold file in the dataset's parquet layout: `question_images_decoded` is a list of {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("question_id", pa.string()), ("question_text", pa.string()),
                        ("question_images_decoded", pa.list_(image)), ("question_answer", pa.string()),
                        ("question_images", pa.list_(pa.string())), ("image_attribution", pa.string())])  # fmt: skip
    rows = [
        {"question_id": "1", "question_text": "What colour is the square?",
         "question_images_decoded": [{"bytes": _png("red"), "path": "1_0.png"}], "question_answer": "red",
         "question_images": ["images/1_0.png"], "image_attribution": "Own"},
        {"question_id": "2", "question_text": "How many images are there?",
         "question_images_decoded": [{"bytes": _png("blue"), "path": "2_0.png"},
                                     {"bytes": _png("green"), "path": "2_1.png"}],
         "question_answer": "2", "question_images": ["images/2_0.png", "images/2_1.png"],
         "image_attribution": "Own"},
    ]  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"{split}-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    return out


def test_load_parquet_and_images(tmp_path):
    data = write_gold_parquet(tmp_path / "data")
    records = BENCH.load(str(data), "zerobench")
    assert [BENCH.record_id(r) for r in records] == ["1", "2"]
    assert BENCH.load(str(tmp_path), "zerobench") == records  # a folder: <split>-*.parquet below it
    images = BENCH.images(records[1], None)
    assert [img.getpixel((0, 0)) for img in images] == [(0, 0, 255), (0, 128, 0)]  # both, in order
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "white").save(tmp_path / "images" / "1_0.png")
    by_path = {"question_id": "1", "question_images": ["images/1_0.png"]}  # no decoded images: paths
    assert BENCH.images(by_path, tmp_path)[0].getpixel((0, 0)) == (255, 255, 255)
    decoded = {"question_id": "3", "question_images_decoded": [Image.new("L", (4, 4), 200)]}  # PIL (datasets)
    (pil,) = BENCH.images(decoded, None)
    assert (pil.mode, pil.getpixel((0, 0))) == ("RGB", (200, 200, 200))
    with pytest.raises(ValueError, match="record '4': question images must be a list"):
        BENCH.images({"question_id": "4", "question_images_decoded": "x.png"}, None)
    with pytest.raises(FileNotFoundError, match="no zerobench_subquestions-\\*.parquet"):
        BENCH.load(str(tmp_path), "zerobench_subquestions")


def test_score_only_cli_with_parquet_and_jsonl_gold(tmp_path, capsys):
    data = write_gold_parquet(tmp_path / "data")
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(
        json.dumps({"id": "1", "response": "It is {Red}", "responses": ["{red}", "{blue}"]}) + "\n"
        + json.dumps({"id": "2", "response": "{ 2 }", "responses": ["{2}", "{2}"]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out" / "zb.json"
    argv = ["--bench", "zerobench", "--predictions", str(pred), "--data", str(data), "--mode", "official",
            "--output", str(out)]  # fmt: skip
    assert main(["eval", *argv]) == 0
    result = json.loads(out.read_text())
    assert SCHEMA <= set(result) and result["split"] == "zerobench" and set(result["items"]) == {"1", "2"}
    assert (result["correct"], result["pass_at_k"]) == (1, {"k": 2, "n": 2, "pass@2": 1.0, "2/2": 0.5})
    assert "| 2 | 1 | 50.00% |" in capsys.readouterr().out
    gold_jsonl = tmp_path / "gold.jsonl"  # the same gold as JSONL rows with the dataset's columns
    gold_jsonl.write_text("".join(json.dumps({"question_id": q, "question_text": "t", "question_answer": a}) + "\n"
                                  for q, a in (("1", "red"), ("2", "2"))))  # fmt: skip
    argv[argv.index(str(data))] = str(gold_jsonl)
    assert main(["eval", *argv]) == 0
    assert json.loads(out.read_text())["items"] == result["items"]


def test_generate_and_score_with_samples(tiny_model, tmp_path):
    data = write_gold_parquet(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--bench", "zerobench", "--model", str(tiny_model("qwen2_5_vl")), "--data", str(data),
            "--output-dir", str(out), "--max-new-tokens", "3", "--batch-size", "2", "--samples", "2",
            "--engine", "hf", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(["eval", *argv]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2"] and all(len(r["responses"]) == 2 for r in rows)
    assert rows[0]["prompt"] == f"What colour is the square?\n\n\n{INSTRUCTION}"
    result = json.loads((out / "scores.json").read_text())
    assert (result["bench"], result["split"], result["n"]) == ("zerobench", "zerobench", 2)
    assert result["pass_at_k"]["k"] == 2 and result["generation"]["samples"] == 2
    assert result["generation"]["sample_temperature"] == 0.7
    again = BENCH.score(BENCH.load(str(data), "zerobench"), BENCH.read_predictions(out / "predictions.jsonl"),
                        split="zerobench")  # fmt: skip
    assert again["items"] == result["items"] and again["pass_at_k"] == result["pass_at_k"]
