"""Tests for mmrlsd/reward/answer.py: extraction, format, normalisation, multiple-choice letters."""

import doctest
import random
import time
from decimal import Decimal

import pytest

from mmrlsd.reward import answer
from mmrlsd.reward.answer import (
    FORMAT_PATTERN,
    choice_equal,
    extract_answer,
    extract_answer_tag,
    extract_boxed,
    format_ok,
    normalize_choice,
    parse_number,
    strip_latex,
)


def test_doctests():
    failed, attempted = doctest.testmod(answer)
    assert attempted >= 15 and failed == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{3}", "3"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last one
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"\boxed{\boxed{4}}", r"\boxed{4}"),  # a box inside a box is content of the outer one
        (r"\fbox{5}", "5"),
        (r"\boxed { 6 }", "6"),  # space before the brace, content stripped
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are text
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        (r"\boxed{}", ""),
        (r"\boxed{7} and a truncated \boxed{8", "7"),  # unclosed box skipped
        (r"\boxed{9", None),
        ("no box here", None),
        ("", None),
        (None, None),
        (r"\boxed 5", None),  # only the braced form counts
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_adversarial_input():
    # 100k characters of unclosed boxes and deep nesting: one pass, well under a second
    for text in [r"\boxed{" * 14_000, "{" * 100_000, r"\boxed{" + "{" * 50_000 + "}" * 50_000 + "}"]:
        t0 = time.perf_counter()
        extract_boxed(text)
        assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>1</answer>", "1"),
        ("<answer>1</answer> then <answer> 2 </answer>", "2"),
        ("<answer>1</answer> <answer>2", "1"),  # the last complete pair
        ("<answer>", None),
        ("</answer>", None),
        ("<answer></answer>", ""),
        ("<answer>a\nb</answer>", "a\nb"),
    ],
)
def test_extract_answer_tag(text, expected):
    assert extract_answer_tag(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"<thought>\boxed{1}</thought><answer>2</answer>", "2"),  # <answer> wins over an earlier box
        (r"<answer>2</answer> later \boxed{3}", "2"),  # <answer> wins even over a later box
        (r"<answer>the value is \boxed{2}.</answer>", "2"),  # box inside the answer unwrapped
        (r"<thought>x</thought> \boxed{ 3 }", "3"),  # no <answer>: last box
        ("<answer> B </answer>", "B"),
        ("plain text", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<thought>t</thought><answer>a</answer>", True),
        ("  \n<thought>t</thought>\nso\n<answer>a</answer>\n ", True),  # outer whitespace, text between
        ("<thought></thought><answer></answer>", True),  # empty blocks still match the pattern
        ("<thought>a</thought><answer>b</thought></answer>", True),  # .* spans tags, as in the regex
        ("<thought>t</thought><answer>a</answer> extra", False),  # text after </answer>
        ("intro <thought>t</thought><answer>a</answer>", False),  # text before <thought>
        ("<thought>t<answer>a</answer>", False),  # no </thought>
        ("<answer>a</answer><thought>t</thought>", False),  # wrong order
        ("<thought>t</answer>", False),
        ("<thought></thought></answer>", False),  # no <answer>
        ("<thought>t</thought><answer>", False),
        ("<answer>a</answer>", False),
        ("", False),
        (None, False),
    ],
)
def test_format_ok(text, expected):
    assert format_ok(text) is expected
    if text is not None:
        assert (FORMAT_PATTERN.fullmatch(text) is not None) is expected


def test_format_ok_agrees_with_the_regex_on_random_strings():
    pieces = ["<thought>", "</thought>", "<answer>", "</answer>", "x", " ", "\n", "<", ">"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        if rng.random() < 0.7:  # mostly near-misses of the right shape
            text = "<thought>" + text + "</answer>"
        assert format_ok(text) == (FORMAT_PATTERN.fullmatch(text) is not None), repr(text)


@pytest.mark.parametrize(
    "text",
    [
        "<thought>" + "</thought>" * 10_000,  # many closers, no answer: the regex would backtrack
        "<thought>" + "x" * 100_000 + "</thought><answer>" + "<answer>" * 10_000,
        "<thought>" + "</thought><answer>" * 10_000 + "</answer>",
        " " * 100_000 + "<thought>",
    ],
)
def test_format_ok_is_linear_time(text):
    t0 = time.perf_counter()
    format_ok(text)
    assert time.perf_counter() - t0 < 0.1


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$3$", "3"),
        (r"\left( 1, 2 \right)", "( 1, 2 )"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        ("30°", "30"),
        (r"50\%", "50%"),
        (r"\text{\textbf{B}}", "B"),  # nested wrappers
        (r"12\,\text{cm}", "12cm"),
        (r"\displaystyle \frac{1}{2}.", r"\frac{1}{2}"),
        ("x = 2 ", "x = 2"),
        (r"\left[0, \infty\right)", r"[0, \infty)"),
        (r"x \rightarrow \leftarrow", r"x \rightarrow \leftarrow"),  # arrows are not \left / \right
    ],
)
def test_strip_latex(raw, expected):
    assert strip_latex(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("3", Decimal(3)),
        (" 3.0 ", Decimal(3)),  # Decimal("3.0") == Decimal(3)
        ("-3.50", Decimal("-3.5")),
        (".5", Decimal("0.5")),
        ("+2", Decimal(2)),
        ("1,000,000.5", Decimal("1000000.5")),
        ("1,2", None),  # may be a tuple
        ("1,00", None),  # not a thousands separator
        ("1e3", None),  # math-verify reads 1e3 as 1*e^3, so we do not call it a number
        ("1/2", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
        ("9" * 65, None),  # too long to be a plain answer
    ],
)
def test_parse_number(raw, expected):
    assert parse_number(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("[b]", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B:", "B"),
        ("Option B", "B"),
        ("option (b)", "B"),
        ("The answer is C", "C"),
        ("Answer: (D)", "D"),
        ("the correct option is E.", "E"),
        (r"\text{B}", "B"),
        (r"\text{(B)}", "B"),
        (r"\boxed{B}", "B"),
        (r"$\mathrm{B}$", "B"),
        ("**B**", "B"),
        ("(C) 12 cm", "C"),
        ("(c) 12 cm", "C"),
        ("C. 12 cm", "C"),
        ("c. 12 cm", None),  # lower case followed by text is too likely to be prose
        ("12 cm", None),
        ("AB", None),
        ("A and B", None),
        ("", None),
        (None, None),
        ("3", None),
        ("É", None),  # A-Z only
    ],
)
def test_normalize_choice(raw, expected):
    assert normalize_choice(raw) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (r"\text{(B)}", "B", True),
        ("b", "B", True),
        ("(A)", "B", False),
        ("12 cm", "12 cm", False),  # letters only: option text never matches
        (None, "B", False),
        ("", "", False),
    ],
)
def test_choice_equal(pred, gold, expected):
    assert choice_equal(pred, gold) is expected
