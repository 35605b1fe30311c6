r"""MATH-Vision (MATH-V): splits `test` (3040) and `testmini` (304, a subset of test). Rules and evidence: eval/README.md.

Mode `official` ports upstream `evaluation/evaluate.py` (`evaluate(file, regen_answer=True)` and
`math_level_subject_acc`) and `evaluation/utils.py` (`find_math_answer`, `_strip_string`, `is_equal`) of
`mathllm/MATH-V@a1f5cc3`: the answer is re-extracted from `response` by rules (`extract_answer`), and an
item is correct when ``is_equal(gt, answer) or is_equal(gt_option_text, answer)``.

Quirks kept: only one numeric tolerance (both sides rounded to 2 decimals); fraction fixing runs only when
the string contains ``sqrt``; the ``oxed{...}`` capture runs to the *last* ``}`` of the text; latex2sympy2
runs in the global state upstream enters at its first ``d<letter>`` string, where any letter fails to
convert (`_mathv_equal.enter_upstream_steady_state`), so verdicts do not depend on item order.
Departures, all turning a hang or crash into "not equal" and a warning: `_mathv_equal.safe_eval` replaces
``eval``; each numeric comparison has a time limit (`MathVision.item_timeout`); a null response scores as
``""``; prediction ids outside the gold split are skipped. `testmini` is the same computation restricted to
the 304 testmini ids (upstream scores only full-test files).

The numeric step needs latex2sympy2 1.9.1 with antlr4-python3-runtime 4.7.2, which cannot live beside
math-verify's antlr4: it runs in a worker process over a private site directory (`_mathv_equal`), which is
installed on first use (`MathVision.setup`, one line on stderr) or ahead of time with::

    python -m mmrlsd.bench.mathvision_setup      # pip install --target ~/.cache/mmrlsd/mathv-site ...
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmrlsd.bench import _mathv_equal as eq
from mmrlsd.bench.base import (
    Bench,
    Predictions,
    Record,
    as_response,
    check_mode,
    load_hub,
    make_result,
    open_image,
    read_json,
    read_jsonl,
    read_records,
    register,
    require,
    rows_by_id,
)

INSTRUCTION = (
    'Please solve the problem and put your answer in one "\\boxed{}". '
    'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".'
)
"""Upstream `models/GPT4V.py` (`process_example_mergedimg`), one backslash before `boxed`."""

SUBJECTS = {  # subject -> leaderboard abbreviation
    "algebra": "Alg",
    "analytic geometry": "AnaG",
    "arithmetic": "Ari",
    "combinatorial geometry": "CombG",
    "combinatorics": "Comb",
    "counting": "Cnt",
    "descriptive geometry": "DescG",
    "graph theory": "GrphT",
    "logic": "Log",
    "metric geometry - angle": "Angle",
    "metric geometry - area": "Area",
    "metric geometry - length": "Len",
    "solid geometry": "SolG",
    "statistics": "Stat",
    "topology": "Topo",
    "transformation geometry": "TransG",
}
ANSWER_PHRASES = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")
LETTERS = "ABCDE"


# ---------------------------------------------------------------- prompt


def build_prompt(record: Record) -> str:
    """`INSTRUCTION + "\\n" + question + "\\n" + options`, options as ``"(A) o1\\n...(E) o5\\n"`` unless they
    are just the letters A..E (drawn in the image); `<imageN>` placeholders stay in the question."""
    options = record.get("options") or []
    text = ""
    if options and "".join(options) != "ABCDE":
        text = "".join(f"({c}) {o}\n" for c, o in zip(LETTERS, options))
    return f"{INSTRUCTION}\n{record['question']}\n{text}"


# ---------------------------------------------------------------- extraction (upstream evaluate.py / utils.py)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def extract_answer(response: str) -> str:
    """Upstream `evaluate()` with `regen_answer=True`: the `model_answer` of a response.

    >>> extract_answer("So the area is 4.8.")
    '4.8'
    >>> extract_answer("Hence the answer is \\\\boxed{\\\\frac{4}{3}}")
    '\\\\frac{4}{3}'
    >>> extract_answer("(C)\\nbecause ...")
    'c'
    """
    m = response.strip()
    for c in LETTERS:  # once m is one letter, no later test can match
        if m.endswith((f" {c}.", f" ({c}).")) or m.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            m = c
    tail = m.rpartition("is ")[2].rstrip(".")
    if _is_float(tail):
        m = tail
    if "oxed{" not in m:
        for phrase in ANSWER_PHRASES:
            for flag in (phrase, phrase.replace("the", "The")):
                present = flag in m
                m = m.rpartition(flag)[2].strip()
                if present:
                    m = m.split("\n", 1)[0].split(". ", 1)[0]
    elif m.count("oxed{") > 1:
        m = "\\boxed{" + m.rpartition("oxed{")[2]
    m = find_math_answer(m)
    for c in "abcde":
        m = m.replace(f"({c})", c)
    for c in "abcde":
        m = m.replace("{" + c + "}", c)
    return m.rstrip(".").lstrip(":").strip()


_FIND_REPLACEMENTS = (
    (" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
    ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""),
    ("{km}", ""), ("km", ""),
)  # fmt: skip


def boxed_content(s: str) -> str:
    """Upstream's ``re.compile('oxed{(.*)}', re.S).findall(s)[-1]``, else `s`: the greedy match runs from
    the first `oxed{` to the last `}`, so it is found with two string searches (linear time, where the
    regex is quadratic on many `oxed{` without a `}`)."""
    start, end = s.find("oxed{"), s.rfind("}")
    return s[start + 5 : end] if start != -1 and end >= start + 5 else s


def find_math_answer(s: str) -> str:
    """Upstream `find_math_answer`."""
    ans = boxed_content(s.lower().replace("{}", ""))
    close, open_ = ans.find("}"), ans.find("{")
    if close != -1 and (open_ == -1 or close < open_):
        ans = ans[:close]
    ans = ans.rpartition("=")[2].rpartition("\\approx")[2]
    for old, new in _FIND_REPLACEMENTS:
        ans = ans.replace(old, new)
    return strip_string(ans)


def strip_string(s: str) -> str:
    """Upstream `_strip_string`, including its quirk: `_fix_fracs` runs only if `sqrt` occurs."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        s = s.replace(old, new)
    for old in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$", "$"):
        s = s.replace(old, "")
    s = s.split("\\text{ ", 1)[0].replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if s.count("=") == 1:
        s = s.split("=")[1]
    if s.count("\\approx") == 1:
        s = s.split("\\approx")[1]
    if "sqrt" in s:
        s = _fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``: a single character after ``\\sqrt`` without ``{`` gets braces."""
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        out.append("\\sqrt{" + part[0] + "}" + part[1:] if part and part[0] != "{" else "\\sqrt" + part)
    return "".join(out)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; if a bare ``\\frac`` has fewer
    than 2 characters after it, the input is returned unchanged."""
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part and part[0] == "{":
            out.append(part)
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """``a/b`` (exactly one ``/``, both canonical integers) -> ``\\frac{a}{b}``."""
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    try:
        if f"{int(a)}/{int(b)}" == s:
            return "\\frac{" + a + "}{" + b + "}"
    except ValueError:
        pass
    return s


# ---------------------------------------------------------------- equality and metrics


def gold_answers(record: Record, rid: str) -> tuple[str, str]:
    """(gt, gt_value): the gold answer and, for multiple choice, the text of its option (else "")."""
    gt = str(require(record, "answer", rid))
    options = record.get("options") or []
    if not options:
        return gt, ""
    k = ord(gt) - ord("A") if len(gt) == 1 else -1
    if not 0 <= k < len(options):
        raise ValueError(f"record {rid!r}: answer {gt!r} does not name one of its {len(options)} options")
    return gt, str(options[k])


def official_result_dict(rows: Iterable[tuple[Any, str, bool]]) -> dict[str, str]:
    """Upstream `math_level_subject_acc` on (level, subject, correct) rows: keys `-all`, `-level{L}`,
    `{subject}`, `{subject}_level{L}`, `-level{L}_{subject}` in Python string order, values
    ``f"{c}/{n}={round(c / n * 100, 2)}%"``.

    >>> official_result_dict([(1, "logic", True), (1, "logic", False), (2, "logic", False)])["-all"]
    '1/3=33.33%'
    """
    counts: dict[str, list[int]] = {}
    for level, subject, ok in rows:
        for key in (
            "-all",
            f"-level{level}",
            f"{subject}",
            f"{subject}_level{level}",
            f"-level{level}_{subject}",
        ):
            c = counts.setdefault(key, [0, 0])
            c[0] += bool(ok)
            c[1] += 1
    return {k: f"{c}/{n}={round(c / n * 100, 2)}%" for k, (c, n) in sorted(counts.items())}


def judge(
    pairs: list[list[eq.Pair]], site: Path | None = None, item_timeout: float = 10.0
) -> tuple[list[tuple[bool, str | None]], dict[str, str]]:
    """Per item, ``any(is_equal(x, y) for x, y in item)`` -> ([(correct, note), ...], package versions);
    note is None, ``"timeout"`` or ``"worker died"`` (then correct is False).

    The text steps, single letters and plain numerals are decided here (`text_verdict`, `local_verdict`);
    the rest go to the latex2sympy2 side (`_mathv_equal.shared_pool`, worker processes that stay up for
    later calls) in one streamed round trip, identical items asked once.
    """
    verdicts: list[tuple[bool, str | None]] = [(False, None)] * len(pairs)
    todo: dict[tuple[eq.Pair, ...], list[int]] = {}
    for i, item in enumerate(pairs):
        rest = []
        for x, y in item:
            v = eq.text_verdict(x, y)
            if v is None:
                x, y = x.lower(), y.lower()
                v = eq.local_verdict(x, y)
            if v is True:
                verdicts[i] = (True, None)
                break
            if v is None:
                rest.append((x, y))
        else:
            if rest:
                todo.setdefault(tuple(rest), []).append(i)
    versions: dict[str, str] = {}
    if todo:
        pool = eq.shared_pool(eq.ensure_site(site), item_timeout)
        jobs = list(todo)
        for job, out in zip(jobs, pool.run([list(j) for j in jobs])):
            for i in todo[job]:
                verdicts[i] = out
        versions = pool.versions
    return verdicts, versions


# ---------------------------------------------------------------- the benchmark


@register("mathvision")
class MathVision(Bench):
    """MATH-V test (3040) and testmini (304); rules-only extraction, official mode only."""

    hub_id = "MathLLMs/MathVision"
    splits = ("test", "testmini")
    default_split = "test"
    modes = ("official",)
    item_timeout: float = 10.0
    """Seconds allowed per item for the latex2sympy2 comparison; over it the item is not equal (warned)."""
    site: Path | None = None
    """Private site with the pinned latex2sympy2 (None: `_mathv_equal.default_site()`)."""

    def setup(self) -> None:
        """Install the pinned latex2sympy2 site on first use (`_mathv_equal.ensure_site`)."""
        self.site = eq.ensure_site(self.site)

    def load(self, data_path: str | None, split: str) -> list[Record]:
        """`data/test.jsonl` / `data/testmini.jsonl` (or a JSON list, or an HF parquet file), else the hub."""
        if data_path is None:
            return [dict(r) for r in load_hub(self.hub_id, split)]
        return read_records(data_path, split=split, id_field="id")

    def record_id(self, record: Record) -> str:
        return str(record["id"])

    def prompt(self, record: Record) -> str:
        return build_prompt(record)

    def images(self, record: Record, data_root: Path | None) -> list[Any]:
        """The one composite image (`images/<id>.jpg`, or the hub's `decoded_image`)."""
        return [open_image(record.get("decoded_image") or record["image"], data_root)]

    def read_predictions(self, path: str | Path) -> Predictions:
        """Our `predictions.jsonl` or an upstream output `.jsonl` (`{id, model, response, model_answer,
        correct}`; the stored `model_answer` and `correct` are ignored: answers are re-extracted)."""
        if str(path).endswith(".jsonl"):
            return rows_by_id(read_jsonl(path), "id", f"{path}: ")
        data = read_json(path)
        if isinstance(data, list):
            return rows_by_id(data, "id", f"{path}: ")
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path}: expected MATH-V predictions (JSONL rows with id and response)")
        return {str(k): v for k, v in data.items()}

    def score(
        self, gold: list[Record], predictions: Predictions, *, mode: str = "official", split: str = "test"
    ) -> dict[str, Any]:
        """Score the prediction ids that are in `gold`, in file order (`n` is their number, as upstream)."""
        check_mode(self, mode)
        by_id = {self.record_id(r): r for r in gold}
        ids = [rid for rid in predictions if rid in by_id]
        answers, pairs = {}, []
        for rid in ids:
            response = as_response(require(predictions[rid], "response", rid))
            answers[rid] = extract_answer(response)
            gt, gt_value = gold_answers(by_id[rid], rid)
            pairs.append([(gt, answers[rid]), (gt_value, answers[rid])])
        verdicts, versions = judge(pairs, self.site, self.item_timeout)
        items, labels, rows, slow = {}, {}, [], []
        for rid, (ok, note) in zip(ids, verdicts):
            rec = by_id[rid]
            level, subject = require(rec, "level", rid), require(rec, "subject", rid)
            items[rid] = {"prediction": answers[rid], "correct": ok, **({"note": note} if note else {})}
            labels[rid] = {"level": level, "subject": subject}
            rows.append((level, subject, ok))
            if note:
                slow.append(rid)
        warnings = []
        if skipped := len(predictions) - len(ids):
            warnings.append(
                f"{skipped} prediction ids are not in the gold {split or 'data'} and were skipped"
            )
        if unanswered := len(by_id) - len(ids):
            warnings.append(
                f"{unanswered} of {len(by_id)} gold ids have no prediction (n counts only predicted ids)"
            )
        if slow:
            warnings.append(
                f"{len(slow)} items hit the {self.item_timeout:g} s equality limit or crashed the worker and "
                f"were scored not equal: {slow[:10]}"
            )
        result = make_result(
            self.name,
            split,
            mode,
            items,
            labels,
            official=official_result_dict(rows),
            equality_env=versions,
            warnings=warnings,
        )
        result["leaderboard"] = leaderboard(result)
        return result


def leaderboard(result: dict[str, Any]) -> dict[str, float]:
    """ALL and the 16 subject columns (abbreviated) as percents rounded to 2 decimals, like `official`."""
    cols = {"ALL": (result["correct"], result["n"])}
    for subject, cell in result["breakdown"].get("subject", {}).items():
        cols[SUBJECTS.get(subject, subject)] = (cell["correct"], cell["total"])
    return {col: round(c / n * 100, 2) if n else 0.0 for col, (c, n) in cols.items()}  # as `official`
