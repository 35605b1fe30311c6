"""The benchmark interface, its registry, and the helpers every benchmark module shares.

A benchmark is one small module with one `Bench` subclass registered under the name users type
(`mmrlsd eval --bench mathvista`). The class knows five things about its benchmark:

* `load(data_path, split)`      gold records in the official format (a local copy, or the HF hub);
* `prompt(record)`, `images(record, data_root)`   what the model sees;
* `read_predictions(path)`      our `predictions.jsonl` and each official prediction format;
* `score(gold, predictions, mode=..., split=...)`  a result dict in the schema below.

Result schema (`scores.json`, `mmrlsd eval ... --output OUT.json`; other tools read it)::

    {"bench", "split", "mode", "n", "correct", "accuracy" (0..1),
     "breakdown": {group: {value: {"correct", "total", "accuracy"}}},
     "items": {id: {"prediction", "correct"}},
     ...benchmark-specific extras ("warnings", "four_dimensional", ...)}

Build it with `make_result`, which computes the totals and breakdowns from per-item verdicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # PIL is only needed by benchmarks that build model inputs
    from PIL import Image

Record = dict[str, Any]
"""One gold example, in the benchmark's official format (the fields the official files use)."""

Predictions = dict[str, dict[str, Any]]
"""id -> prediction row, in file order. Rows of our own `predictions.jsonl` are `{"id", "response", ...}`;
rows read from an official format keep that format's fields (`extraction`, `model_answer`, ...)."""


class Bench:
    """A benchmark: data, official prompt, official scoring. Subclasses set the class attributes and
    implement the five methods. Instances are stateless; `get_bench(name)()` makes one."""

    name: ClassVar[str] = ""
    """Registry key, set by `@register(name)`."""
    hub_id: ClassVar[str] = ""
    """Hugging Face dataset id used when no `--data` path is given."""
    splits: ClassVar[tuple[str, ...]] = ()
    """Splits this module can load (scored or exported)."""
    default_split: ClassVar[str] = ""
    unscored_splits: ClassVar[tuple[str, ...]] = ()
    """Splits whose gold answers are withheld (MathVista `test`): `mmrlsd eval` only writes predictions."""
    modes: ClassVar[tuple[str, ...]] = ("official",)
    """Scoring modes. `official` reproduces the upstream scorer bit for bit; any other name is ours."""
    generate_mode: ClassVar[str] = "official"
    """Mode used to score freshly generated responses (MathVista: `rule-v1`, as its official extraction
    needs a GPT judge)."""

    def setup(self) -> None:
        """Prepare what scoring needs (MATH-V: install its pinned packages on first use); `mmrlsd eval` calls
        it before reading any data, so a missing dependency is reported before hours of generation."""

    def load(self, data_path: str | None, split: str) -> list[Record]:
        """Gold records of `split`, in dataset order, from the local official-format file `data_path`,
        or from the hub (`hub_id`) when `data_path` is None."""
        raise NotImplementedError

    def record_id(self, record: Record) -> str:
        """The record's id as a string (MathVista `pid`, MMMU `id`, ...)."""
        raise NotImplementedError

    def prompt(self, record: Record) -> str:
        """The official zero-shot prompt text for this record."""
        raise NotImplementedError

    def images(self, record: Record, data_root: Path | None) -> list[Image.Image]:
        """The record's images in prompt order (PIL, RGB). `data_root` is the folder that relative image
        paths in the record resolve against (the folder of the `--data` file); hub records carry decoded
        images and ignore it."""
        raise NotImplementedError

    def prediction_fields(self, record: Record) -> dict[str, Any]:
        """Extra fields copied from the gold record into each `predictions.jsonl` row (default none), e.g.
        MMMU's `all_choices`/`index2ans`, so that the file is also in the official format."""
        return {}

    def read_predictions(self, path: str | Path) -> Predictions:
        """Read our `predictions.jsonl` or any official prediction format of this benchmark."""
        raise NotImplementedError

    def score(
        self, gold: list[Record], predictions: Predictions, *, mode: str = "official", split: str = ""
    ) -> dict[str, Any]:
        """Score `predictions` against `gold` in `mode`; returns the result schema above (`make_result`).
        Scores the ids present in `predictions`, unless the official scorer says otherwise."""
        raise NotImplementedError


BENCHES: dict[str, type[Bench]] = {}


def register(name: str):
    """Class decorator: `@register("mathvista") class MathVista(Bench): ...`."""

    def wrap(cls: type[Bench]) -> type[Bench]:
        if name in BENCHES and BENCHES[name] is not cls:
            raise ValueError(f"benchmark {name!r} registered twice")
        cls.name = name
        BENCHES[name] = cls
        return cls

    return wrap


def get_bench(name: str) -> type[Bench]:
    """The benchmark class registered as `name`; the error lists the valid names."""
    if name not in BENCHES:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHES))}")
    return BENCHES[name]


def check_mode(bench: Bench, mode: str) -> None:
    """Raise a ValueError listing `bench.modes` when `mode` is not one of them."""
    if mode not in bench.modes:
        raise ValueError(f"{bench.name}: unknown mode {mode!r}; known: {', '.join(bench.modes)}")


# ---------------------------------------------------------------- results


def tally(pairs: Iterable[tuple[Any, bool]]) -> dict[str, dict[str, Any]]:
    """Count verdicts per value: [(value, correct), ...] -> {str(value): {correct, total, accuracy}}.
    A list value counts once under each element (MathVista `skills`).

    >>> tally([("a", True), ("a", False), (["a", "b"], True)])["a"]
    {'correct': 2, 'total': 3, 'accuracy': 0.6666666666666666}
    """
    counts: dict[str, list[int]] = {}
    for value, ok in pairs:
        for v in value if isinstance(value, list) else [value]:
            c = counts.setdefault(str(v), [0, 0])
            c[0] += bool(ok)
            c[1] += 1
    return {v: {"correct": c, "total": t, "accuracy": c / t} for v, (c, t) in counts.items()}


SCHEMA_KEYS = frozenset({"bench", "split", "mode", "n", "correct", "accuracy", "breakdown", "items"})


def make_result(
    bench: str,
    split: str,
    mode: str,
    items: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble the result schema.

    items:  id -> {"prediction": ..., "correct": bool} (other keys are kept).
    labels: id -> {group: value or list of values}; every group becomes a `breakdown` entry.
    extra:  benchmark-specific top-level keys (`warnings`, `four_dimensional`, ...); they may not reuse a
            schema key (`SCHEMA_KEYS`).
    `accuracy` is correct/n, and 0.0 when n == 0.
    """
    clash = sorted(set(extra) & SCHEMA_KEYS)
    if clash:
        raise ValueError(
            f"extra result keys {clash} would overwrite the result schema; name them differently"
        )
    n = len(items)
    correct = sum(bool(it["correct"]) for it in items.values())
    groups: dict[str, list[tuple[Any, bool]]] = {}
    for rid, lab in (labels or {}).items():
        for group, value in lab.items():
            groups.setdefault(group, []).append((value, bool(items[rid]["correct"])))
    return {
        "bench": bench,
        "split": split,
        "mode": mode,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "breakdown": {group: tally(pairs) for group, pairs in groups.items()},
        "items": {rid: dict(it) for rid, it in items.items()},
        **extra,
    }


# ---------------------------------------------------------------- reading files


def read_text(path: str | Path) -> str:
    """File contents as text; invalid UTF-8 bytes become U+FFFD instead of raising."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def read_json(path: str | Path) -> Any:
    """A JSON document (invalid UTF-8 tolerated, see `read_text`); a file that does not start like JSON is
    refused from its first bytes, without reading the rest."""
    with open(path, "rb") as f:
        head = f.read(256).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head and not head.startswith((b"[", b"{")):
        raise ValueError(f"{path}: not JSON (starts with {head[:16]!r})")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line, read line by line (a bad line stops the read, naming its number)."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def restrict_to_gold(bench: Bench, gold: list[Record], predictions: Predictions) -> tuple[Predictions, list[str]]:
    """The prediction rows that belong to a gold record, with every field the gold record also has (the answer,
    question type, choices, ...) taken from the gold record: a predictions file is never scored against answers
    it carries itself. Rows of ids that are not in `gold` are dropped and counted in the returned warnings; when
    no row matches, that is an error. We-Math's upstream rows are matched by their `ID/key`."""
    by_id = {bench.record_id(r): r for r in gold}
    alias = {f"{r['ID']}/{r['key']}": rid for rid, r in by_id.items() if "ID" in r and "key" in r}
    kept: Predictions = {}
    unknown = []
    for pid, row in predictions.items():
        gid = pid if pid in by_id else alias.get(pid)
        if gid is None:
            unknown.append(pid)
            continue
        rec = by_id[gid]
        kept[pid] = {**row, **{k: rec[k] for k in row if k in rec}}
    if predictions and not kept:
        raise ValueError(f"none of the {len(predictions)} prediction ids is in the gold data (first: "
                         f"{unknown[0]!r}); check --bench, --split and --data")  # fmt: skip
    warnings = [f"{len(unknown)} prediction ids are not in the gold data and were not scored (first: "
                f"{unknown[0]!r})"] if unknown else []  # fmt: skip
    return kept, warnings


def is_own_predictions(rows: list[dict[str, Any]]) -> bool:
    """True when `rows` look like our `predictions.jsonl` (every row has `id` and `response`)."""
    return bool(rows) and all("id" in r and "response" in r for r in rows)


def rows_by_id(rows: Iterable[dict[str, Any]], key: str = "id", where: str = "") -> Predictions:
    """Index rows by `str(row[key])`, keeping file order; a row without `key` or a repeated id is an error."""
    out: Predictions = {}
    for i, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"{where}row {i}: missing required field {key!r}")
        rid = str(row[key])
        if rid in out:
            raise ValueError(f"{where}duplicate id {rid!r}")
        out[rid] = row
    return out


def require(record: Mapping[str, Any], field: str, rid: str) -> Any:
    """`record[field]`, or a KeyError that names the record id."""
    if field not in record:
        raise KeyError(f"record {rid!r}: missing required field {field!r}")
    return record[field]


def as_response(value: Any) -> str:
    """A model response as text: None/missing -> "", bytes decoded leniently, other types via str()."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def load_hub(hub_id: str, split: str, config: str | None = None) -> Any:
    """`datasets.load_dataset(hub_id, config, split=split)`, with an error that says how to work offline."""
    try:
        import datasets

        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # no network, no `datasets`, unknown split ...
        raise RuntimeError(
            f"could not load {hub_id}{'/' + config if config else ''} split {split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {e}); pass --data PATH to a local copy in the official format"
        ) from e


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local parquet file (the HF hub's storage format), as plain dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_tsv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a tab-separated file with a header line, as dicts of strings."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_records(path: str | Path, *, split: str = "", id_field: str = "") -> list[Record]:
    """Gold records from any local annotation file, in file order.

    * a folder: every ``<split>-*.parquet`` below it (the HF hub layout), in path order;
    * ``.parquet``, ``.jsonl``, ``.tsv``: one record per row;
    * ``.json``: a list of records, or an object ``{id: record}`` (its values; the key is added as
      `id_field` when a record lacks it).
    A file that holds anything else, or rows that are not objects, is an error naming the file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"**/{split}-*.parquet"), key=lambda p: p.parts)
        if not files:
            raise FileNotFoundError(f"{path}: no {split}-*.parquet files")
        return [r for f in files for r in read_parquet(f)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".tsv":
        return read_tsv(path)
    data = read_json(path)
    if isinstance(data, dict):
        if not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path}: expected {{id: record}} with an object per id")
        return [v if not id_field or id_field in v else {id_field: k, **v} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of records (JSON objects)")
    return data


def open_image(value: Any, data_root: Path | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, an HF image struct `{"bytes", "path"}`, or a path (relative paths
    resolve against `data_root`)."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict) and value.get("bytes"):
        img = Image.open(io.BytesIO(value["bytes"]))
    else:
        path = value.get("path") if isinstance(value, dict) else value
        if not path:
            raise ValueError(f"no image data in {value!r}")
        p = Path(path)
        if not p.is_absolute() and data_root is not None:
            p = Path(data_root) / p
        img = Image.open(p)
    return img.convert("RGB")
