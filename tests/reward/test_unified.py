"""Tests for mmrlsd/reward/unified.py: the released reward, routed by problem_type.

Every expected value is derived by hand from the release's rules (written out in the comments), not taken from
running its code.
"""

import doctest
import time

import pytest

from mmrlsd.reward import score_responses, unified
from mmrlsd.reward.unified import (
    extract_answer,
    gradable,
    last_boxed,
    math_equivalent,
    normalize_response,
    overlong_penalty,
    parse_choice,
    route,
    strip_math_string,
    unwrap_gold,
)
from mmrlsd.reward.verify import MathChecker, grade_answer_batch


def _one(response, answer, ptype, **kw):
    (r,) = score_responses([response], [answer], [ptype], name="unified", **kw)
    return r


def test_doctests():
    failed, attempted = doctest.testmod(unified)
    assert attempted >= 13 and failed == 0


# ------------------------------------------------------------------------------------------ preprocessing
def test_whitespace_around_tag_characters_is_removed():
    assert normalize_response("< thought > a </ thought >\n< answer > 1 / 2 </ answer >") == (
        "<thought>a</thought><answer>1/2</answer>"
    )
    assert normalize_response("x > 3 and y < 4") == "x>3 and y<4"  # the content changes too


@pytest.mark.parametrize(
    "gold, expected",
    [("$5$", "5"), ("$$ x^2 $$", "x^2"), (" 7 ", "7"), ("$5", "$5"), ("$", "$"), ("$$", ""), (None, "")],
)
def test_unwrap_gold(gold, expected):
    # "$$" is both a $$..$$ pair with nothing inside and a $..$ pair: the $$ rule comes first -> ""
    assert unwrap_gold(gold) == expected


def test_extract_answer_first_tag_boxed_fallback_and_math_empty():
    assert extract_answer("<answer>1</answer> and <answer>2</answer>") == "1"  # the FIRST tag
    assert extract_answer("<ANSWER> 3 </Answer>") == "3"  # case-insensitive
    assert (
        extract_answer("<answer><answer>5</answer></answer>") == "<answer>5"
    )  # nested: up to the first close
    assert extract_answer(r"\boxed{1} so \boxed{2}") == "2"  # the last box
    assert extract_answer(r"<answer>4</answer> \boxed{9}") == "4"  # a tag beats a box
    assert extract_answer("  just 7 ") == "just 7"  # non-math: the whole response
    assert extract_answer("  just 7 ", fallback_to_text=False) == ""  # math: nothing


def test_last_boxed_counts_every_brace():
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} \boxed{2") == "1"  # the unclosed box is ignored
    assert last_boxed(r"\boxed{ \boxed{3}") == ""  # an unclosed box swallows the rest, inner box included
    assert last_boxed(r"\boxed{}") == ""  # empty: falls through to the next rule in extract_answer


@pytest.mark.parametrize(
    "raw, expected",
    [
        (r"x = \dfrac{3}{4}", r"\frac{3}{4}"),  # one '=' -> right side; dfrac -> frac; spaces dropped
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"45^{\circ}", "45"),
        (r"12\text{ cm}", "12"),  # \text{...} goes with its content
        (r"\$3.50", "3.50"),
        ("50\\%", "50"),
        (".25", "0.25"),
        (r"y \approx 1.41", "1.41"),
        ("a = b = c", "a=b=c"),  # two '=': kept whole
    ],
)
def test_strip_math_string(raw, expected):
    assert strip_math_string(raw) == expected


def test_route():
    assert [route(t) for t in ("MATH", "Mathematics", "multiple choice", "Multiple_Choice", "number")] == [
        "math", "math", "multiple_choice", "multiple_choice", "numerical"]  # fmt: skip
    assert [route(t) for t in ("free-form", "Boolean", "OCR", "chart", "", None)] == [
        "open_ended", "boolean", "ocr", "open_ended", "open_ended", "open_ended"]  # fmt: skip
    assert (
        route("multiple-choice") == "open_ended"
    )  # the release knows only the space and underscore spellings


# ---------------------------------------------------------------------------------------------------- math
GOOD = "<thought>work</thought><answer>{}</answer>"


def test_math_reward_is_09_accuracy_plus_01_format():
    r = _one(GOOD.format("42"), "42", "math")
    assert (r.reward, r.accuracy, r.format, r.extracted) == (1.0, 1.0, 1.0, "42")
    r = _one("<answer>42</answer>", "42", "math")  # no <thought>: 0.9·1 + 0.1·0
    assert (r.reward, r.accuracy, r.format) == (pytest.approx(0.9, abs=1e-12), 1.0, 0.0)
    r = _one(GOOD.format("41"), "42", "math")  # wrong but well formed: 0.9·0 + 0.1·1
    assert (r.reward, r.accuracy, r.format) == (pytest.approx(0.1, abs=1e-12), 0.0, 1.0)


def test_spaced_tags_are_read_and_count_as_format():
    r = _one("< thought > t </ thought >\n< answer > 42 </ answer >", "42", "math")
    assert (r.reward, r.accuracy, r.format) == (1.0, 1.0, 1.0)


def test_format_must_cover_the_whole_response():
    assert _one(GOOD.format("4") + " done", "4", "math").format == 0.0  # text after </answer>
    assert _one("Sure. " + GOOD.format("4"), "4", "math").format == 0.0  # text before <thought>
    assert _one("<THOUGHT>t</THOUGHT><answer>4</answer>", "4", "math").format == 0.0  # case-sensitive
    assert _one("<answer>4</answer><thought>t</thought>", "4", "math").format == 0.0  # wrong order
    assert _one("<thought>a</thought>x<thought>b</thought><answer>4</answer>", "4", "math").format == 1.0


def test_nested_answer_tags_extract_up_to_the_first_close():
    # "<answer><answer>5</answer></answer>": the lazy match stops at the first </answer> -> "<answer>5", which is
    # not "5" and (gold an integer, prediction not) mathruler refuses -> accuracy 0; the format still matches
    r = _one("<thought>t</thought><answer><answer>5</answer></answer>", "5", "math")
    assert (r.extracted, r.accuracy, r.format) == ("<answer>5", 0.0, 1.0)


def test_first_answer_tag_wins_unlike_the_math_reward():
    text = "<thought>t</thought><answer>1</answer> wait, <answer>2</answer>"
    assert _one(text, "1", "math").accuracy == 1.0 and _one(text, "2", "math").accuracy == 0.0
    (m,) = score_responses([text], ["2"], ["math"], name="math")  # the `math` reward reads the last tag
    assert m.accuracy == 1.0


def test_boxed_fallback_and_no_answer():
    r = _one(r"so the answer is \boxed{\frac{1}{2}}", "0.5", "math")  # mathruler: 1/2 - 0.5 simplifies to 0
    assert (r.extracted, r.accuracy, r.reward) == (r"\frac{1}{2}", 1.0, pytest.approx(0.9, abs=1e-12))
    r = _one("the answer is 7", "7", "math")  # neither tag nor box: math extracts "" -> 0
    assert (r.extracted, r.accuracy, r.reward) == ("", 0.0, 0.0)


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{3}{4}", r"$\frac{3}{4}$"),  # $-wrapped gold
        ("x+1", "$$x+1$$"),
        ("12", r"\boxed{12}"),  # boxed gold is unboxed
        ("12", "<answer>12</answer>"),  # so is a gold in answer tags
        ("x = 5", "5"),  # strip_math_string keeps the right side of '='
        (r"30^\circ", "30"),
        (r"5\text{ cm}", "5"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        ("0.5", r"\frac{1}{2}"),  # mathruler: sympy proves 0.5 - 1/2 = 0
        ("1+x", "x+1"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("(1, 2)", "(1,2)"),
    ],
)
def test_math_accuracy_positive(pred, gold):
    assert _one(GOOD.format(pred), gold, "math").accuracy == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("2/4", "1/2"),  # mathruler does not reduce fractions: two fractions must match as written
        (r"\frac{2}{4}", r"\frac{1}{2}"),
        ("3.5", "4"),  # an integer gold needs an integer answer
        ("(1,2)", "(2,1)"),
        ("", "1"),
        ("1", ""),
    ],
)
def test_math_accuracy_negative(pred, gold):
    assert _one(GOOD.format(pred), gold, "math").accuracy == 0.0


def test_where_unified_and_math_disagree():
    responses = [GOOD.format("2/4"), GOOD.format("3.14159")]
    uni = score_responses(responses, ["1/2", "3.14"], ["math", "numerical"], name="unified")
    mth = score_responses(responses, ["1/2", "3.14"], ["math", "numerical"], name="math")
    assert [r.accuracy for r in uni] == [0.0, 1.0]  # unreduced fraction refused; 2 decimals agree
    assert [r.accuracy for r in mth] == [1.0, 0.0]  # math-verify reduces; numbers must agree to 6 decimals


def test_grader_size_limits():
    # the grader only sees strings of <= 512 characters (and <= 8 line breaks, <= 128 words); "1+x+0+0+...+0"
    # equals x+1, but at 603 characters it is never graded (normalising changes nothing, so no second try)
    assert not gradable("1+x" + "+0" * 300) and gradable("1+x" + "+0" * 200)
    assert _one(GOOD.format("1+x" + "+0" * 200), "x+1", "math").accuracy == 1.0  # 403 characters
    assert _one(GOOD.format("1+x" + "+0" * 300), "x+1", "math").accuracy == 0.0  # 603 characters
    assert not gradable("\n".join("0123456789")) and gradable("\n".join("123456789"))  # 9 vs 8 line breaks
    assert not gradable(" ".join(["w"] * 129)) and gradable(" ".join(["w"] * 128))
    assert not gradable("   ")
    # 131 words are too many for the raw string, but normalising removes the spaces (263 characters, and it
    # differs from the raw string), so the second grader call accepts it: the release's two-stage rule
    assert _one(GOOD.format("1+x" + " +0" * 130), "x+1", "math").accuracy == 1.0


def test_math_equivalent_batches_and_decides_cheap_pairs_locally(monkeypatch):
    sent = []

    def spy(preds, golds, timeout):
        sent.extend(zip(preds, golds))
        return [False] * len(preds)

    monkeypatch.setattr(unified, "grade_answer_batch", spy)
    # equal strings, equal after strip_math_string, and empty strings never reach the grader
    assert math_equivalent(["3", "x = 3", "", "2/4"], ["3", "3", "1", "1/2"]) == [True, True, False, False]
    assert sent == [("2/4", "1/2")]
    sent.clear()
    # "y = 2/4" vs "1/2": raw pair, then the normalised pair ("2/4", "1/2") as a second try
    math_equivalent(["y = 2/4"], ["1/2"])
    assert sent == [("y = 2/4", "1/2"), ("2/4", "1/2")]


def test_overlong_penalty():
    # expected = 16384 - 3072 = 13312; 14848 is half-way through the buffer -> -0.5
    assert overlong_penalty(100) == 0.0 and overlong_penalty(13312) == 0.0
    assert (
        overlong_penalty(14848) == -0.5
        and overlong_penalty(16384) == -1.0
        and overlong_penalty(99999) == -1.0
    )
    assert overlong_penalty(60, max_length=100, buffer=20) == 0.0 and overlong_penalty(90, 100, 20) == -0.5
    rs = score_responses([GOOD.format("4")] * 3 + ["B"], ["4"] * 3 + ["B"], ["math"] * 3 + ["multiple choice"],
                         name="unified", response_lengths=[13312, 14848, 20000, 20000])  # fmt: skip
    # math: 0.9 + 0.1 + 0.1·penalty; multiple choice: no penalty
    assert [r.reward for r in rs] == pytest.approx([1.0, 0.95, 0.9, 1.0], abs=1e-12)
    assert _one(GOOD.format("4"), "4", "math").reward == 1.0  # no lengths: no penalty


# ----------------------------------------------------------------------------------------------- numerical
@pytest.mark.parametrize(
    "response, gold, acc",
    [
        ("<answer>3.14159</answer>", "3.14", 1.0),  # round(3.14159, 2) = 3.14
        ("<answer>3.146</answer>", "3.15", 1.0),  # round(3.146, 2) = 3.15
        ("<answer>3.13</answer>", "3.14", 0.0),
        ("<answer>1,234.5</answer>", "1234.50", 1.0),  # commas removed
        ("<answer>1,000</answer>", "$1000$", 1.0),
        (r"so \boxed{2.50}", "2.5", 1.0),  # boxed fallback
        ("  7.001 ", "7", 1.0),  # no tag, no box: the whole response
        ("<answer>about 3</answer>", "3", 0.0),  # not a number
        ("<answer>-0.004</answer>", "0", 1.0),  # round(-0.004, 2) = -0.0 == 0.0
        ("<answer>nan</answer>", "nan", 0.0),  # nan never equals nan
    ],
)
def test_numerical(response, gold, acc):
    r = _one(response, gold, "numerical")
    assert (r.accuracy, r.reward) == (acc, acc)  # accuracy only: no format term


def test_numerical_ignores_format():
    assert _one(GOOD.format("7"), "7", "numerical").reward == 1.0
    assert _one("<answer>7</answer>", "7", "regression").reward == 1.0


# ----------------------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (B).", "B"),  # '.' stripped; phrase " (B)" (7) and "(B)" (6)
        ("B:", "B"),  # ':' stripped -> starts with B (10)
        ("b.", "B"),  # '.' stripped -> "b" starts with B, case-insensitive (10)
        ("(c)", "C"),  # nothing case-sensitive matches; last resort: any letter (0)
        ("A is right, not B", "A"),  # starts with A (10) beats ends with B (9)
        ("I think it is D", "D"),  # ends with D (9)
        ("Option C. Yes", "C"),  # "C." (5) beats " C " ... and "YES" ends with S, not a choice
        ("the answer is B, not (A)", "A"),
        (
            "Step A. gives 2, so the answer is (C) here 1",
            "C",
        ),  # phrase (7) beats "A." (5)  # after the phrase only " B " / " B." / "(B)" count: "(A)" wins
        ("C) 3  D) 4", "C"),  # starts with C (10)
        ('"A."', "A"),  # ',' '.' ... '"' stripped one after another: '"A."' -> 'A.' -> starts with A
        ("42", ""),
        ("", ""),
        ("   ", ""),
    ],
)
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_multiple_choice_reward_is_accuracy_only():
    r = _one("<thought>t</thought><answer>B</answer>", "B", "multiple choice")
    assert (r.reward, r.accuracy, r.format) == (1.0, 1.0, 1.0)  # format reported, not rewarded
    assert _one("<answer>C</answer>", "B", "multiple choice").reward == 0.0
    assert _one("The answer is (B).", "(B) 12 apples", "multiple_choice").reward == 1.0  # gold parsed too
    assert _one("<answer>b</answer>", "$B$", "Multiple Choice").reward == 1.0


def test_multiple_choice_falls_back_to_grade_answer():
    # no letter on either side -> mathruler decides: 7/2 = 3.5
    assert _one("<answer>7/2</answer>", "3.5", "multiple choice").reward == 1.0
    assert _one("<answer>42</answer>", "42", "multiple choice").reward == 1.0
    assert _one("<answer>41</answer>", "42", "multiple choice").reward == 0.0


# ------------------------------------------------------------------------------------- open-ended and others
def test_open_ended_short_gold_exact_match():
    assert _one("<answer>paris</answer>", "Paris", "open-ended").reward == 1.0


def test_open_ended_rouge():
    # gold: the cat sat on the mat / pred: the cat sat on a mat (6 tokens each)
    # ROUGE-1 overlap 5 -> F 5/6; ROUGE-2 overlap 3 of 5 -> F 3/5; ROUGE-L LCS 5 -> F 5/6; mean 68/90
    r = _one("<answer>the cat sat on a mat</answer>", "the cat sat on the mat", "open-ended")
    assert r.reward == pytest.approx(68 / 90, abs=1e-9) and r.accuracy == r.reward
    # a short gold that does not match exactly still gets ROUGE: "Paris" vs "paris france"
    # R1 F = 2·(1/2·1)/(1/2+1) = 2/3; R2: no gold bigram -> 0; RL = 2/3; mean 4/9
    assert _one("<answer>paris france</answer>", "Paris", "free-form").reward == pytest.approx(
        4 / 9, abs=1e-9
    )


def test_unknown_and_missing_types_score_as_open_ended():
    expected = 68 / 90
    for ptype in ("chart", "", None, "multiple-choice"):
        r = _one("<answer>the cat sat on a mat</answer>", "the cat sat on the mat", ptype)
        assert r.reward == pytest.approx(expected, abs=1e-9)
    assert _one("the mat", "", None).reward == 0.0  # empty gold


def test_ocr_boolean_critic_grounding_code():
    # OCR: 1 - WER; "hello world bar" vs "Hello World foo": 1 substitution in 3 words
    assert _one("<answer>hello world bar</answer>", "Hello World foo", "ocr").reward == pytest.approx(2 / 3)
    assert _one("<answer>a b c d e f</answer>", "x", "ocr").reward == 0.0  # WER 6 -> clipped at 0
    assert [_one(f"<answer>{p}</answer>", g, "boolean").reward for p, g in
            [("True", "yes"), ("no", "0"), ("YES", "Yes"), ("maybe", "no")]] == [1.0, 1.0, 1.0, 0.0]  # fmt: skip
    assert _one("<answer>Response 2 is better</answer>", "Response 2", "critic").reward == 1.0
    assert _one("<answer>both are equally good</answer>", "Tie", "llava").reward == 1.0
    assert _one("<answer>unsure</answer>", "unsure", "critic").reward == 0.0  # unreadable labels never match
    # boxes [0,0,10,10] and [5,5,15,15]: intersection 25, union 100 + 100 - 25 = 175
    box = '<answer>{"boxes": [0, 0, 10, 10]}</answer>'
    assert _one(box, '{"boxes": [5, 5, 15, 15]}', "spatial grounding").reward == pytest.approx(1 / 7)
    assert _one('<answer>{"time": [0, 10]}</answer>', '{"time": [5, 15]}', "temporal grounding").reward == (
        pytest.approx(1 / 3)
    )  # overlap 5, union 15
    assert _one("<answer>[1, 2]</answer>", '{"boxes": [0, 0, 1, 1]}', "spatial grounding").reward == 0.0
    assert _one("<answer>print(1)</answer>", "1", "code").reward == 0.0  # model output is never run
    # SVG: gold tags {svg, rect}, answer has both -> 0.7; lengths equal -> 0.3
    svg = "<svg><rect/></svg>"
    assert _one(f"<answer>{svg}</answer>", svg, "svg-code").reward == pytest.approx(1.0)
    assert _one("<answer>no markup</answer>", svg, "svg-code").reward == 0.0


# ------------------------------------------------------------------------------------------------ robustness
def test_bad_records_score_zero_and_the_batch_goes_on(monkeypatch):
    real = unified.parse_choice

    def boom(text):
        if text == "Z":
            raise RuntimeError("bug")
        return real(text)

    monkeypatch.setattr(unified, "parse_choice", boom)
    rs = score_responses(["<answer>Z</answer>", None, "<answer>B</answer>", 7], ["A", "1", "B", "1"],
                         ["multiple choice", "math", "multiple choice", "numerical"], name="unified")  # fmt: skip
    assert [(r.reward, r.accuracy) for r in rs] == [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.0, 0.0)]


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="2 responses, 1 answers"):
        score_responses(["a", "b"], ["a"], ["math", "math"], name="unified")


def test_adversarial_answers_score_zero_within_the_time_limit():
    # "9**9**9" against a symbolic gold makes sympy build a ~370-million-digit integer: the worker is killed
    # after `timeout` and the answer scores 0 (a multiple-choice record without letters reaches the grader too)
    start = time.monotonic()
    rs = score_responses([GOOD.format("9**9**9"), "<answer>9**9**9</answer>", GOOD.format("x")],
                         ["x", "x", "x"], ["math", "multiple choice", "math"], name="unified", timeout=1.0)  # fmt: skip
    assert [r.accuracy for r in rs] == [0.0, 0.0, 1.0]
    assert time.monotonic() - start < 20  # two timeouts of 1 s plus worker restarts, never a hang


def test_grade_answer_batch_in_the_worker():
    with MathChecker() as checker:
        got = grade_answer_batch(["0.5", "2/4", None, "B", "9**9**9"], [r"\frac{1}{2}", "1/2", "1", "b", "x"],
                                 timeout=1.0, checker=checker)  # fmt: skip
        assert got == [True, False, False, True, False]
        assert checker.restarts == 1  # the 9**9**9 pair ran out of time
        assert grade_answer_batch(["x+1"], ["1+x"], checker=checker) == [True]  # the new worker serves
