"""ZeroBench: 100 main questions (`zerobench`) and 334 sub-questions (`zerobench_subquestions`).

Data: the Hugging Face dataset `jonathan-roberts1/zerobench` (one config, two splits; columns `question_id`,
`question_text`, `question_images_decoded` (a list of images), `question_answer`, plus `question_images`
(relative paths) and `image_attribution`). Each question may have several images; all are passed, in order.

Official protocol, as published with the dataset (its README; the repository `jonathan-roberts1/zerobench`
holds only that README):

* prompt: ``question_text + "\\n\\n\\n" + INSTRUCTION``, the instruction asking for the final answer in curly
  braces (`build_prompt`);
* extraction: the last ``{...}`` of the lower-cased, stripped response, found with ``re.findall(r"\\{(.*?)\\}")``
  (`parse_answer`); no match gives ``""``;
* matching: ``parsed[:len(gold)].lower() == gold.strip().lower() and len(parsed) == len(gold.strip())``
  (`is_correct`).

Quirks kept: the text inside the braces is not stripped (``{ Paris }`` is wrong); ``.`` does not cross a line
break, so ``{11.\\n90}`` is no answer; the match is lazy (``{{x}}`` parses as ``{x``); numbers compare as
strings (``{11.9}`` is wrong for ``11.90``); a gold whose lower-case form is longer than itself (``İ``) can
never match, because the length test uses the gold as written.

Metrics: pass@1 from the greedy response (`response`, the schema's `accuracy`); with k sampled responses per
question (`responses`, k = 5 in the paper), pass@k (some sample correct) and k/k reliability (all correct).
"""

from __future__ import annotations

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

INSTRUCTION = "Let's think step by step and give the final answer in curly braces, like this: {final answer}"
"""The dataset's answer-format instruction, appended to every question after three line breaks."""


def build_prompt(record: Record) -> str:
    """The official prompt: the question text, three line breaks, `INSTRUCTION`."""
    return f"{record['question_text']}\n\n\n{INSTRUCTION}"


def parse_answer(response: str) -> str:
    """The last ``{...}`` of ``response.strip().lower()``, as ``re.findall(r"\\{(.*?)\\}", s)[-1]``, else "".

    Linear time: on one line, the lazy match starting at the first ``{`` ends at the first ``}`` after it,
    and when no ``}`` follows a ``{`` none follows any later one either, so each line is scanned once.
    """
    last = ""
    for line in response.strip().lower().split("\n"):  # `.` matches anything but "\n"
        start = line.find("{")
        while start != -1:
            end = line.find("}", start + 1)
            if end == -1:
                break
            last = line[start + 1 : end]
            start = line.find("{", end + 1)
    return last


def is_correct(parsed: str, gold: str) -> bool:
    """The official comparison, verbatim (see the module docstring for its quirks)."""
    return parsed[: len(gold)].lower() == gold.strip().lower() and len(parsed) == len(gold.strip())


def gold_answer(record: Record, rid: str) -> str:
    """The record's `question_answer` as text (a number read from JSON becomes its `str`)."""
    value = require(record, "question_answer", rid)
    return value if isinstance(value, str) else str(value)


def sample_responses(row: dict[str, Any], rid: str) -> list[str] | None:
    """The row's k sampled responses (`responses`), or None when it has none."""
    value = row.get("responses")
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"record {rid!r}: 'responses' must be a list of sampled responses")
    return [as_response(v) for v in value]


@register("zerobench")
class ZeroBench(Bench):
    """ZeroBench main questions or sub-questions; official mode only (rules, no judge)."""

    hub_id = "jonathan-roberts1/zerobench"
    splits = ("zerobench", "zerobench_subquestions")
    default_split = "zerobench"
    modes = ("official",)

    def load(self, data_path: str | None, split: str) -> list[Record]:
        """The hub split, or a local copy: the HF parquet file (or a folder holding `<split>-*.parquet`),
        JSONL or a JSON list of records with the dataset's columns."""
        if data_path is None:
            return [dict(r) for r in load_hub(self.hub_id, split)]
        return read_records(data_path, split=split)

    def record_id(self, record: Record) -> str:
        return str(record["question_id"])

    def prompt(self, record: Record) -> str:
        return build_prompt(record)

    def images(self, record: Record, data_root: Path | None) -> list[Any]:
        """`question_images_decoded` (PIL images or `{bytes, path}` structs), else the relative paths in
        `question_images`, resolved against `data_root`."""
        images = record.get("question_images_decoded") or record.get("question_images") or []
        if not isinstance(images, list):
            raise ValueError(f"record {self.record_id(record)!r}: question images must be a list")
        return [open_image(img, data_root) for img in images]

    def read_predictions(self, path: str | Path) -> Predictions:
        """Our `predictions.jsonl` (`{id, response}` rows, optionally `responses`: k sampled answers), or a
        JSON list of such rows, or a JSON object `{question_id: response}`."""
        if str(path).endswith(".jsonl"):
            return rows_by_id(read_jsonl(path), "id", f"{path}: ")
        data = read_json(path)
        if isinstance(data, list):
            return rows_by_id(data, "id", f"{path}: ")
        if isinstance(data, dict):
            return {
                str(k): v if isinstance(v, dict) else {"id": str(k), "response": v} for k, v in data.items()
            }
        raise ValueError(f"{path}: expected ZeroBench predictions (JSONL rows with id and response)")

    def score(
        self, gold: list[Record], predictions: Predictions, *, mode: str = "official", split: str = ""
    ) -> dict[str, Any]:
        """Score the prediction ids that are in `gold` (file order). pass@1 is the schema's `accuracy`; rows
        with `responses` add `pass_at_k` = {k, pass@k, k/k} over the questions scored."""
        check_mode(self, mode)
        by_id = {self.record_id(r): r for r in gold}
        ids = [rid for rid in predictions if rid in by_id]
        if predictions and not ids:
            raise ValueError(
                f"none of the {len(predictions)} prediction ids is in the gold {split or 'data'} "
                f"(first: {next(iter(predictions))!r}); wrong split or gold file?"
            )
        items: dict[str, dict[str, Any]] = {}
        sampled: dict[str, list[bool]] = {}
        warnings = []
        for rid in ids:
            row, gold_text = predictions[rid], gold_answer(by_id[rid], rid)
            if "response" not in row:
                warnings.append(f"record {rid!r}: no 'response'; scored as empty")
            parsed = parse_answer(as_response(row.get("response")))
            items[rid] = {"prediction": parsed, "correct": is_correct(parsed, gold_text)}
            samples = sample_responses(row, rid)
            if samples is not None:
                verdicts = [is_correct(parse_answer(s), gold_text) for s in samples]
                sampled[rid] = verdicts
                items[rid]["samples_correct"] = sum(verdicts)
        if skipped := len(predictions) - len(ids):
            warnings.append(
                f"{skipped} prediction ids are not in the gold {split or 'data'} and were skipped"
            )
        if unanswered := len(by_id) - len(ids):
            warnings.append(
                f"{unanswered} of {len(by_id)} gold ids have no prediction (n counts only predicted ids)"
            )
        extra: dict[str, Any] = {}
        if sampled:
            extra["pass_at_k"] = pass_at_k(sampled, ids)
        result = make_result(self.name, split, mode, items, warnings=warnings, **extra)
        result["leaderboard"] = {"pass@1": round(100 * result["accuracy"], 2)}
        if sampled:
            k = extra["pass_at_k"]["k"]
            result["leaderboard"][f"pass@{k}"] = round(100 * extra["pass_at_k"][f"pass@{k}"], 2)
            result["leaderboard"][f"{k}/{k}"] = round(100 * extra["pass_at_k"][f"{k}/{k}"], 2)
        return result


def pass_at_k(sampled: dict[str, list[bool]], ids: list[str]) -> dict[str, Any]:
    """{k, pass@k, k/k, n} over `ids`: pass@k = share of questions with at least one correct sample, k/k =
    share with all k correct. Every scored question must have the same number k >= 1 of samples."""
    counts = {len(v) for v in sampled.values()}
    missing = [rid for rid in ids if rid not in sampled]
    if missing or len(counts) != 1 or 0 in counts:
        where = f"{missing[0]!r} has none" if missing else f"counts {sorted(counts)}"
        raise ValueError(
            f"pass@k needs the same number k >= 1 of sampled responses for every question ({where})"
        )
    k, n = counts.pop(), len(ids)
    return {
        "k": k,
        "n": n,
        f"pass@{k}": sum(any(sampled[r]) for r in ids) / n,
        f"{k}/{k}": sum(all(sampled[r]) for r in ids) / n,
    }
