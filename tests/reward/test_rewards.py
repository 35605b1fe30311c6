"""Tests for mmrlsd/reward/rewards.py: the released RLSD reward, exact values, registry, batching."""

import doctest
import re

import pytest

from mmrlsd.reward import rewards
from mmrlsd.reward.rewards import (
    REWARDS,
    RewardResult,
    accuracy_reward,
    format_reward,
    get_reward,
    is_multiple_choice,
    register_reward,
    score_responses,
)
from mmrlsd.reward.verify import MathChecker

FMT = "<thought>{t}</thought>\n<answer>{a}</answer>"


def test_doctests():
    failed, attempted = doctest.testmod(rewards)
    assert attempted >= 5 and failed == 0


@pytest.mark.parametrize(
    "response, gold, kind, expected",
    [
        # math: R = 0.9 * accuracy + 0.1 * format
        (FMT.format(t="1/2", a=r"\frac{1}{2}"), "0.5", None, RewardResult(1.0, 1.0, 1.0, r"\frac{1}{2}")),
        # correct, unformatted: 0.9 * 1 + 0.1 * 0 = 0.9
        (r"so the answer is \boxed{0.5}", r"\frac{1}{2}", "math", RewardResult(0.9, 1.0, 0.0, "0.5")),
        # wrong, formatted: 0.9 * 0 + 0.1 * 1 = 0.1
        (FMT.format(t="guess", a="0.4"), "0.5", None, RewardResult(0.1, 0.0, 1.0, "0.4")),
        # wrong, unformatted: 0
        ("0.5", "0.5", None, RewardResult(0.0, 0.0, 0.0, None)),  # no <answer>, no \boxed: nothing extracted
        # formatted but the <answer> content is empty: 0.9 * 0 + 0.1 * 1 = 0.1
        (FMT.format(t="t", a=""), "3", None, RewardResult(0.1, 0.0, 1.0, "")),
        # a box inside <answer> is unwrapped: 0.9 + 0.1 = 1.0
        (FMT.format(t="t", a=r"\boxed{x+1}"), "1+x", None, RewardResult(1.0, 1.0, 1.0, "x+1")),
        # boxed gold answers are unwrapped: 0.9 * 1 + 0.1 * 0 = 0.9
        (r"\boxed{3}", r"\boxed{3.0}", None, RewardResult(0.9, 1.0, 0.0, "3")),
        # multiple choice: R = accuracy, formatted or not
        (
            FMT.format(t="t", a=r"\text{(B)}"),
            "B",
            "multiple_choice",
            RewardResult(1.0, 1.0, 1.0, r"\text{(B)}"),
        ),
        (r"\boxed{b}", "B", "multi_choice", RewardResult(1.0, 1.0, 0.0, "b")),
        (FMT.format(t="t", a="C"), "B", "mcq", RewardResult(0.0, 0.0, 1.0, "C")),  # wrong: 0, format ignored
        (
            FMT.format(t="t", a="12 cm"),
            "B",
            "multiple_choice",
            RewardResult(0.0, 0.0, 1.0, "12 cm"),
        ),  # letters only
        # multiple choice whose gold is option text, not a letter: compared as math, R = accuracy = 1
        (FMT.format(t="t", a="12"), "12", "multiple_choice", RewardResult(1.0, 1.0, 1.0, "12")),
        # the same letter answer without a multiple-choice type goes through math-verify: 0.9 + 0.1
        (FMT.format(t="t", a="(B)"), "B", None, RewardResult(1.0, 1.0, 1.0, "(B)")),
    ],
)
def test_math_reward_exact_values(response, gold, kind, expected):
    (got,) = score_responses([response], [gold], [kind])
    assert got == expected


@pytest.mark.parametrize(
    "response",
    [
        None,
        "",
        "\ud800" * 10,
        r"<answer>9**9**9**9</answer>",
        r"<answer>\frac{1}{0}</answer>",
        "<answer>" + "9" * 100_000 + "</answer>",
        r"\boxed{" + "{" * 5000,
        FMT.format(t="t", a="{" * 50 + "}" * 50),
    ],
    ids=lambda r: repr(r)[:20],
)
def test_malformed_responses_score_at_most_format(response):
    (got,) = score_responses([response], ["1"], [None], timeout=1.0)
    assert got.accuracy == 0.0
    assert got.reward == 0.1 * got.format  # 0.9 * 0 + 0.1 * format


def test_weights_are_arguments():
    resp = [FMT.format(t="t", a="2"), FMT.format(t="t", a="3")]
    # acc_weight=0.5, format_weight=0.5: correct 0.5 + 0.5 = 1.0; wrong 0 + 0.5 = 0.5
    got = score_responses(resp, ["2", "2"], [None, None], acc_weight=0.5, format_weight=0.5)
    assert [r.reward for r in got] == [1.0, 0.5]


def test_accuracy_reward_by_name():
    resp = [FMT.format(t="t", a="2"), "2", r"\boxed{2}", FMT.format(t="t", a="(A)")]
    got = score_responses(resp, ["2", "2", "2", "A"], [None, None, None, "multiple_choice"], name="accuracy")
    # R = accuracy: nothing is extracted from the bare "2"
    assert [r.reward for r in got] == [1.0, 0.0, 1.0, 1.0]
    assert [r.format for r in got] == [1.0, 0.0, 0.0, 1.0]


def test_plain_functions_of_lists():
    assert format_reward(["<thought>a</thought><answer>b</answer>", "<answer>b</answer>"]) == [1.0, 0.0]
    assert accuracy_reward([r"\boxed{2}", r"\boxed{(B)}"], ["2", "B"], [None, "mcq"]) == [1.0, 1.0]
    assert accuracy_reward([r"\boxed{2}"], ["2"]) == [1.0]  # problem types are optional


def test_one_round_trip_per_batch(monkeypatch):
    calls = []
    real_check = MathChecker.check

    def spy(self, pairs, timeout=5.0):
        calls.append(list(pairs))
        return real_check(self, pairs, timeout)

    monkeypatch.setattr(MathChecker, "check", spy)
    responses = [FMT.format(t="t", a=a) for a in [r"\frac{1}{2}", "3.0", r"2\sqrt{2}", "B", "7"]]
    golds = ["0.5", "3", r"\sqrt{8}", "B", "8"]
    kinds = [None, None, None, "multiple_choice", None]
    got = score_responses(responses, golds, kinds)
    # 0.9 + 0.1 = 1.0 (x2), 1.0, MC 1.0, wrong 0 + 0.1 = 0.1
    assert [r.reward for r in got] == [1.0, 1.0, 1.0, 1.0, 0.1]
    # "3.0"/"3" and "7"/"8" are decided without IPC and the letter match in the parent: one call, two pairs
    assert calls == [[(r"\frac{1}{2}", "0.5"), (r"2\sqrt{2}", r"\sqrt{8}")]]


def test_empty_batch():
    assert score_responses([], [], []) == []


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 responses, 1 answers, 2 problem types"):
        score_responses(["a", "b"], ["1"], [None, None])


def test_registry_lookup_lists_known_names():
    assert get_reward("math") is REWARDS["math"]
    assert {"math", "accuracy", "unified"} <= set(REWARDS)
    # other test modules register plugin rewards (charcount, perf_chars, ...): the message lists whatever is there
    known = ", ".join(sorted(REWARDS))
    with pytest.raises(KeyError, match=re.escape(f"unknown reward 'maths'; known: {known}")):
        get_reward("maths")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(lambda *a, **k: [])


def test_register_a_new_reward(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))

    @register_reward("length")
    def length_reward(responses, answers, problem_types=None, **_):
        return [RewardResult(float(len(r)), 0.0, 0.0, None) for r in responses]

    assert [r.reward for r in score_responses(["ab", "abc"], ["", ""], None, name="length")] == [2.0, 3.0]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("multiple_choice", True),
        ("Multiple Choice", True),
        ("multi-choice", True),
        ("MCQ", True),
        ("free_form", False),
        ("math", False),
        ("", False),
        (None, False),
    ],
)
def test_is_multiple_choice(kind, expected):
    assert is_multiple_choice(kind) is expected
