"""MathVista (testmini; test for prediction export). Rules and evidence: eval/README.md.

Modes:
* `official`  the upstream scorer `evaluation/calculate_score.py` (lupantech/MathVista@53d5258) applied to the
  **recorded** `extraction` field of an upstream-format output file (GPT extraction happened upstream).
  A row without `extraction` is scored as `""` and counted in `warnings`.
* `rule-v1`   project-defined rule extraction (`rule_v1_extract`), then the official normalisation and matching.
  NOT official: results carry `label` "... (rule-v1 extraction, not comparable to official)".
* `llm`       the official protocol with a judge the user configures (`Judge`, any OpenAI-compatible
  endpoint): upstream `extract_answer.py` steps 1-4, then the 5-shot judge prompt; an API error gives "".
  Judge-dependent, so its label names the judge. Without a judge it fails; it never falls back to rules.

Official quirks kept: multiple choice always maps to some choice (Levenshtein fallback, ties to the
first choice); integers truncate (`str(int(float(x)))`); floats `str(round(float(x), int(precision)))`; lists
compare as raw strings; the gold and the metadata come from the scored output record when present.
"""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from Levenshtein import distance

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
from mmrlsd.reward.answer import extract_boxed

HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
    "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}
BREAKDOWN_KEYS = (
    "question_type",
    "answer_type",
    "language",
    "source",
    "category",
    "task",
    "context",
    "grade",
    "skills",
)
LEADERBOARD = {  # column -> (breakdown group, value), the leaderboard's columns
    "FQA": ("task", "figure question answering"),
    "GPS": ("task", "geometry problem solving"),
    "MWP": ("task", "math word problem"),
    "TQA": ("task", "textbook question answering"),
    "VQA": ("task", "visual question answering"),
    "ALG": ("skills", "algebraic reasoning"),
    "ARI": ("skills", "arithmetic reasoning"),
    "GEO": ("skills", "geometry reasoning"),
    "LOG": ("skills", "logical reasoning"),
    "NUM": ("skills", "numeric commonsense"),
    "SCI": ("skills", "scientific reasoning"),
    "STA": ("skills", "statistical reasoning"),
}
RULE_LABEL = "MathVista testmini (rule-v1 extraction, not comparable to official)"


# ---------------------------------------------------------------- prompt


def build_query(record: Record) -> str:
    """The official zero-shot prompt; equals `data/query.json[pid]` for all 1000 testmini pids."""
    if record["question_type"] == "multi_choice":
        hint = HINTS["multi_choice"]
    elif record["answer_type"] == "float":
        hint = HINTS[f"float{int(record['precision'])}"]
    else:
        hint = HINTS[record["answer_type"]]
    text = f"{hint}\nQuestion: {record['question']}"
    if record.get("unit"):
        text += f" (Unit: {record['unit']})"
    if record.get("choices"):
        text += "\nChoices:" + "".join(
            f"\n({chr(ord('A') + i)}) {c}" for i, c in enumerate(record["choices"])
        )
    return text.strip()


# ---------------------------------------------------------------- official normalisation (calculate_score.py)


def most_similar(extraction: str, choices: list[str]) -> str:
    """The choice with the minimum Levenshtein distance (unit cost over code points); ties -> first choice."""
    distances = [distance(extraction, c) for c in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(
    extraction: Any, choices: list[str] | None, question_type: str, answer_type: str, precision: Any
) -> str | None:
    """Official `normalize_extracted_answer`: the prediction string compared with the gold, or None.

    >>> normalize_extracted_answer("(b) 102", ["97", "102"], "multi_choice", "text", None)
    '102'
    >>> normalize_extracted_answer("7.07", None, "free_form", "integer", None)
    '7'
    >>> normalize_extracted_answer("0.11", None, "free_form", "float", 1.0)
    '0.1'
    """
    if question_type == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        return most_similar(extraction, choices)
    if answer_type == "integer":
        try:
            return str(int(float(extraction)))
        except Exception:
            return None
    if answer_type == "float":
        try:
            return str(round(float(extraction), int(precision)))
        except Exception:
            return None
    if answer_type == "list":
        return str(extraction)
    raise ValueError(
        f"no official normalisation for question_type={question_type!r} answer_type={answer_type!r}"
    )


# ---------------------------------------------------------------- rule-v1 extraction (project-defined)

_ANSWER_IS = re.compile(r"answer is|answer:", re.IGNORECASE)
_LETTER = re.compile(r"\(([A-Z])\)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LIST = re.compile(r"\[[^\[\]]*\]")


def quick_extract(response: str) -> str | None:
    """Group 1 of the first match of upstream's `The answer is "(.*)"\\.`, in linear time: `.` stops at
    a newline and `.*` is greedy, so the group runs to the last `".` on the line of the first opening that
    has one (the regex itself backtracks quadratically on many openings without a closing)."""
    opening, start = 'The answer is "', 0
    while (p := response.find(opening, start)) >= 0:
        q = p + len(opening)
        end = response.find("\n", q)
        end = len(response) if end < 0 else end
        close = response.rfind('".', q, end)
        if close >= 0:
            return response[q:close]
        start = end  # a later opening on this line sees a subset of the same text
    return None


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    m = None
    for m in pattern.finditer(text):  # noqa: B007
        pass
    return m


def rule_v1_extract(response: str, record: Record) -> str:
    """`rule-v1` extraction: official steps 1-4, quick-extract, then boxed / 'answer is' / by type."""
    question_type, answer_type, choices = (
        record["question_type"],
        record["answer_type"],
        record.get("choices"),
    )
    if response == "":
        return ""
    if question_type == "multi_choice" and response in (choices or []):
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quick = quick_extract(response)
    if quick is not None:
        return quick
    candidate, region = extract_boxed(response), True
    if candidate is None:
        m = _last(_ANSWER_IS, response)
        if m:
            candidate = response[m.end() :].split("\n", 1)[0].strip().removesuffix(".")
        else:
            candidate, region = response, False
    candidate = candidate.strip()
    if question_type == "multi_choice":
        if region:
            return candidate
        letter = _last(_LETTER, response)
        if letter:
            return letter.group(1)
        positions = [(response.rfind(c), -i) for i, c in enumerate(choices or []) if c]
        best = max(positions, default=(-1, 0))
        return choices[-best[1]] if best[0] >= 0 else ""
    if answer_type in ("integer", "float"):
        m = _last(_NUMBER, candidate) or _last(_NUMBER, response)
        return m.group(0).replace(",", "") if m else ""
    if answer_type == "list":
        m = _last(_LIST, candidate) or _last(_LIST, response)
        return m.group(0) if m else ""
    raise ValueError(f"no rule-v1 extraction for question_type={question_type!r} answer_type={answer_type!r}")


# ---------------------------------------------------------------- llm extraction (upstream step 6)

# The 5-shot extraction prompt of the paper (MathVista, appendix "Prompt for Answer Extraction"), written with
# our HINTS; upstream keeps it in `evaluation/prompts/ext_ans.py`. Whitespace may differ from that file,
# which does not matter for a sampled judge.
DEMO_PROMPT = "\n\n".join(
    [
        "Please read the following example. Then extract the answer from the model response and type it at the "
        "end of the prompt.",
        *(
            f"{HINTS[hint]}\nQuestion: {question}\n\nModel response: {response}\n\nExtracted answer: {answer}"
            for hint, question, response, answer in [
                ("integer", "Which number is missing?", "The number missing in the sequence is 14.", "14"),
                ("float1", "What is the fraction of females facing the camera?",
                 "The fraction of females facing the camera is 0.6, which means that six out of ten females in "
                 "the group are facing the camera.", "0.6"),
                ("float2", "How much money does Luca need to buy a sour apple candy and a butterscotch candy? "
                 "(Unit: $)", "Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.", "1.45"),
                ("list", "Between which two years does the line graph saw its maximum peak?",
                 "The line graph saw its maximum peak between 2007 and 2008.", "[2007, 2008]"),
                ("multi_choice", "What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5",
                 "The correct answer is (B) 8/11.", "B"),
            ]
        ),
    ]
)  # fmt: skip


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint that extracts answers (`POST {url}/chat/completions`)."""

    url: str
    """Base URL, e.g. `http://localhost:8000/v1` or `https://api.openai.com/v1`."""
    model: str
    api_key: str = ""
    timeout: float = 60.0
    workers: int = 8
    """Concurrent requests."""

    def __call__(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(), headers=headers
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (user-configured URL)
            return str(json.loads(resp.read())["choices"][0]["message"]["content"])


def llm_prompt(record: Record, response: str) -> str:
    """Upstream `create_test_prompt`: demo prompt, the item's query, the raw response, `Extracted answer: `."""
    return f"{DEMO_PROMPT}\n\n{build_query(record)}\n\n{response}\n\nExtracted answer: "


def llm_extract(response: str, record: Record, judge: Judge) -> tuple[str, bool]:
    """Upstream `extract_answer` without quick-extract: steps 1-4, then the judge; an API error gives ""."""
    qtype, atype = record["question_type"], record["answer_type"]
    if response == "":
        return "", True
    if qtype == "multi_choice" and response in record["choices"]:
        return response, True
    if atype == "integer":
        try:
            return str(int(response)), True
        except ValueError:
            pass
    if atype == "float":
        try:
            return str(float(response)), True
        except ValueError:
            pass
    try:
        return judge(llm_prompt(record, response)), True
    except Exception:  # upstream prints the error and returns ""
        return "", False


def llm_extract_all(recs: dict[str, Record], judge: Judge) -> tuple[dict[str, str], list[str]]:
    """pid -> extraction for every record (judge calls in parallel), and the pids whose call failed."""
    pids = list(recs)
    with ThreadPoolExecutor(max_workers=max(judge.workers, 1)) as pool:
        outs = list(
            pool.map(lambda p: llm_extract(as_response(recs[p].get("response")), recs[p], judge), pids)
        )
    return {p: ext for p, (ext, _) in zip(pids, outs)}, [p for p, (_, ok) in zip(pids, outs) if not ok]


# ---------------------------------------------------------------- the benchmark


@register("mathvista")
class MathVista(Bench):
    """MathVista testmini (1000, gold public) and test (5141, answers withheld: predictions only)."""

    hub_id = "AI4Math/MathVista"
    splits = ("testmini", "test")
    default_split = "testmini"
    unscored_splits = ("test",)
    modes = ("official", "rule-v1", "llm")
    generate_mode = "rule-v1"
    judge: Judge | None = None
    """Extraction judge for mode `llm` (set by `mmrlsd eval --judge-url ... --judge-model ...`)."""

    def load(self, data_path: str | None, split: str) -> list[Record]:
        """`data/testmini.json` (dict pid -> record), a JSON list / JSONL of records, or an HF parquet file."""
        if data_path is None:
            return [dict(r) for r in load_hub(self.hub_id, split)]
        return read_records(data_path, split=split, id_field="pid")

    def record_id(self, record: Record) -> str:
        return str(record["pid"])

    def prompt(self, record: Record) -> str:
        return build_query(record)

    def images(self, record: Record, data_root: Path | None) -> list[Any]:
        value = record.get("decoded_image") or record.get("image")
        return [open_image(value, data_root)]

    def read_predictions(self, path: str | Path) -> Predictions:
        """Our `predictions.jsonl` (`{id, response}` rows) or an upstream `output_*.json` (pid -> record)."""
        if str(path).endswith(".jsonl"):
            rows = read_jsonl(path)
            return rows_by_id(rows, "pid" if rows and all("pid" in r for r in rows) else "id", f"{path}: ")
        data = read_json(path)
        if isinstance(data, list):
            return rows_by_id(data, "pid", f"{path}: ")
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path}: expected a MathVista output file (pid -> record)")
        return {str(pid): row for pid, row in data.items()}

    def score(
        self, gold: list[Record], predictions: Predictions, *, mode: str = "official", split: str = "testmini"
    ) -> dict[str, Any]:
        """Score every pid in `predictions` (the official total is the number of pids in the file)."""
        check_mode(self, mode)
        if mode == "llm" and self.judge is None:
            raise ValueError(
                "mathvista: mode 'llm' needs a judge (--judge-url, --judge-model); no rule fallback"
            )
        by_pid = {self.record_id(r): r for r in gold}
        recs = {
            pid: {**by_pid.get(pid, {}), **row} for pid, row in predictions.items()
        }  # output record wins, as upstream
        for pid, rec in recs.items():
            for field in ("question_type", "answer_type", "answer"):
                require(rec, field, pid)
            if rec["question_type"] == "multi_choice" and not rec.get("choices"):
                raise KeyError(f"record {pid!r}: multi_choice without choices")
        field = "extraction" if mode == "official" else "response"
        missing = [pid for pid, rec in recs.items() if field not in rec]
        warnings = (
            [f"{len(missing)} rows without {field!r} scored as '' (first: record {missing[0]!r})"]
            if missing
            else []
        )
        if mode == "official":
            extractions = {pid: rec.get("extraction", "") for pid, rec in recs.items()}
        elif mode == "rule-v1":
            extractions = {
                pid: rule_v1_extract(as_response(rec.get("response")), rec) for pid, rec in recs.items()
            }
        else:
            extractions, failed = llm_extract_all(recs, self.judge)
            if failed:
                warnings.append(
                    f"{len(failed)} judge calls failed, extraction '' (first: record {failed[0]!r})"
                )
        items, labels = {}, {}
        for pid, rec in recs.items():
            extraction = extractions[pid]
            pred = normalize_extracted_answer(
                extraction, rec.get("choices"), rec["question_type"], rec["answer_type"], rec.get("precision")
            )
            items[pid] = {"prediction": pred, "correct": pred == rec["answer"], "extraction": extraction}
            meta = rec.get("metadata") or {}
            labels[pid] = {
                k: rec[k] if k in rec else meta[k] for k in BREAKDOWN_KEYS if k in rec or k in meta
            }
        if split == "testmini" and len(items) != 1000:
            warnings.append(f"scored {len(items)} pids, not the 1000 of testmini")
        source = {"official": "recorded", "rule-v1": "rule-v1"}.get(mode) or f"llm:{self.judge.model}"
        result = make_result(
            self.name, split, mode, items, labels, extraction_source=source, warnings=warnings
        )
        if mode == "rule-v1":
            result["label"] = RULE_LABEL
        elif mode == "llm":
            result["label"] = (
                f"MathVista {split} (LLM extraction by {self.judge.model}; the paper used GPT-4)"
            )
        result["leaderboard"] = leaderboard(result)
        return result


def leaderboard(result: dict[str, Any]) -> dict[str, float]:
    """Leaderboard columns (ALL, FQA, ..., STA) as percents with 1 decimal from the exact fractions."""
    cols = {"ALL": (result["correct"], result["n"])}
    for col, (group, value) in LEADERBOARD.items():
        cell = result["breakdown"].get(group, {}).get(value)
        if cell:
            cols[col] = (cell["correct"], cell["total"])
    return {col: round(100 * c / t, 1) if t else 0.0 for col, (c, t) in cols.items()}
