"""MMMU: parity for both official entry points (4 whole subjects in the repository, all 30 when the full
files are present), the parsers' quirks, the seeded fallback, the prompt."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
from reference_files import FIXTURES, TIERS, tier_root

from mmrlsd.bench.mmmu import (
    MMMU,
    SUBJECTS,
    UPSTREAM_NUMBER_PATTERNS,
    eval_open,
    extract_numbers,
    gold_answer,
    normalize_str,
    parse_multi_choice_response,
    parse_open_response,
    parse_options,
    subject_of,
)

BENCH = MMMU()


def load_gold(root):
    return root, BENCH.load(str(root / "mmmu" / "answer_dict_val.json"), "validation")


@pytest.fixture(scope="module", params=TIERS)
def mm(request):
    """(root, gold) of the in-repo subset (Design, Geography, Pharmacy, Psychology), then of the full files."""
    return load_gold(tier_root(request.param) / "mmmu")


@pytest.fixture(scope="module")
def mm_small():
    return load_gold(FIXTURES / "mmmu")


def _as_set(xs):
    return {(type(x).__name__, x) for x in xs}  # floats and strings stay distinct


def test_parse_and_eval_parity(mm):
    root, gold = mm
    t0 = time.perf_counter()
    result = BENCH.score(gold, BENCH.read_predictions(root / "mmmu/example_outputs/llava1.5_13b"))
    assert time.perf_counter() - t0 < 10
    per_item = json.loads((root / "official_rerun/parse_and_eval_llava1.5_13b_per_item.json").read_text())
    assert set(result["items"]) == set(per_item) and len(per_item) in (120, 900)
    for rid, ref in per_item.items():
        item = result["items"][rid]
        if isinstance(ref["parsed_pred"], list):
            assert _as_set(item["prediction"]) == _as_set(ref["parsed_pred"]), rid
        else:
            assert item["prediction"] == ref["parsed_pred"], rid
        assert item["correct"] == (ref["judge"] == "Correct"), rid
    subjects = json.loads(
        (root / "official_rerun/parse_and_eval_llava1.5_13b_subject_results.json").read_text()
    )
    assert result["subject_results"] == {s: subjects[s] for s in result["subject_results"]}
    assert len(result["subject_results"]) == len(per_item) // 30
    # the fallback is reached twice (both subjects are in the subset), and draws "A" both times
    assert result["fallbacks"] == ["validation_Design_4", "validation_Psychology_4"] and result["seed"] == 42
    assert result["items"]["validation_Design_4"]["prediction"] == "A"
    assert result["items"]["validation_Geography_22"] == {"prediction": [3.0], "correct": True}
    assert result["items"]["validation_Pharmacy_19"] == {"prediction": ["step b"], "correct": True}
    if len(per_item) == 900:  # aggregated, parse-and-eval gives exactly the eval-only result
        eval_only = json.loads(
            (root / "official_rerun/eval_only_llava1.5_13b_total_val_output.json").read_text()
        )
        assert result["official"] == eval_only and list(result["official"]) == list(eval_only)
        # 330/900: MC 328/847, open 2/53
        assert (result["correct"], result["n"]) == (330, 900)
        assert result["breakdown"]["question_type"]["multiple-choice"]["correct"] == 328
        assert result["breakdown"]["question_type"]["open"] == {"correct": 2, "total": 53, "accuracy": 2 / 53}


@pytest.mark.parametrize(
    "preds, ref, correct",
    [
        ("llava1.5_13b/total_val_output.json", "eval_only_llava1.5_13b_total_val_output.json", 330),
        ("llava1.5_13b_val.json", "eval_only_llava1.5_13b_val.json", 324),
    ],
)
def test_eval_only_parity(mm, preds, ref, correct):
    root, gold = mm
    result = BENCH.score(gold, BENCH.read_predictions(root / "mmmu/example_outputs" / preds))
    expected = json.loads((root / "official_rerun" / ref).read_text())
    if result["n"] == 900:  # num, acc (3 d.p.) and order of every key
        assert result["official"] == expected and list(result["official"]) == list(expected)
        assert (result["correct"], result["fallbacks"]) == (correct, [])
    else:  # the subset's subjects: their {num, acc} entries
        subjects = ["Design", "Geography", "Pharmacy", "Psychology"]
        assert result["n"] == 120 and result["fallbacks"] == []
        assert {s: result["official"][s] for s in subjects} == {s: expected[s] for s in subjects}


def test_single_subject_file_and_missing_gold(mm_small):
    root, gold = mm_small
    preds = BENCH.read_predictions(root / "mmmu/example_outputs/llava1.5_13b/Design/output.json")
    result = BENCH.score(gold, preds)
    assert result["n"] == 30 and list(result["official"]) == ["Overall-Art and Design", "Design"] + [
        f"Overall-{d}" for d in ("Business", "Science", "Health and Medicine", "Humanities and Social Science",
                                 "Tech and Engineering")] + ["Overall"]  # fmt: skip
    assert result["official"]["Overall-Business"] == {"num": 0, "acc": 0}
    with pytest.raises(KeyError, match="record 'validation_Design_99'"):
        BENCH.score(gold, {"validation_Design_99": {"id": "validation_Design_99", "prediction": "A"}})


def test_random_fallback_stream():
    rng = random.Random(42)
    assert [rng.choice(["A", "B", "C", "D"]) for _ in range(2)] == [
        "A",
        "A",
    ]  # the draws of the two fallbacks
    rng = random.Random(42)
    # "A) Josef Albers": no "(A)", no " A " (padding gives " A) Josef Albers "), 3 words -> fallback
    assert parse_multi_choice_response("A) Josef Albers", ["A", "B", "C", "D"], {}, rng) == ("A", True)


IDX = {"A": "red apple", "B": "blue", "C": "green", "D": "the A team"}
LETTERS = ["A", "B", "C", "D"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("(B)", "B"),
        ("B.", "B"),  # '.' stripped, padded " B "
        ("'C'", "C"),  # quotes stripped at both ends
        ("(A) or (C)", "C"),  # two bracketed: the last occurrence wins
        ("(C) then (A) then (C)", "C"),  # rfind of (C) is rightmost
        ("I think B or maybe D", "D"),  # spaced letters: rightmost
        ("The answer is clearly blue I would say", "B"),  # > 5 words: option text
        ("my guess would be red apple or green stuff", "C"),  # two texts: rightmost start
        ("b", None),  # lower-case is not a letter candidate, 1 word: fallback
    ],
)
def test_multi_choice_parser(response, expected):
    pred, fell_back = parse_multi_choice_response(response, LETTERS, IDX, random.Random(42))
    assert fell_back == (expected is None)
    if expected is not None:
        assert pred == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("3", [3.0]),
        # key "1,234.5" -> 1234.5; comma pattern "1,234" -> 1234.0; simple pattern "234.5" ("1" is followed by ",")
        ("The answer is 1,234.5", [1234.5, 1234.0, 234.5]),
        ("So the result is step B.", ["step b"]),  # lower-cased, trailing '.' stripped
        ("x = 2e3", [2000.0, 3.0]),  # key "2e3" -> 2000.0; upstream quirk: the simple pattern also finds "3"
        ("Paris", ["paris"]),
        ("a", [" a", "a "]),  # 1-char strings are padded
    ],
)
def test_open_parser(response, expected):
    assert _as_set(parse_open_response(response)) == _as_set(expected)


def test_open_matching():
    assert eval_open("B", ["step b"])  # " b" in "step b" (validation_Pharmacy_19)
    assert eval_open("3", [3.0]) and eval_open(["24/7", "3.429"], [3.43])  # golds round to 2 d.p.
    assert not eval_open("3", ["3.0 apples"])  # the string gold "3" is normalised to the float 3.0
    assert not eval_open("12", [1.2])
    assert normalize_str(" 1,000 ") == [1000.0] and normalize_str("Tampa") == ["tampa"]


def test_number_patterns_equal_upstream_on_random_strings():
    upstream = [re.compile(p) for p in UPSTREAM_NUMBER_PATTERNS]
    rng = random.Random(0)
    alphabet = "0123456789.,-eE+ a_\n\u0663"  # includes an Arabic-Indic digit (\d is Unicode)
    for _ in range(30_000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert extract_numbers(s) == [m for p in upstream for m in p.findall(s)], s


def test_prompt_and_images():
    rec = {"id": "validation_Art_1", "question": "Which <image 1>?", "options": "['x', \"y's\"]",
           "question_type": "multiple-choice", "answer": "A"}  # fmt: skip
    assert BENCH.prompt(rec) == (
        "Which <image 1>?\n(A) x\n(B) y's\n\nAnswer with the option's letter from the given choices directly."
    )
    rec_open = {"id": "validation_Math_1", "question": "How many?", "question_type": "open"}
    assert BENCH.prompt(rec_open) == "How many?\nAnswer the question using a single word or phrase."
    assert BENCH.prediction_fields(rec) == {"question_type": "multiple-choice", "answer": "A",
                                            "all_choices": ["A", "B"], "index2ans": {"A": "x", "B": "y's"}}  # fmt: skip


def test_options_are_never_evaluated():
    with pytest.raises(ValueError, match="record 'r1': unparseable options"):
        parse_options("__import__('os').system('echo pwned')", "r1")
    with pytest.raises(ValueError, match="not a list"):
        parse_options("{'a': 1}", "r1")
    assert gold_answer("['24/7', '3.429']") == ["24/7", "3.429"] and gold_answer("[x") == "[x"


def test_subject_order_and_ids():
    assert (
        SUBJECTS[:3] == ["Accounting", "Agriculture", "Architecture_and_Engineering"] and len(SUBJECTS) == 30
    )
    assert subject_of("validation_Art_Theory_3") == "Art_Theory"


def test_adversarial_responses_are_wrong_fast(mm_small, adversarial):
    _, gold = mm_small
    gold = gold + [{"id": "validation_Math_15", "question_type": "short-answer", "answer": ["24/7", "3.429"]}]
    name, response = adversarial
    rows = {
        # multiple choice with options given as a parse-and-eval row, and two open questions
        "validation_Design_1": {"response": response, "all_choices": LETTERS, "index2ans": IDX},
        "validation_Math_15": {"response": response},  # gold ['24/7', '3.429']
        "validation_Geography_22": {"response": response},  # gold '3'
    }
    t0 = time.perf_counter()
    result = BENCH.score(gold, rows)
    assert time.perf_counter() - t0 < 2.0, name
    assert not result["items"]["validation_Math_15"]["correct"], name
    assert not result["items"]["validation_Geography_22"]["correct"], name
    assert result["items"]["validation_Design_1"]["prediction"] in LETTERS


def test_raw_response_without_options_names_the_record(mm_small):
    _, gold = mm_small
    with pytest.raises(KeyError, match="record 'validation_Design_1'.*needs the options"):
        BENCH.score(gold, {"validation_Design_1": {"response": "(A)"}})
    result = BENCH.score(gold, {"validation_Geography_22": {"id": "validation_Geography_22", "other": 1}})
    assert "no response or prediction" in result["warnings"][0]
