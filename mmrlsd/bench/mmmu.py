"""MMMU (validation, dev). Rules and evidence: eval/README.md.

Ported from MMMU-Benchmark/MMMU@bb0b95a `mmmu/utils/eval_utils.py` (`parse_multi_choice_response`,
`parse_open_response`, `eval_multi_choice`, `eval_open`, `calculate_ins_level_acc`) and its two entry points:

* parse-and-eval (`main_parse_and_eval.py --subject ALL`): raw responses are parsed, multiple choice with a
  seeded random fallback. Input: a directory of per-subject `output.json` files, or our `predictions.jsonl`.
* eval-only (`main_eval_only.py`): `{id: prediction}` (`total_val_output.json`); multiple-choice predictions
  are compared as given, open ones go through `parse_open_response`.

Official quirks kept: the random fallback (`random.Random(42)`, one stream per run, subjects in sorted order,
items in file order), open answers matched by substring (`"step b"` contains gold `" b"`), instance-weighted
discipline/overall accuracy, printed values rounded to 3 decimals.
Departures: none in `official` mode, except that non-string responses become strings instead of crashing,
and the open candidates keep first-seen order instead of Python set order (matching is order-free).
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path
from typing import Any

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

SEED = 42
DISCIPLINES = {  # upstream `DOMAIN_CAT2SUB_CAT`, in its order
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
SUBJECTS = sorted(s for subs in DISCIPLINES.values() for s in subs)  # upstream CAT_SHORT2LONG order
DISCIPLINE_OF = {s: d for d, subs in DISCIPLINES.items() for s in subs}
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


def subject_of(rid: str) -> str:
    """`validation_Art_Theory_3` -> `Art_Theory` (the parts between the first and the last `_`)."""
    return "_".join(rid.split("_")[1:-1])


# ---------------------------------------------------------------- parsing (eval_utils.py)


def parse_multi_choice_response(
    response: str, all_choices: list[str], index2ans: dict[str, str], rng: random.Random
) -> tuple[str, bool]:
    """Official multiple-choice parser. Returns (letter, used_random_fallback)."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    candidates = [c for c in all_choices if f"({c})" in response]
    found_by = "bracket"
    if not candidates:
        candidates, found_by = [c for c in all_choices if f" {c} " in response], "space"
    if not candidates and len(response.split()) > 5:
        lower = response.lower()
        candidates, found_by = [i for i, ans in index2ans.items() if ans.lower() in lower], "text"
    if not candidates:
        return rng.choice(all_choices), True
    if len(candidates) == 1:
        return candidates[0], False
    if found_by == "bracket":
        starts = [response.rfind(f"({c})") for c in candidates]
    elif found_by == "space":
        starts = [response.rfind(f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))], False  # np.argmax: first maximum


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list[Any]:
    """Official `normalize_str`: a number -> [round(float, 2)]; else lower-case, 1-char strings space-padded."""
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


UPSTREAM_NUMBER_PATTERNS = [  # verbatim from eval_utils.py; the last two backtrack quadratically on digit runs
    r"-?\b\d{1,3}(?:,\d{3})+\b",
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",
]
# The same matches in linear time: `(?<!\d)` before a leading `\d+` forbids starting inside a digit run. A start inside
# a run can only succeed when the start of that run does (both depend only on what follows the run), and
# then findall has already consumed the run, so no match is lost (tested against the upstream patterns).
_NUMBER_PATTERNS = [
    re.compile(UPSTREAM_NUMBER_PATTERNS[0]),
    re.compile(r"-?(?<!\d)\d+(?:\.\d+)?[eE][+-]?\d+"),
    re.compile(r"-?(?:(?<!\d)\d+\.\d+|\.\d+|(?<!\d)\d+\b)(?![eE][+-]?\d+)(?![,\d])"),
]
_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
_TRIVIAL = [":", ",", ".", "!", "?", ";", ":", "'"]


def extract_numbers(s: str) -> list[str]:
    """Official `extract_numbers`: commas, scientific, then simple numbers, concatenated in that order."""
    return [m for p in _NUMBER_PATTERNS for m in p.findall(s)]


def key_subresponses(response: str) -> list[str]:
    """Official `get_key_subresponses`."""
    response = response.strip().strip(".").lower()
    pieces = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, piece in enumerate(pieces):
        indicators = _INDICATORS + (["="] if index == len(pieces) - 1 else [])
        shortest = None
        for ind in indicators:
            if ind in piece:
                tail = piece.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[Any]:
    """Official `parse_open_response`: normalised candidate strings and floats (deduplicated, first-seen order)."""
    keys = key_subresponses(response)
    preds = keys + [n for k in keys for n in extract_numbers(k)]
    return list(dict.fromkeys(x for p in preds for x in normalize_str(p)))


def eval_multi_choice(gold: Any, pred: Any) -> bool:
    """Official: exact equality with the gold letter, or with any element of a gold list."""
    return pred in gold if isinstance(gold, list) else gold == pred


def eval_open(gold: Any, pred: list[Any]) -> bool:
    """Official: a string candidate contains a string gold, or a float candidate equals a float gold."""
    golds = [n for g in (gold if isinstance(gold, list) else [gold]) for n in normalize_str(str(g))]
    for p in pred:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


def ins_level_acc(results: dict[str, dict[str, Any]]) -> float:
    """Official `calculate_ins_level_acc`: Σ acc·n / Σ n in dict order; 0 when empty."""
    acc, num = 0.0, 0
    for r in results.values():
        acc += r["acc"] * r["num_example"]
        num += r["num_example"]
    return acc / num if num else 0


def printable_results(subject_results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The dict `main_eval_only.py` prints: per discipline `Overall-<D>` then its subjects, then `Overall`."""
    out = {}
    for discipline, subjects in DISCIPLINES.items():
        present = {s: subject_results[s] for s in subjects if s in subject_results}
        out[f"Overall-{discipline}"] = {
            "num": int(sum(r["num_example"] for r in present.values())),
            "acc": round(ins_level_acc(present), 3),
        }
        for s, r in present.items():
            out[s] = {"num": int(r["num_example"]), "acc": round(r["acc"], 3)}
    ordered = {s: subject_results[s] for s in SUBJECTS if s in subject_results}
    out["Overall"] = {
        "num": sum(r["num_example"] for r in ordered.values()),
        "acc": round(ins_level_acc(ordered), 3),
    }
    return out


# ---------------------------------------------------------------- records


def parse_options(options: Any, rid: str) -> list[str]:
    """HF `options` is a Python-list repr: `ast.literal_eval`, never `eval`."""
    if isinstance(options, list):
        return options
    try:
        parsed = ast.literal_eval(options)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"record {rid!r}: unparseable options {str(options)[:80]!r}") from e
    if not isinstance(parsed, list):
        raise ValueError(f"record {rid!r}: options is not a list")
    return [str(o) for o in parsed]


def gold_answer(answer: Any) -> Any:
    """HF answers that are list reprs (3 in validation) become lists, as in `answer_dict_val.json`."""
    if isinstance(answer, str) and answer.startswith("[") and answer.endswith("]"):
        try:
            parsed = ast.literal_eval(answer)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return answer
        if isinstance(parsed, list):
            return parsed
    return answer


def choice_info(options: list[str]) -> tuple[list[str], dict[str, str]]:
    """Upstream `get_multi_choice_info`: (["A", "B", ...], {"A": option, ...})."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return letters, dict(zip(letters, options))


@register("mmmu")
class MMMU(Bench):
    """MMMU validation (900) and dev (150); test answers are withheld."""

    hub_id = "MMMU/MMMU"
    splits = ("validation", "dev")
    default_split = "validation"
    modes = ("official",)

    def load(self, data_path: str | None, split: str) -> list[Record]:
        """Records from the hub (30 configs), a local HF parquet file or folder of them (`<Subject>/<split>-*.parquet`),
        a JSONL of records, or the gold-only `answer_dict_val.json` (enough for scoring, not for generation)."""
        if data_path is None:
            return [dict(r) for s in SUBJECTS for r in load_hub(self.hub_id, split, config=s)]
        records = read_records(data_path, split=split, id_field="id")
        if not records or any("answer" in r or "ground_truth" not in r for r in records):
            return records
        # answer_dict_val.json: {id: {question_type, ground_truth}}
        return [{"id": r["id"], "question_type": require(r, "question_type", r["id"]), "answer": r["ground_truth"]}
                for r in records]  # fmt: skip

    def record_id(self, record: Record) -> str:
        return str(record["id"])

    def prompt(self, record: Record) -> str:
        """`configs/llava1.5.yaml` prompt."""
        if record["question_type"] == "multiple-choice":
            options = parse_options(record["options"], self.record_id(record))
            letters = "".join(f"({chr(ord('A') + i)}) {o}\n" for i, o in enumerate(options))
            return f"{record['question']}\n{letters}\n{MC_INSTRUCTION}"
        return f"{record['question']}\n{OPEN_INSTRUCTION}"

    def images(self, record: Record, data_root: Path | None) -> list[Any]:
        """The images referenced by `<image k>` in the question and options, in order of first mention
        (all present images when none is referenced)."""
        text = f"{record.get('question', '')} {record.get('options', '')}"
        ks = list(dict.fromkeys(int(k) for k in re.findall(r"<image (\d+)>", text)))
        ks = [k for k in ks if record.get(f"image_{k}") is not None] or [
            k for k in range(1, 8) if record.get(f"image_{k}") is not None
        ]
        return [open_image(record[f"image_{k}"], data_root) for k in ks]

    def prediction_fields(self, record: Record) -> dict[str, Any]:
        """Make each `predictions.jsonl` row a parse-and-eval row (`output.json` format)."""
        row = {"question_type": record["question_type"], "answer": gold_answer(record.get("answer"))}
        if record["question_type"] == "multiple-choice":
            row["all_choices"], row["index2ans"] = choice_info(
                parse_options(record["options"], self.record_id(record))
            )
        return row

    def read_predictions(self, path: str | Path) -> Predictions:
        """A directory of `<Subject>/output.json` or one such file (parse-and-eval), `{id: prediction}`
        (eval-only, stored as rows `{"prediction": ...}`), or our `predictions.jsonl`."""
        path = Path(path)
        if path.is_dir():
            files = [path / s / "output.json" for s in SUBJECTS if (path / s / "output.json").is_file()]
            if not files:
                raise FileNotFoundError(f"{path}: no <Subject>/output.json files")
            return rows_by_id([r for f in files for r in read_json(f)], "id", f"{path}: ")
        if path.suffix == ".jsonl":
            return rows_by_id(read_jsonl(path), "id", f"{path}: ")
        data = read_json(path)
        if isinstance(data, list):
            return rows_by_id(data, "id", f"{path}: ")
        if isinstance(data, dict):
            return {str(rid): {"id": str(rid), "prediction": pred} for rid, pred in data.items()}
        raise ValueError(f"{path}: not an MMMU prediction file")

    def score(
        self,
        gold: list[Record],
        predictions: Predictions,
        *,
        mode: str = "official",
        split: str = "validation",
    ) -> dict[str, Any]:
        """Parse (rows with `response`) or take as given (rows with `prediction`), judge, aggregate."""
        check_mode(self, mode)
        by_id = {self.record_id(r): r for r in gold}
        rng = random.Random(SEED)
        order = {s: i for i, s in enumerate(SUBJECTS)}
        ids = sorted(
            predictions, key=lambda rid: order.get(subject_of(rid), len(order))
        )  # stable: file order
        items, labels, fallbacks, warnings = {}, {}, [], []
        for rid in ids:
            row = predictions[rid]
            rec = {**by_id.get(rid, {}), **{k: v for k, v in row.items() if k != "prediction"}}
            if rid not in by_id and "answer" not in row:
                raise KeyError(f"record {rid!r}: not in the gold answers")
            answer = gold_answer(require(rec, "answer", rid))
            is_mc = require(rec, "question_type", rid) == "multiple-choice"
            if "response" not in row and "prediction" not in row:
                warnings.append(f"record {rid!r}: no response or prediction; scored as ''")
            if "prediction" in row:  # eval-only: multiple choice as given, open parsed
                pred = row["prediction"] if is_mc else parse_open_response(as_response(row["prediction"]))
            elif is_mc:
                letters, index2ans = self._choices(rec, rid)
                pred, fell_back = parse_multi_choice_response(
                    as_response(row.get("response")), letters, index2ans, rng
                )
                if fell_back:
                    fallbacks.append(rid)
            else:
                pred = parse_open_response(as_response(row.get("response")))
            correct = eval_multi_choice(answer, pred) if is_mc else eval_open(answer, pred)
            items[rid] = {"prediction": pred, "correct": correct}
            subject = subject_of(rid)
            labels[rid] = {
                "subject": subject,
                "discipline": DISCIPLINE_OF.get(subject, "unknown"),
                "question_type": "multiple-choice" if is_mc else "open",
            }
        result = make_result(
            self.name, split, mode, items, labels, seed=SEED, fallbacks=fallbacks, warnings=warnings
        )
        subject_results = {
            s: {"acc": v["accuracy"], "num_example": v["total"]}
            for s, v in sorted(
                result["breakdown"].get("subject", {}).items(), key=lambda kv: order.get(kv[0], 99)
            )
        }
        result["subject_results"] = subject_results
        result["official"] = printable_results(subject_results)
        return result

    def _choices(self, rec: Record, rid: str) -> tuple[list[str], dict[str, str]]:
        if "all_choices" in rec and "index2ans" in rec:
            return list(rec["all_choices"]), dict(rec["index2ans"])
        if "options" in rec:
            return choice_info(parse_options(rec["options"], rid))
        raise KeyError(
            f"record {rid!r}: a raw multiple-choice response needs the options (all_choices/index2ans in the "
            "prediction row, or --data pointing at the dataset records, not answer_dict_val.json)"
        )
