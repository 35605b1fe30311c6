"""We-Math testmini (1740 rows = 360 two-step x 3 + 165 three-step x 4 = 525 problems). Rules and evidence: eval/README.md.

Mode `official` ports `We-Math/We-Math@a57a0e8` `evaluation/four_dimensional_metrics.py` and
`evaluation/accuracy.py` without pandas:

* extraction (`extract_letter`): the first character of the text after the last `Answer`, once `> < : .`
  are deleted, if it is one of A-H. So ``ANSWER: C`` gives A and ``Ex: A`` gives E, as upstream.
* four-dimensional metrics (`four_dimensional`): IK, IG, CM and RM counted over the problems; rates and
  scores divide by the hard-coded 525 even when rows are missing, so a problem with a missing row falls in
  no category and is never penalised (upstream quirk, kept; `groups_complete` and a warning report it).
* accuracy (`accuracy_table`, result key `step_domain_accuracy`): S1/S2/S3 and 12 domain accuracies; a
  domain is the unweighted mean over its leaf concepts, summed in knowledge-tree order with pandas'
  compensated (Kahan) groupby sum.

The result's `accuracy` is per row (1740 rows), not the benchmark score: the headline is
`four_dimensional["score_strict"]` / `["score_loose"]`, also in `leaderboard` (percent, as the CSV prints).

Departures (upstream would crash or silently miscount): a duplicate (ID, key) pair is an error; a null
response scores as ``""``; an RM rate with denominator 0 is ``"n/a"`` with a warning.
The domain accuracies need `data/knowledge_structure_nodes.json`: `load` reads it from beside the data
file into `WeMath.nodes` (set it yourself when scoring other gold records).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmrlsd.bench.base import (
    Bench,
    Predictions,
    Record,
    as_response,
    check_mode,
    is_own_predictions,
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
    "Regarding the format, please answer following the template below, and be sure to include two <> "
    "symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your option>>"
)
PROMPT = "Question: {question}\nOptions: {option}\n\n" + INSTRUCTION
TOTAL_PROBLEMS = 525
"""Upstream's hard-coded denominator (360 two-step + 165 three-step problems)."""
DOMAINS = (
    "Understanding and Conversion of Units",
    "Angles and Length",
    "Calculation of Plane Figures",
    "Understanding of Plane Figures",
    "Calculation of Solid Figures",
    "Understanding of Solid Figures",
    "Basic Transformations of Figures",
    "Cutting and Combining of Figures",
    "Direction",
    "Position",
    "Route Map",
    "Correspondence of Coordinates and Positions",
)
FOUR_DIM_COLUMNS = (
    "Model",
    "Score (Strict)",
    "InsufficientKnowledge (Strict)",
    "InadequateGeneralization (Strict)",
    "CompleteMastery (Strict)",
    "RoteMemorization (Strict)",
    "Score (Loose)",
    "InsufficientKnowledge (Loose)",
    "InadequateGeneralization (Loose)",
    "CompleteMastery (Loose)",
    "RoteMemorization (Loose)",
)
ACCURACY_COLUMNS = ("Model", "One-step(S1)", "Two-step(S2)", "Three-step(S3)", *DOMAINS)

Joker = bool | None
"""A row's verdict; None = MISSING (the row is absent from the predictions)."""


def extract_letter(response: str) -> str | None:
    """The official extraction: text after the last `Answer`, stripped, ``>``/``<``/``:``/``.``
    deleted, stripped; its first character if that is one of A-H, else None.

    >>> [extract_letter(r) for r in ["<Answer>: <<C>>", "Answer: (C)", "ANSWER: C", "Ex: A", ""]]
    ['C', None, 'A', 'E', None]
    """
    s = response.rpartition("Answer")[2].strip()
    s = s.translate(_DELETE).strip()
    return s[0] if s and s[0] in "ABCDEFGH" else None


_DELETE = str.maketrans("", "", "><:.")


def pct(x: float) -> str:
    """Python's ``"{:.2%}"`` (upstream's cell format); NaN gives ``"nan%"``."""
    return f"{x:.2%}"


# ---------------------------------------------------------------- grouping and the two official tables


def problems(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per base row (key ``{k}steps_1``), in file order, for k = 2 then 3:
    ``{"ID", "steps": k, "jokers": [J1..Jk], "concepts": [c1..ck], "multi": Jm}``; a row absent from
    `rows` gives None. `rows` are ``{"ID", "key", "joker", "concept"}``; (ID, key) must be unique."""
    by_key = {(r["ID"], r["key"]): r for r in rows}
    out = []
    for k in (2, 3):
        for r in rows:
            if r["key"] != f"{k}steps_1":
                continue
            steps = [by_key.get((r["ID"], f"{k}steps_{i}")) for i in range(1, k + 1)]
            multi = by_key.get((r["ID"], f"{k}steps_multi"))
            out.append(
                {
                    "ID": r["ID"],
                    "steps": k,
                    "jokers": [s["joker"] if s else None for s in steps],
                    "concepts": [s["concept"] if s else None for s in steps],
                    "multi": multi["joker"] if multi else None,
                }
            )
    return out


def four_dimensional(probs: Sequence[dict[str, Any]], total: int = TOTAL_PROBLEMS) -> dict[str, Any]:
    """IK/IG/CM/RM counts, rates, and Score (Strict/Loose) = (total - 0.5 IG - RM - IK) / total.

    A MISSING joker is neither True nor False, so an incomplete problem may fall in no category.
    Rates are fractions; an RM rate whose denominator (CM + RM) is 0 is None.
    """
    counts = dict.fromkeys(("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose"), 0)
    for p in probs:
        some_f = any(j is False for j in p["jokers"])
        all_t = all(j is True for j in p["jokers"])
        some_t = any(j is True for j in p["jokers"])
        all_f = all(j is False for j in p["jokers"])
        m_t, m_f = p["multi"] is True, p["multi"] is False
        counts["IK"] += some_f and m_f
        counts["IG"] += all_t and m_f
        counts["CM_strict"] += all_t and m_t
        counts["CM_loose"] += some_t and m_t
        counts["RM_strict"] += some_f and m_t
        counts["RM_loose"] += all_f and m_t
    out: dict[str, Any] = {}
    for name, n in counts.items():
        if name.startswith("RM"):
            denom = counts["CM" + name[2:]] + n
            out[name] = {"count": n, "rate": n / denom if denom else None}
        else:
            out[name] = {"count": n, "rate": n / total}
    ig, ik = counts["IG"], counts["IK"]
    out["score_strict"] = (total - 0.5 * ig - counts["RM_strict"] - ik) / total
    out["score_loose"] = (total - 0.5 * ig - counts["RM_loose"] - ik) / total
    out["total"] = total
    out["groups_complete"] = sum(None not in p["jokers"] and p["multi"] is not None for p in probs)
    return out


def four_dimensional_row(fd: dict[str, Any]) -> dict[str, str]:
    """The cells of upstream's four-dimensional CSV row (Model excluded): ``"11.14%"``, ``"69.52% (365)"``."""

    def cell(name: str) -> str:
        rate = fd[name]["rate"]
        return f"{'n/a' if rate is None else pct(rate)} ({fd[name]['count']})"

    return {
        "Score (Strict)": pct(fd["score_strict"]),
        "InsufficientKnowledge (Strict)": cell("IK"),
        "InadequateGeneralization (Strict)": cell("IG"),
        "CompleteMastery (Strict)": cell("CM_strict"),
        "RoteMemorization (Strict)": cell("RM_strict"),
        "Score (Loose)": pct(fd["score_loose"]),
        "InsufficientKnowledge (Loose)": cell("IK"),
        "InadequateGeneralization (Loose)": cell("IG"),
        "CompleteMastery (Loose)": cell("CM_loose"),
        "RoteMemorization (Loose)": cell("RM_loose"),
    }


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else math.nan


def _kahan_mean(values: Sequence[float]) -> float:
    """pandas' groupby mean (`_libs/groupby.pyx::group_mean`): compensated sum in order, NaN skipped."""
    total = comp = 0.0
    n = 0
    for v in values:
        if v != v:
            continue
        n += 1
        y = v - comp
        t = total + y
        comp = t - total - y
        if comp != comp:
            comp = 0.0
        total = t
    return total / n if n else math.nan


def accuracy_table(
    probs: Sequence[dict[str, Any]], nodes: Sequence[dict[str, Any]] | None
) -> dict[str, float]:
    """S1 (all present one-step jokers), S2/S3 (present multi-step jokers) and, when `nodes` is given, the
    12 domain accuracies: mean per leaf concept, then per `root2` the mean over its leaves (in
    `nodes` order) that have scored items. Values are fractions (NaN where nothing was scored)."""
    one_step = [(j, c) for p in probs for j, c in zip(p["jokers"], p["concepts"]) if j is not None]
    out = {
        "One-step(S1)": _mean([j for j, _ in one_step]),
        "Two-step(S2)": _mean([p["multi"] for p in probs if p["steps"] == 2 and p["multi"] is not None]),
        "Three-step(S3)": _mean([p["multi"] for p in probs if p["steps"] == 3 and p["multi"] is not None]),
    }
    if nodes is None:
        return out
    per_leaf: dict[str, list[bool]] = {}
    for j, concept in one_step:
        per_leaf.setdefault(concept, []).append(j)
    per_domain: dict[str, list[float]] = {}
    for node in nodes:
        leaf = node["full node"].split("_")[-1]
        if node.get("root2") is not None:
            per_domain.setdefault(node["root2"], []).append(_mean(per_leaf.get(leaf, [])))
    out.update({d: _kahan_mean(per_domain[d]) for d in DOMAINS if d in per_domain})
    return out


def accuracy_row(acc: dict[str, float]) -> dict[str, str]:
    """The cells of upstream's accuracy CSV row (Model excluded); a domain absent from the nodes is ``""``."""
    return {col: pct(acc[col]) if col in acc else "" for col in ACCURACY_COLUMNS[1:]}


def official_csv(result: dict[str, Any], model: str) -> tuple[str, str]:
    """(four-dimensional CSV, accuracy CSV) text as upstream writes them (pandas ``to_csv(index=False)``)."""
    tables = []
    for columns, row in (
        (FOUR_DIM_COLUMNS, result["official"]["four_dimensional"]),
        (ACCURACY_COLUMNS, result["official"]["accuracy"]),
    ):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerow([model, *(row[c] for c in columns[1:])])
        tables.append(buf.getvalue())
    return tables[0], tables[1]


def load_nodes(path: str | Path) -> list[dict[str, Any]]:
    """`knowledge_structure_nodes.json`: the 67 leaves of the knowledge tree (`root2`, `full node`, ...)."""
    nodes = read_json(path)
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "full node" in n for n in nodes):
        raise ValueError(f"{path}: expected a list of knowledge nodes with 'full node'")
    return nodes


# ---------------------------------------------------------------- the benchmark


@register("wemath")
class WeMath(Bench):
    """We-Math testmini; the headline is Score (Strict) / Score (Loose) in `four_dimensional`."""

    hub_id = "We-Math/We-Math"
    splits = ("testmini",)
    default_split = "testmini"
    modes = ("official",)
    nodes: list[dict[str, Any]] | None = None
    """Knowledge tree for the domain accuracies; `load` fills it from beside the data file."""

    def load(self, data_path: str | None, split: str) -> list[Record]:
        """`data/testmini.json` (a list of 1740 rows), JSONL, an HF parquet file, or the hub. Also reads
        `knowledge_structure_nodes.json` from the same folder into `self.nodes` when it is there."""
        if data_path is None:
            return [dict(r) for r in load_hub(self.hub_id, split)]
        path = Path(data_path)
        nodes = path.parent / "knowledge_structure_nodes.json"
        if nodes.is_file():
            self.nodes = load_nodes(nodes)
        return read_records(path, split=split)

    def record_id(self, record: Record) -> str:
        return str(record["question number"])

    def prompt(self, record: Record) -> str:
        return PROMPT.format(question=record["question"], option=record["option"])

    def images(self, record: Record, data_root: Path | None) -> list[Any]:
        return [open_image(record["image_path"], data_root)]

    def prediction_fields(self, record: Record) -> dict[str, Any]:
        """The fields upstream reads from each prediction row, so `predictions.jsonl` is also official input."""
        return {
            k: record[k]
            for k in ("ID", "key", "question number", "knowledge concept", "answer")
            if k in record
        }

    def read_predictions(self, path: str | Path) -> Predictions:
        """Our `predictions.jsonl` (`{id, response}`, id = question number) or an upstream-format JSON list
        (`ID, key, answer, knowledge concept, response`, keyed by `question number`, else by ``ID/key``)."""
        rows = read_jsonl(path) if str(path).endswith(".jsonl") else read_json(path)
        if isinstance(rows, dict):
            rows = list(rows.values())
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected We-Math prediction rows (a JSON list or JSONL of objects)")
        if is_own_predictions(rows):
            return rows_by_id(rows, "id", f"{path}: ")
        if all("question number" in r for r in rows):
            return rows_by_id(rows, "question number", f"{path}: ")
        for i, r in enumerate(rows):
            for field in ("ID", "key"):
                if field not in r:
                    raise ValueError(f"{path}: row {i}: missing required field {field!r}")
        return rows_by_id(({**r, "_id": f"{r['ID']}/{r['key']}"} for r in rows), "_id", f"{path}: ")

    def score(
        self, gold: list[Record], predictions: Predictions, *, mode: str = "official", split: str = "testmini"
    ) -> dict[str, Any]:
        """Score every prediction row, gold fields (ID, key, answer, knowledge concept) filled in from
        `gold` where the row lacks them; the row's own fields win, as upstream reads only the rows."""
        check_mode(self, mode)
        by_id = {self.record_id(r): r for r in gold}
        items, labels, rows, seen = {}, {}, [], {}
        for pid, row in predictions.items():
            rec = {**by_id.get(pid, {}), **row}
            gid, key, answer = (require(rec, f, pid) for f in ("ID", "key", "answer"))
            response = as_response(require(rec, "response", pid))
            if not isinstance(gid, str | int) or not isinstance(key, str):
                raise ValueError(f"record {pid!r}: ID {gid!r} / key {key!r} are not strings")
            if (gid, key) in seen:
                raise ValueError(
                    f"duplicate (ID, key) = ({gid!r}, {key!r}) in records {seen[gid, key]!r} and {pid!r}"
                )
            seen[gid, key] = pid
            letter = extract_letter(response)
            joker = letter is not None and letter == answer
            items[pid] = {"prediction": letter, "correct": joker, "ID": gid, "key": key}
            labels[pid] = {"key": key}
            rows.append({"ID": gid, "key": key, "joker": joker, "concept": rec.get("knowledge concept")})
        probs = problems(rows)
        fd = four_dimensional(probs)
        acc = accuracy_table(probs, self.nodes)
        warnings = []
        if fd["groups_complete"] != TOTAL_PROBLEMS:
            warnings.append(
                f"{fd['groups_complete']} of {TOTAL_PROBLEMS} problems have all their rows; the official scores "
                f"still divide by {TOTAL_PROBLEMS} and never penalise the incomplete ones"
            )
        for name in ("RM_strict", "RM_loose"):
            if fd[name]["rate"] is None:
                warnings.append(f"{name} rate is n/a: CM + RM = 0 (upstream would crash)")
        if self.nodes is None:
            warnings.append("no knowledge_structure_nodes.json: domain accuracies not computed")
        return make_result(
            self.name,
            split,
            mode,
            items,
            labels,
            four_dimensional=fd,
            step_domain_accuracy={
                k: None if v != v else v for k, v in acc.items()
            },  # NaN (nothing scored) -> null
            official={"four_dimensional": four_dimensional_row(fd), "accuracy": accuracy_row(acc)},
            groups_complete=fd["groups_complete"],
            leaderboard=leaderboard(fd, acc),
            warnings=warnings,
        )


def leaderboard(fd: dict[str, Any], acc: dict[str, float]) -> dict[str, float | None]:
    """Score (Strict/Loose) and S1/S2/S3 in percent, exactly as the official CSV prints them (None: nan)."""
    cols = {"Score (Strict)": fd["score_strict"], "Score (Loose)": fd["score_loose"]}
    cols.update({k: acc[k] for k in ("One-step(S1)", "Two-step(S2)", "Three-step(S3)")})
    return {k: None if v != v else float(pct(v)[:-1]) for k, v in cols.items()}
