r"""The shared answer checker: extract, normalise and compare final answers (pure string functions).

One idea of "correct" serves both the training reward (`mmrlsd.reward.rewards`) and the benchmarks
(`mmrlsd.bench.*`), so training rewards what the benchmarks measure. Nothing here starts a process or evaluates
text: the symbolic math-equivalence check, which can be slow on adversarial input, lives in
`mmrlsd.reward.verify` and runs in a time-limited worker process.

Rules of the `math` reward (the released code's `unified` reward differs; see `mmrlsd.reward.unified`):

* the final answer is the content of the last ``<answer>...</answer>``; if there is none, the content of
  the last ``\boxed{...}``; a ``\boxed{}`` inside the ``<answer>`` content is unwrapped;
* the response is well formatted when the whole of it (outer whitespace aside) reads
  ``<thought>...</thought> ... <answer>...</answer>``;
* multiple-choice answers are compared by option letter only.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "FORMAT_PATTERN",
    "choice_equal",
    "extract_answer",
    "extract_answer_tag",
    "extract_boxed",
    "format_ok",
    "normalize_choice",
    "parse_number",
    "strip_latex",
]

# What `format_ok` decides, written as a regex for reading (and for the tests, which check that the
# linear-time `format_ok` agrees with it). Do not run it on long responses: its nested `.*` can backtrack.
FORMAT_PATTERN = re.compile(r"\s*<thought>.*</thought>.*<answer>.*</answer>\s*", re.DOTALL)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _brace_partners(text: str) -> dict[int, int]:
    r"""Index of each ``{`` -> index of its matching ``}``, in one pass (``\{``, ``\}`` are literals)."""
    partners: dict[int, int] = {}
    stack: list[int] = []
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            partners[stack.pop()] = i
    return partners


def extract_boxed(text: str | None) -> str | None:
    r"""Content of the last top-level ``\boxed{...}`` (or ``\fbox{...}``), stripped; None if there is none.

    Braces must balance (nesting is fine, ``\{``/``\}`` count as text). An unclosed ``\boxed{`` (a
    truncated response) is skipped, so an earlier complete box still counts. A box nested inside another
    box is part of the outer box's content. Linear time in ``len(text)``.

    >>> extract_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> extract_boxed(r"\boxed{\{1, 2\}}")
    '\\{1, 2\\}'
    >>> extract_boxed(r"\fbox{ 7 } then \boxed{8")
    '7'
    >>> extract_boxed("no box") is None
    True
    """
    if not text or "box" not in text:
        return None
    partners = _brace_partners(text)
    found, pos = None, 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        close = partners.get(m.end() - 1)
        if close is None:  # unclosed: skip the opening and keep looking
            pos = m.end()
            continue
        found, pos = text[m.end() : close], close + 1
    return None if found is None else found.strip()


def extract_answer_tag(text: str | None) -> str | None:
    r"""Content of the last complete ``<answer>...</answer>``, stripped; None if there is none.

    >>> extract_answer_tag("<answer>1</answer> <answer> 2 </answer>")
    '2'
    >>> extract_answer_tag("<answer>3") is None
    True
    """
    if not text:
        return None
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def extract_answer(text: str | None) -> str | None:
    r"""The final answer of a response: last ``<answer>`` content, else last ``\boxed{}`` content.

    A ``\boxed{}`` inside the ``<answer>`` content is unwrapped. Returns None when neither is present.

    >>> extract_answer(r"<thought>...</thought> <answer>\boxed{42}</answer>")
    '42'
    >>> extract_answer(r"The answer is \boxed{x+1}.")
    'x+1'
    >>> extract_answer("I think it is 5.") is None
    True
    """
    tag = extract_answer_tag(text)
    if tag is None:
        return extract_boxed(text)
    inner = extract_boxed(tag)
    return tag if inner is None else inner


def format_ok(text: str | None) -> bool:
    r"""True when the whole response matches ``<thought>...</thought> ... <answer>...</answer>``.

    Same decision as ``FORMAT_PATTERN.fullmatch(text)`` (DOTALL, outer whitespace allowed), computed with
    three ``str.find`` calls so that it is linear time on any input.

    >>> format_ok("<thought>add</thought>\n<answer>2</answer>\n")
    True
    >>> format_ok("<thought>add</thought> <answer>2</answer> trailing words")
    False
    """
    if not text:
        return False
    s = text.strip()
    if not (s.startswith("<thought>") and s.endswith("</answer>")):
        return False
    close_thought = s.find("</thought>", len("<thought>"))
    if close_thought < 0:
        return False
    open_answer = s.find("<answer>", close_thought + len("</thought>"))
    return 0 <= open_answer <= len(s) - len("</answer>") - len("<answer>")


# ---------------------------------------------------------------------------------------------------
# Light normalisation, shared with the benchmarks. Small on purpose: anything cleverer belongs to the
# symbolic checker (math-verify) in `verify.py`.

_WRAPPERS_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_SIZING_RE = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])")  # not \leftarrow, \rightarrow
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad\b|~")


def strip_latex(s: str) -> str:
    r"""Remove LaTeX decoration that never changes a value, then outer whitespace and a final period.

    Removes: ``$``; ``\left``/``\right``; ``\displaystyle``; spacing commands (``\,`` ``\;`` ``\!``
    ``\quad`` ``~``); degree marks (``^\circ``, ``^{\circ}``, ``°``); and unwraps ``\text{..}``,
    ``\textbf``, ``\mathrm``, ``\mathbf``, ``\operatorname``, ``\mbox`` (innermost first). ``\%``
    becomes ``%``; the percent sign itself is kept (whether 50% equals 0.5 is the checker's call).

    >>> strip_latex(r"$\left( 30^{\circ} \right)$.")
    '( 30 )'
    >>> strip_latex(r"\text{(B)}")
    '(B)'
    >>> strip_latex(r"12\,\mathrm{cm}")
    '12cm'
    """
    s = _SIZING_RE.sub("", s.replace("$", ""))
    s = s.replace("\\%", "%")
    s = _DEGREE_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    for _ in range(8):  # nested wrappers, innermost first; bounded so that input cannot loop us
        new = _WRAPPERS_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    s = s.strip()
    return s[:-1].rstrip() if s.endswith(".") else s


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def parse_number(s: str | None) -> Decimal | None:
    r"""The exact decimal value of a plain number such as ``-3``, ``3.0``, ``.5``, ``1,000``.

    Returns None for anything else: fractions, expressions, ``1,2`` (may be a tuple), ``inf``, and
    ``1e3`` (math-verify reads it as ``1*e^3``, so it is not a plain number here either).
    Exact (``Decimal``), so ``3`` and ``3.0`` are equal and no rounding happens here.

    >>> parse_number(" 3.0 ") == parse_number("3")
    True
    >>> parse_number("1,000")
    Decimal('1000')
    >>> parse_number("1,2") is None, parse_number("1/2") is None
    (True, True)
    """
    if s is None:
        return None
    s = s.strip()
    if len(s) > 64:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    elif not _NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except (InvalidOperation, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# Multiple choice

_CHOICE_PREFIX_RE = re.compile(
    r"^(?:the\s+)?(?:correct\s+)?(?:final\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE
)
_LETTER_WITH_TEXT_RE = re.compile(r"^\(([A-Za-z])\)|^\[([A-Za-z])\]|^([A-Z])[.):](?:\s|$)")


def normalize_choice(s: str | None) -> str | None:
    r"""The option letter (upper case ``A``-``Z``) a multiple-choice answer names, or None.

    Rules, applied in order:

    1. unwrap a ``\boxed{}``, apply `strip_latex` (so ``\text{(B)}`` -> ``(B)``), drop ``*`` and ``_``
       (markdown bold/italics) and outer whitespace;
    2. drop a leading "answer", "option", "choice" (optionally "the correct/final ... is", ":");
    3. a single letter, of either case, possibly wrapped in ``()`` / ``[]`` and/or followed by ``.``,
       ``)`` or ``:`` -> that letter (``b``, ``(B)``, ``B.``, ``B)``, ``Option B``, ``**B**``);
    4. a letter in ``()`` or ``[]`` followed by option text -> that letter (``(B) 12 cm``, ``(b) 12``);
       an upper-case letter followed by ``.``, ``)`` or ``:`` and a space -> that letter (``B. 12 cm``);
    5. anything else (``12 cm``, ``AB``, ``""``) -> None.

    >>> [normalize_choice(x) for x in ["B", "(b)", "B.", "B)", "Option B", r"\text{B}", "**B**"]]
    ['B', 'B', 'B', 'B', 'B', 'B', 'B']
    >>> normalize_choice("(C) 12 cm"), normalize_choice("C. 12 cm"), normalize_choice("12 cm")
    ('C', 'C', None)
    """
    if s is None:
        return None
    boxed = extract_boxed(s)
    s = strip_latex(boxed if boxed is not None else s)
    s = s.replace("*", "").replace("_", "").strip()
    s = _CHOICE_PREFIX_RE.sub("", s, count=1).strip()
    bare = s.strip("()[]").rstrip(".):").strip("()[] ")
    if len(bare) == 1 and bare.isascii() and bare.isalpha():
        return bare.upper()
    m = _LETTER_WITH_TEXT_RE.match(s)
    if m is not None:
        return next(g for g in m.groups() if g).upper()
    return None


def choice_equal(pred: str | None, gold: str | None) -> bool:
    r"""True when both name the same option letter (see `normalize_choice`); letters only, no option text.

    >>> choice_equal(r"\text{(B)}", "B"), choice_equal("b", "B"), choice_equal("12", "12")
    (True, True, False)
    """
    p = normalize_choice(pred)
    return p is not None and p == normalize_choice(gold)
