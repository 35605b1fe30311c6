r"""The RLSD release's reward, ``unified``: each record is scored by the rule of its ``problem_type``.

Reproduces the behaviour of the authors' released reward (an EasyR1 fork, ``reward_function/unified.py`` and the
per-type modules beside it), re-written here. Registered as ``unified``; what the paper configs train with.

Before any rule runs, whitespace around ``<``, ``>`` and ``/`` is removed from the response (``< answer >``
-> ``<answer>``, and also ``1 / 2`` -> ``1/2``), and a gold answer wrapped in ``$...$`` or ``$$...$$`` is
unwrapped. The type is lower-cased and stripped, then routed:

=================================================  ===========================================================
problem_type                                       R (accuracy; format is reported, rewarded only for math)
=================================================  ===========================================================
math, mathematics                                  ``acc_weight·acc + format_weight·format (+ 0.1·overlong)``
numerical, number, regression                      float equality after rounding both to 2 decimals
multiple choice, multiple_choice                   letter parsed by `parse_choice` on both sides, else
                                                   `grade_answer`
boolean, binary classification                     yes/true/1 and no/false/0 folded, then string equality
ocr                                                ``max(0, 1 - WER)`` over lower-cased words
llava, critic                                      the preferred response's label (1, 2 or tie) matches
spatial / temporal / spatial-temporal grounding    IoU of the JSON boxes / time spans
svg-code, html-code                                tag overlap and length ratio (``0.7·tags + 0.3·length``)
code, coding                                       0 (the release runs Python in a sandbox it does not ship;
                                                   we never run model output)
open-ended and anything else, or no type           exact match for gold answers of <= 10 characters, else
                                                   the mean of ROUGE-1, -2 and -L F1 (``rouge-score``,
                                                   Porter stemming)
=================================================  ===========================================================

Answer extraction (`extract_answer`): the FIRST ``<answer>...</answer>`` (case-insensitive, so a nested
``<answer><answer>5</answer></answer>`` gives ``<answer>5``), else the last complete ``\boxed{}``; if neither,
the empty string for math and the whole response for every other type. The gold answer goes through the same
extraction (a boxed gold is unboxed).

Math accuracy (`math_equivalent`): equal after stripping; else equal after `strip_math_string` (drops ``$``,
``\text{...}``, ``\left``/``\right``, degrees, percent signs, spaces; keeps the right side of one ``=`` or
``\approx``); else mathruler's ``grade_answer`` on the raw strings, then on the normalised strings, each only
when both strings have at most 512 characters, 8 line breaks and 128 words, and each under ``timeout``
seconds in the time-limited worker (`mmrlsd.reward.verify.grade_answer_batch`; the release uses 10 s).
Format: the whole (whitespace-normalised) response matches ``<thought>.*</thought>.*<answer>.*</answer>``.
Overlong penalty (math only, when ``response_lengths`` are given): 0 up to ``max_response_length -
overlong_buffer`` tokens, then falling linearly to -1 at ``max_response_length``, -1 beyond; with the
release's 16,384 and 3,072 it is inactive for responses up to 13,312 tokens (training does not pass lengths).

How ``unified`` differs from ``math`` (the other built-in reward; math-verify's notion of equality):

* ``unified`` reads the first ``<answer>``, ``math`` the last;
* mathruler does not reduce unreduced fractions: ``2/4`` vs ``1/2`` is wrong under ``unified`` and right
  under ``math``; ``50\%`` vs ``0.5`` likewise; ``\frac{1}{2}`` vs ``0.5`` is right under both;
* numerical answers agree to 2 decimals under ``unified`` (``3.14159`` = ``3.14``), to 6 under ``math``;
* records without a math type are scored by type (ROUGE for open-ended or untyped records, no format
  term); ``math`` scores every record as math except multiple choice.

No rule raises: a record whose scoring fails for any reason scores 0, and the symbolic grader runs in a killable
worker process, so an adversarial answer costs at most ``timeout`` seconds and scores 0.
"""

from __future__ import annotations

import json
import logging
import re

from mmrlsd.reward.verify import DEFAULT_TIMEOUT, grade_answer_batch

log = logging.getLogger("mmrlsd.reward")

CHOICE_LETTERS = "ABCDEFGH"
GRADER_MAX_CHARS = 512
GRADER_MAX_LINES = 8
GRADER_MAX_WORDS = 128
MAX_RESPONSE_LENGTH = 16384
OVERLONG_BUFFER = 3072
OVERLONG_COEF = 0.1

ROUTES = {
    **dict.fromkeys(("math", "mathematics"), "math"),
    **dict.fromkeys(("multiple choice", "multiple_choice"), "multiple_choice"),
    **dict.fromkeys(("numerical", "number", "regression"), "numerical"),
    **dict.fromkeys(("open-ended", "open_ended", "video qa", "video description", "free-form"), "open_ended"),
    "ocr": "ocr",
    **dict.fromkeys(("boolean", "binary classification"), "boolean"),
    **dict.fromkeys(("llava", "critic"), "critic"),
    **dict.fromkeys(("code", "coding"), "code"),
    "svg-code": "svg_code",
    "html-code": "html_code",
    "spatial grounding": "spatial",
    "temporal grounding": "temporal",
    "spatial-temporal grounding": "spatial_temporal",
}
"""problem_type (lower-cased, stripped) -> rule; any other type, or none, is open-ended."""

_AROUND_TAG_CHARS = re.compile(r"\s*([<>/])\s*")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FORMAT = re.compile(r"<thought>.*</thought>.*<answer>.*</answer>", re.DOTALL)


def route(problem_type: str | None) -> str:
    """The rule that scores a record of this type.

    >>> route("Multiple Choice"), route(" math "), route("regression"), route("chart"), route(None)
    ('multiple_choice', 'math', 'numerical', 'open_ended', 'open_ended')
    """
    return ROUTES.get((problem_type or "").lower().strip(), "open_ended")


def normalize_response(response: str) -> str:
    """Remove whitespace on both sides of every ``<``, ``>`` and ``/``.

    >>> normalize_response("< answer > 1 / 2 </ answer >")
    '<answer>1/2</answer>'
    """
    return _AROUND_TAG_CHARS.sub(r"\1", response)


def unwrap_gold(answer: str | None) -> str:
    """Strip a gold answer and one ``$$...$$`` or ``$...$`` wrapper around it.

    >>> unwrap_gold(" $$x^2$$ "), unwrap_gold("$5$"), unwrap_gold("$5"), unwrap_gold(None)
    ('x^2', '5', '$5', '')
    """
    if not isinstance(answer, str):
        return ""
    gold = answer.strip()
    for fence in ("$$", "$"):
        if len(gold) >= 2 * len(fence) and gold.startswith(fence) and gold.endswith(fence):
            return gold[len(fence) : -len(fence)].strip()
    return gold


def last_boxed(text: str) -> str:
    r"""The content of the last ``\boxed{...}`` whose braces close, unstripped, or ``""``.

    Every ``{`` and ``}`` counts (``\{`` too), a box inside a box is part of the outer one, and an unclosed
    ``\boxed{`` swallows the rest of the text (so a box after it is never seen).

    >>> last_boxed(r"\boxed{1} then \boxed{\frac{2}{3}}"), last_boxed(r"\boxed{\boxed{4}}"), last_boxed(r"\boxed{5")
    ('\\frac{2}{3}', '\\boxed{4}', '')
    """
    found, i, n = "", 0, len(text)
    while (start := text.find("\\boxed{", i)) >= 0:
        depth, i = 1, start + 7
        while i < n and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start + 7 : i - 1]
    return found


def extract_answer(text: str, fallback_to_text: bool = True) -> str:
    r"""The first ``<answer>`` content, else the last complete ``\boxed{}`` content, else the whole text
    stripped (``fallback_to_text``) or ``""``.

    >>> extract_answer("<answer> 3 </answer> <answer>4</answer>"), extract_answer(r"\boxed{1} \boxed{2}")
    ('3', '2')
    >>> extract_answer(" so 7 "), extract_answer(" so 7 ", fallback_to_text=False)
    ('so 7', '')
    """
    match = _ANSWER_TAG.search(text)
    if match:
        return match.group(1).strip()
    boxed = last_boxed(text)
    if boxed:
        return boxed
    return text.strip() if fallback_to_text else ""


def format_match(response: str) -> float:
    """1.0 when the whole response is ``<thought>...</thought>...<answer>...</answer>``, else 0.0."""
    return 1.0 if _FORMAT.fullmatch(response) else 0.0


def overlong_penalty(
    length: int, max_length: int = MAX_RESPONSE_LENGTH, buffer: int = OVERLONG_BUFFER
) -> float:
    """0 up to ``max_length - buffer`` tokens, then linear down to -1 at ``max_length``, -1 beyond.

    >>> overlong_penalty(13312), overlong_penalty(14848), overlong_penalty(16384), overlong_penalty(16385)
    (0.0, -0.5, -1.0, -1.0)
    """
    expected = max_length - buffer
    if length <= expected:
        return 0.0
    if length <= max_length:
        return (expected - length) / buffer
    return -1.0


# ----------------------------------------------------------------------------------------------------- math
_MATH_DELETE = ("\n", "\\!", "\\left", "\\right", "^{\\circ}", "^\\circ", "\\$", "$")


def strip_math_string(s: str) -> str:
    r"""The release's light normalisation of math answers, applied in this order: drop line breaks and ``\!``;
    ``\\`` -> ``\``; ``tfrac``/``dfrac`` -> ``frac``; drop ``\left``, ``\right``, degree marks and dollar signs;
    drop ``\text{...}`` and ``\mbox{...}`` with their content; drop percent signs; a leading ``.`` gets a 0;
    keep the right side of exactly one ``=`` or one ``\approx``; remove spaces.

    >>> strip_math_string(r"x = \dfrac{1}{2}"), strip_math_string(r"30^\circ"), strip_math_string(r"5\text{ cm}")
    ('\\frac{1}{2}', '30', '5')
    >>> strip_math_string(".5"), strip_math_string("50\\%"), strip_math_string("a=b=c")
    ('0.5', '50', 'a=b=c')
    """
    if not s:
        return ""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        s = s.replace(old, new)
    for old in _MATH_DELETE[2:]:
        s = s.replace(old, "")
    s = re.sub(r"\\text\{\s*[^}]*\s*\}", "", s)
    s = re.sub(r"\\mbox\{\s*[^}]*\s*\}", "", s)
    s = s.replace("\\%", "").replace("%", "")
    if s.startswith("."):
        s = "0" + s
    for sep in ("=", "\\approx"):
        parts = s.split(sep)
        if len(parts) == 2:
            s = parts[1]
    return s.replace(" ", "")


def gradable(s: str) -> bool:
    """Whether a string is small enough for the symbolic grader: non-empty, at most 512 characters, 8 line
    breaks and 128 words (long natural-language answers are what makes sympy blow up)."""
    s = s.strip()
    return (
        bool(s)
        and len(s) <= GRADER_MAX_CHARS
        and s.count("\n") <= GRADER_MAX_LINES
        and len(s.split()) <= GRADER_MAX_WORDS
    )


def _math_grader_pairs(pred: str, gold: str) -> tuple[bool | None, list[tuple[str, str]]]:
    """(verdict if decided without the grader, else None; the (pred, gold) pairs to grade, any True wins)."""
    if not gold or not pred:
        return False, []
    gold, pred = gold.strip(), pred.strip()
    if pred == gold:
        return True, []
    gold_n, pred_n = strip_math_string(gold), strip_math_string(pred)
    if gold_n and pred_n and gold_n == pred_n:
        return True, []
    pairs = []
    if gradable(pred) and gradable(gold):
        pairs.append((pred, gold))
    if gold_n and pred_n and (pred_n != pred or gold_n != gold) and gradable(pred_n) and gradable(gold_n):
        pairs.append((pred_n, gold_n))
    return (None if pairs else False), pairs


def math_equivalent(preds: list[str], golds: list[str], timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    r"""The release's math equality for each pair; all grader calls of the batch go to the worker at once.

    >>> math_equivalent(["3", r"\dfrac{1}{2}", "0.5", "2/4", ""], ["3", r"\frac{1}{2}", r"\frac12", "1/2", "1"])
    [True, True, True, False, False]
    """
    decided, pairs = zip(*(_math_grader_pairs(p, g) for p, g in zip(preds, golds))) if preds else ((), ())
    flat = [pair for ps in pairs for pair in ps]
    verdicts = iter(grade_answer_batch([p for p, _ in flat], [g for _, g in flat], timeout) if flat else [])
    out = []
    for d, ps in zip(decided, pairs):
        graded = [next(verdicts) for _ in ps]
        out.append(bool(d) if d is not None else any(graded))
    return out


# ------------------------------------------------------------------------------------------- multiple choice
def _strip_punctuation(s: str) -> str:
    for ch in ",.!?;:'\"":  # one character at a time, in this order (so '"A."' -> 'A.')
        s = s.strip(ch)
    return s


def parse_choice(text: str) -> str:
    """The option letter (A-H) a free-text answer names, by the release's permissive rules, or ``""``.

    Candidates, each with a priority and a position (the rightmost occurrence), on the text stripped of
    surrounding punctuation and padded with one space: the text starts with the letter (10) or ends with it
    (9); "the answer is", "answer is", "the correct answer is" or "correct answer is" followed by `` X ``,
    `` X.`` or ``(X)`` (7); ``(X)`` (6); ``X.`` (5); ``X:`` (4); ``X)`` (3); `` X `` (2). Only if none of
    these match: any occurrence of the letter, case-insensitive (0). The highest priority wins, then the
    rightmost position, then the first letter found. Matches are case-sensitive except the start/end,
    answer-phrase and last-resort rules.

    >>> [parse_choice(s) for s in ["The answer is (B).", "B:", "b.", "(C) 7", "I pick D", "none", "42"]]
    ['B', 'B', 'B', 'C', 'D', 'E', '']
    """
    if not text or not text.strip():
        return ""
    s = " " + _strip_punctuation(text.strip()) + " "
    upper, lower = s.upper(), s.lower()
    found: list[tuple[int, int, str]] = []  # (priority, position, letter), in the order found
    for x in CHOICE_LETTERS:
        for pattern, priority in ((f"({x})", 6), (f"{x}.", 5), (f"{x}:", 4), (f"{x})", 3), (f" {x} ", 2)):
            if pattern in s:
                found.append((priority, s.rfind(pattern), x))
    for phrase in ("the answer is", "answer is", "the correct answer is", "correct answer is"):
        if phrase in lower:
            end = lower.find(phrase) + len(phrase)
            after = s[end:].upper()
            for x in CHOICE_LETTERS:
                hits = [after.find(p) for p in (f" {x} ", f" {x}.", f"({x})") if p in after]
                if hits:
                    found.append((7, end + hits[0], x))
    body = upper.strip()
    for x in CHOICE_LETTERS:
        if body.startswith(x):
            found.append((10, 0, x))
        if body.endswith(x):
            found.append((9, len(s) - 1, x))
    if not found:
        found = [(0, upper.rfind(x), x) for x in CHOICE_LETTERS if x in upper]
    if not found:
        return ""
    return max(found, key=lambda c: (c[0], c[1]))[2]  # max keeps the first of equal keys


# ---------------------------------------------------------------------------------------------- other types
def numerical_equal(pred: str, gold: str) -> bool:
    """Both parse as floats (commas removed) and agree after rounding to 2 decimals.

    >>> numerical_equal("3.14159", "3.14"), numerical_equal("1,234.5", "1234.50"), numerical_equal("3.2", "3.1")
    (True, True, False)
    """

    def number(s: str) -> float | None:
        try:
            return float(s.replace(",", ""))
        except (ValueError, OverflowError):
            return None

    p, g = number(pred), number(gold)
    return p is not None and g is not None and round(p, 2) == round(g, 2)


def boolean_equal(pred: str, gold: str) -> bool:
    """Case-insensitive equality after folding yes/true/1 to yes and no/false/0 to no."""

    def fold(s: str) -> str:
        s = s.lower().strip()
        return "yes" if s in ("yes", "true", "1") else "no" if s in ("no", "false", "0") else s

    return fold(pred) == fold(gold)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance / number of reference words (at least 1).

    >>> word_error_rate("a b c d", "a x c"), word_error_rate("", "")
    (0.5, 0.0)
    """
    import Levenshtein

    ref, hyp = reference.split(), hypothesis.split()
    return Levenshtein.distance(ref, hyp) / max(1, len(ref))


_ROUGE = None


def rouge_mean_f1(reference: str, hypothesis: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F1 scores (``rouge-score`` with the Porter stemmer)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _ROUGE.score(reference, hypothesis)
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3.0


def open_ended_score(pred: str, gold: str) -> float:
    """Exact (case-insensitive) match for golds of at most 10 characters, else ROUGE, clipped to [0, 1]."""
    if not pred or not gold:
        return 0.0
    if len(gold) <= 10 and pred.lower().strip() == gold.lower().strip():
        return 1.0
    return min(1.0, max(0.0, rouge_mean_f1(gold, pred)))


def critic_label(text: str) -> int:
    """Preference label: 1 (response 1 / A / first), 2 (response 2 / B / second), 0 (tie), -1 (unreadable)."""
    t = text.lower().strip()
    if t in ("response 1", "response a", "1", "a", "first") or "response 1" in t or "response a" in t:
        return 1
    if t in ("response 2", "response b", "2", "b", "second") or "response 2" in t or "response b" in t:
        return 2
    if t == "tie" or any(w in t for w in ("equally", "both", "equal", "tie")):
        return 0
    return 1 if "first" in t else 2 if "second" in t else -1


def _json_object(text: str) -> dict | None:
    """The first of these that parses as JSON: the whole text, a fenced code block, the last flat ``{...}``;
    None unless that value is an object."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in re.findall(r"```(?:json)?\s*([\s\S]*?)\s*```", text)]
    candidates += reversed(re.findall(r"\{[^{}]*\}", text))
    for c in candidates:
        try:
            obj = json.loads(c)
        except (ValueError, RecursionError):
            continue
        return obj if isinstance(obj, dict) else None
    return None


def _iou(a: object, b: object, dims: int) -> float:
    """IoU of two intervals (dims 1: [start, end]) or boxes (dims 2: [x1, y1, x2, y2]); 0 when malformed."""
    try:
        if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == 2 * dims):
            return 0.0
        a, b = [float(v) for v in a], [float(v) for v in b]
        inter = union = 1.0
        for d in range(dims):
            lo, hi = max(a[d], b[d]), min(a[d + dims], b[d + dims])
            inter *= max(0.0, hi - lo)
        if dims == 1:
            union = max(a[1], b[1]) - min(a[0], b[0])
        else:
            area = lambda box: max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])  # noqa: E731
            union = area(a) + area(b) - inter
        return inter / union if union > 1e-12 else 0.0
    except (TypeError, ValueError, OverflowError):
        return 0.0


def grounding_score(pred: str, gold: str, kind: str) -> float:
    """Spatial: box IoU; temporal: time-span IoU; spatial-temporal: the mean of the span IoU and the mean box
    IoU over frames present in both."""
    p, g = _json_object(pred), _json_object(gold)
    if p is None or g is None:
        return 0.0
    if kind == "spatial":
        return _iou(p.get("boxes", []), g.get("boxes", []), 2)
    t_iou = _iou(p.get("time", []), g.get("time", []), 1)
    if kind == "temporal":
        return t_iou
    pb, gb = p.get("boxes", {}), g.get("boxes", {})
    common = set(pb) & set(gb) if isinstance(pb, dict) and isinstance(gb, dict) else set()
    m_iou = sum(_iou(pb[k], gb[k], 2) for k in common) / len(common) if common else 0.0
    return 0.5 * t_iou + 0.5 * m_iou


def markup_score(pred: str, gold: str, svg: bool) -> float:
    """SVG/HTML answers: ``0.7·(share of the gold's tag names present) + 0.3·(shorter/longer length)``,
    after removing whitespace; 0 when the answer is not SVG/HTML at all."""
    if not pred:
        return 0.0
    if svg and ("<svg" not in pred.lower() or "</svg>" not in pred.lower()):
        return 0.0
    if not svg and not re.search(r"<(\w+)[^>]*>", pred, re.IGNORECASE):
        return 0.0
    p, g = "".join(pred.split()), "".join(gold.split())
    if not g:
        return 0.0 if p else 1.0
    if not svg:
        p, g = p.lower(), g.lower()
    gold_tags, pred_tags = set(re.findall(r"<(\w+)", g)), set(re.findall(r"<(\w+)", p))
    if not gold_tags:
        return 0.0
    tags = len(gold_tags & pred_tags) / len(gold_tags)
    return min(1.0, max(0.0, 0.7 * tags + 0.3 * min(len(p), len(g)) / max(len(p), len(g))))


# ------------------------------------------------------------------------------------------------- scoring
def _accuracy(kind: str, response: str, gold: str) -> tuple[float | None, list[tuple[str, str]], str]:
    """(accuracy if decided here, else None; grader pairs, any True -> 1.0; the extracted answer)."""
    if kind == "math":
        pred = extract_answer(response, fallback_to_text=False)
        decided, pairs = _math_grader_pairs(pred, extract_answer(gold, fallback_to_text=False) or gold)
        return (None if decided is None else float(decided)), pairs, pred
    pred, gold = extract_answer(response), extract_answer(gold)
    if kind == "multiple_choice":
        p, g = parse_choice(pred), parse_choice(gold)
        if p and g:
            return float(p.upper() == g.upper()), [], pred
        return None, [(pred.strip(), gold.strip())], pred
    if kind == "numerical":
        acc = float(numerical_equal(pred, gold))
    elif kind == "boolean":
        acc = float(boolean_equal(pred, gold))
    elif kind == "ocr":
        acc = min(1.0, max(0.0, 1.0 - word_error_rate(gold.lower(), pred.lower())))
    elif kind == "critic":
        label = critic_label(pred)
        acc = float(label >= 0 and label == critic_label(gold))
    elif kind in ("spatial", "temporal", "spatial_temporal"):
        acc = grounding_score(pred, gold, kind)
    elif kind in ("svg_code", "html_code"):
        acc = markup_score(pred, gold, svg=kind == "svg_code")
    elif kind == "code":
        acc = 0.0
    else:
        acc = open_ended_score(pred, gold)
    return acc, [], pred


def score_unified(
    responses: list[str],
    answers: list[str | None],
    problem_types: list[str | None],
    *,
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout: float = DEFAULT_TIMEOUT,
    response_lengths: list[int] | None = None,
    max_response_length: int = MAX_RESPONSE_LENGTH,
    overlong_buffer: int = OVERLONG_BUFFER,
    overlong_coef: float = OVERLONG_COEF,
) -> list[tuple[float, float, float, str]]:
    """``(reward, accuracy, format, extracted answer)`` per response, by the rules of the module docstring.

    All grader calls of the batch go to the worker in one round trip. A record whose scoring raises scores
    ``(0, 0, 0, "")`` and is logged; nothing propagates.
    """
    todo = []  # (index, kind, format, accuracy or None, grader pairs, extracted)
    pairs: list[tuple[str, str]] = []
    out: list[tuple[float, float, float, str]] = [(0.0, 0.0, 0.0, "")] * len(responses)
    for i, (response, answer, ptype) in enumerate(zip(responses, answers, problem_types)):
        try:
            kind = route(ptype)
            response = normalize_response(response if isinstance(response, str) else "")
            acc, grader_pairs, pred = _accuracy(kind, response, unwrap_gold(answer))
        except Exception as e:  # a scoring bug on one odd record must not stop training
            log.warning("unified reward: record %d scored 0 (%s: %s)", i, type(e).__name__, e)
            continue
        todo.append((i, kind, format_match(response), acc, len(grader_pairs), pred))
        pairs += grader_pairs
    verdicts = iter(
        grade_answer_batch([p for p, _ in pairs], [g for _, g in pairs], timeout) if pairs else []
    )
    for i, kind, fmt, acc, n_pairs, pred in todo:
        graded = [next(verdicts) for _ in range(n_pairs)]
        if acc is None:
            acc = float(any(graded))
        reward = acc
        if kind == "math":
            reward = acc_weight * acc + format_weight * fmt
            if response_lengths is not None:
                reward += overlong_coef * overlong_penalty(
                    response_lengths[i], max_response_length, overlong_buffer
                )
        out[i] = (reward, acc, fmt, pred)
    return out
