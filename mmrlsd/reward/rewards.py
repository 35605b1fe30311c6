r"""Verifiable rewards R(x, y), registered by name.

``unified`` (the authors' released reward, what the paper configs use): routed by ``problem_type``; math
graded by mathruler, numerical answers to 2 decimals, a permissive option-letter parser for multiple choice,
ROUGE for open-ended and untyped records. Rules, and where it differs from ``math``, in
`mmrlsd.reward.unified`.

``math`` (the default; math-verify's equality)::

    R = acc_weight * accuracy + format_weight * format        # defaults 0.9 and 0.1

* accuracy = 1 when `extract_answer(response)` (last ``<answer>``, else last ``\boxed{}``) is
  mathematically equal to the gold answer (`mmrlsd.reward.verify.math_equal_batch`), else 0;
* format = 1 when the whole response reads ``<thought>...</thought> ... <answer>...</answer>``
  (`mmrlsd.reward.answer.format_ok`), else 0;
* multiple choice (`is_multiple_choice(problem_type)`): R = accuracy, compared by option letter
  (`choice_equal`); format is reported but not rewarded. If such a record's gold answer is not a
  letter (option text), it is compared like a math answer.

``accuracy``: R = accuracy for every record (no format term); the benchmarks' notion of correct.

Every reward function takes lists and returns one `RewardResult` per response. All math checks of a
call go to the time-limited worker in one round trip; a malformed or adversarial answer scores 0 and
never raises or hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmrlsd.reward.answer import choice_equal, extract_answer, extract_boxed, format_ok, normalize_choice
from mmrlsd.reward.unified import score_unified
from mmrlsd.reward.verify import DEFAULT_TIMEOUT, math_equal_batch

__all__ = [
    "MULTIPLE_CHOICE_TYPES",
    "REWARDS",
    "RewardResult",
    "accuracy_reward",
    "format_reward",
    "get_reward",
    "is_multiple_choice",
    "register_reward",
    "score_responses",
    "unified_reward",
]

MULTIPLE_CHOICE_TYPES = frozenset({"multiple_choice", "multi_choice", "multichoice", "mcq", "choice"})


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response and the parts it was made from."""

    reward: float
    """R(x, y): what the group advantage sees."""
    accuracy: float
    """1.0 when the extracted answer equals the gold answer, else 0.0."""
    format: float
    """1.0 when the response matches ``<thought>...</thought> ... <answer>...</answer>``, else 0.0."""
    extracted: str | None
    """The extracted final answer (``math``/``accuracy``: None when the response has neither ``<answer>`` nor
    ``\\boxed{}``; ``unified``: its extraction, ``""`` for a math response with neither, the whole response for
    other types)."""


RewardFn = Callable[..., list[RewardResult]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward function available to `get_reward` / `score_responses` as ``name``."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def is_multiple_choice(problem_type: str | None) -> bool:
    """Whether a record's ``problem_type`` names a multiple-choice question (case, '-' and ' ' ignored).

    >>> is_multiple_choice("Multiple-Choice"), is_multiple_choice("multi_choice"), is_multiple_choice(None)
    (True, True, False)
    """
    if not problem_type:
        return False
    return problem_type.strip().lower().replace("-", "_").replace(" ", "_") in MULTIPLE_CHOICE_TYPES


def format_reward(responses: list[str]) -> list[float]:
    """1.0 per response that matches ``<thought>...</thought> ... <answer>...</answer>``, else 0.0.

    >>> format_reward(["<thought>2+2</thought> <answer>4</answer>", "4"])
    [1.0, 0.0]
    """
    return [float(format_ok(r)) for r in responses]


def _gold(answer: str | None) -> str | None:
    """Gold answers are stored bare, but some datasets box them: ``\\boxed{3}`` -> ``3``."""
    if answer is None:
        return None
    return extract_boxed(answer) or answer.strip()


def _accuracies(
    extracted: list[str | None], answers: list[str | None], problem_types: list[str | None], timeout: float
) -> list[float]:
    """Letter match for multiple choice with a letter gold, `math_equal_batch` (one call) for the rest."""
    golds = [_gold(a) for a in answers]
    acc: list[float | None] = [None] * len(golds)
    for i, (pred, gold, kind) in enumerate(zip(extracted, golds, problem_types)):
        if is_multiple_choice(kind) and normalize_choice(gold) is not None:
            acc[i] = float(choice_equal(pred, gold))
    rest = [i for i, a in enumerate(acc) if a is None]
    verdicts = math_equal_batch([extracted[i] for i in rest], [golds[i] for i in rest], timeout)
    for i, ok in zip(rest, verdicts):
        acc[i] = float(ok)
    return [float(a) for a in acc]


def _check_lengths(responses: list[str], answers: list[str | None], problem_types: list | None) -> list:
    kinds = [None] * len(responses) if problem_types is None else problem_types
    if not len(responses) == len(answers) == len(kinds):
        raise ValueError(f"{len(responses)} responses, {len(answers)} answers, {len(kinds)} problem types")
    return kinds


def accuracy_reward(
    responses: list[str],
    answers: list[str | None],
    problem_types: list[str | None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[float]:
    r"""1.0 per response whose extracted answer equals its gold answer, else 0.0.

    >>> accuracy_reward([r"<answer>\frac{1}{2}</answer>", r"so \boxed{(C)}", "42"], ["0.5", "C", "42"],
    ...                 [None, "multiple_choice", None])
    [1.0, 1.0, 0.0]
    """
    kinds = _check_lengths(responses, answers, problem_types)
    return _accuracies([extract_answer(r) for r in responses], answers, kinds, timeout)


@register_reward("math")
def math_reward(
    responses: list[str],
    answers: list[str | None],
    problem_types: list[str | None] | None = None,
    *,
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[RewardResult]:
    """``acc_weight * accuracy + format_weight * format`` (MC: accuracy only) with the shared checker
    (`mmrlsd.reward.answer`: last ``<answer>``, math-verify equivalence); `unified` is the released code's reward."""
    kinds = _check_lengths(responses, answers, problem_types)
    extracted = [extract_answer(r) for r in responses]
    accs = _accuracies(extracted, answers, kinds, timeout)
    results = []
    for acc, fmt, kind, ext in zip(accs, format_reward(responses), kinds, extracted):
        reward = acc if is_multiple_choice(kind) else acc_weight * acc + format_weight * fmt
        results.append(RewardResult(reward=reward, accuracy=acc, format=fmt, extracted=ext))
    return results


@register_reward("accuracy")
def accuracy_only_reward(
    responses: list[str],
    answers: list[str | None],
    problem_types: list[str | None] | None = None,
    *,
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[RewardResult]:
    """R = accuracy for every record; the weights are accepted (same signature) and ignored."""
    del acc_weight, format_weight
    kinds = _check_lengths(responses, answers, problem_types)
    extracted = [extract_answer(r) for r in responses]
    accs = _accuracies(extracted, answers, kinds, timeout)
    return [
        RewardResult(reward=acc, accuracy=acc, format=fmt, extracted=ext)
        for acc, fmt, ext in zip(accs, format_reward(responses), extracted)
    ]


@register_reward("unified")
def unified_reward(
    responses: list[str],
    answers: list[str | None],
    problem_types: list[str | None] | None = None,
    *,
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout: float = DEFAULT_TIMEOUT,
    response_lengths: list[int] | None = None,
) -> list[RewardResult]:
    r"""The released reward, routed by ``problem_type`` (`mmrlsd.reward.unified`); ``response_lengths`` (tokens)
    switch on the math overlong penalty.

    >>> [r.reward for r in unified_reward(["The answer is (B).", "<answer>3.14159</answer>"], ["B", "3.14"],
    ...                                   ["multiple choice", "numerical"])]
    [1.0, 1.0]
    """
    kinds = _check_lengths(responses, answers, problem_types)
    scored = score_unified(responses, answers, kinds, acc_weight=acc_weight, format_weight=format_weight,
                           timeout=timeout, response_lengths=response_lengths)  # fmt: skip
    return [RewardResult(reward=r, accuracy=a, format=f, extracted=e) for r, a, f, e in scored]


def score_responses(
    responses: list[str],
    answers: list[str | None],
    problem_types: list[str | None] | None = None,
    *,
    name: str = "math",
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout: float = DEFAULT_TIMEOUT,
    response_lengths: list[int] | None = None,
) -> list[RewardResult]:
    r"""Score a batch of responses with the reward registered as ``name`` (what training calls).

    ``response_lengths`` (response tokens) is passed on only when given, to rewards that use it (``unified``).

    >>> good = r"<thought>1/2 of 1</thought> <answer>\frac{1}{2}</answer>"
    >>> [r.reward for r in score_responses([good, "it is 0.5", r"\boxed{0.5}"], ["0.5"] * 3, [None] * 3)]
    [1.0, 0.0, 0.9]
    >>> [r.reward for r in score_responses([good, "it is 0.5"], ["0.5"] * 2, ["math"] * 2, name="unified")]
    [1.0, 0.0]
    """
    extra = {} if response_lengths is None else {"response_lengths": response_lengths}
    return get_reward(name)(
        responses,
        answers,
        problem_types,
        acc_weight=acc_weight,
        format_weight=format_weight,
        timeout=timeout,
        **extra,
    )
