"""`digit_chain`, the credit lab's long-reasoning family: answers and every written step re-derived from the pixels
(the digits read back from their lit segments, the operations from the question), response lengths, the opt-in
registry, the corpus."""

from __future__ import annotations

import re

import pytest

from mmrlsd.data import synth
from tests.data.test_synth import decode_digits

QUESTION_RE = re.compile(r"the digits are ([a-f](?: [a-f])*) \. what is ([a-f](?: [+-] [a-f])*) \?")


def check_digit_chain(problem: str, img) -> tuple[str, list[str]]:
    """Answer and steps from the image and the question only."""
    names, expr = QUESTION_RE.fullmatch(problem).groups()
    names = names.split()
    digits = decode_digits(img)
    assert len(digits) == len(names) and names == list("abcdef"[: len(names)])
    toks = expr.split()
    assert toks[0::2] == names  # the expression uses every digit once, left to right
    steps = [f"{n} = {d}" for n, d in zip(names, digits)]
    acc = digits[0]
    for op, d in zip(toks[1::2], digits[1:]):
        new = acc + d if op == "+" else acc - d
        assert new >= 0, "a partial result went negative"
        steps.append(f"{acc} {op} {d} = {new}")
        acc = new
    return str(acc), steps


@pytest.mark.parametrize("level", synth.LEVELS)
def test_answers_and_steps_from_the_pixels(level):
    records = synth.generate(80, seed=5, families=["digit_chain"], level=level)
    ops = set()
    for rec in records:
        (img,) = rec["pil_images"]
        answer, steps = check_digit_chain(rec["problem"], img)
        assert img.size == (28 * synth.CHAIN_DIGITS[level], 56)
        assert rec["answer"] == answer and rec["problem_type"] == "numeric"
        assert rec["solution"] == f"<thought>{' ; '.join(steps)}</thought><answer>{answer}</answer>"
        assert (
            len(steps) == 2 * synth.CHAIN_DIGITS[level] - 1
        )  # one reading per digit, one result per operation
        assert 0 <= int(answer) <= synth.CHAIN_MAX
        ops |= set(QUESTION_RE.fullmatch(rec["problem"]).group(2).split()) & {"+", "-"}
    assert ops == {"+", "-"}
    assert len({r["answer"] for r in records}) >= 10


def test_chain_steps_by_hand():
    assert synth.chain_steps([3, 7, 2, 4], ["+", "-", "+"]) == ["a = 3", "b = 7", "c = 2", "d = 4", "3 + 7 = 10",
                                                                 "10 - 2 = 8", "8 + 4 = 12"]  # fmt: skip
    assert synth.q_digit_chain(["+", "-", "+"]) == "the digits are a b c d . what is a + b - c + d ?"


def test_long_family_is_opt_in_and_named_in_errors():
    assert "digit_chain" not in synth.FAMILIES and synth.get_family("digit_chain") is synth.digit_chain
    assert synth.resolve_families(None) == list(synth.FAMILIES)
    with pytest.raises(KeyError, match="long: digit_chain"):
        synth.get_family("chain")


def test_long_corpus_covers_every_question_and_word():
    corpus = set(synth.long_corpus())
    words = {w for line in corpus for w in line.split()}
    tag_re = re.compile(r"(</?(?:thought|answer)>)")
    for rec in synth.generate(60, seed=2, families=["digit_chain"]):
        assert rec["problem"] in corpus
        assert set(tag_re.sub(" ", rec["solution"]).split()) <= words
