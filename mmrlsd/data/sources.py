"""Training records from local JSONL/parquet files or a hub dataset, validated, remapped and ordered.

A record needs a question and an answer; `images` (paths/URLs relative to the data file) may be absent for
text-only problems. A bad record never stops training: it is skipped and counted with its id and reason
(`Dataset.skipped`), both at load time (missing answer, empty question, not JSON, duplicate id) and when its
images are loaded for a batch (missing, empty or corrupt file).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmrlsd.data.images import DEFAULT_MAX_PIXELS, load_image
from mmrlsd.errors import DataError, ImageError
from mmrlsd.types import Sample

log = logging.getLogger("mmrlsd.data")


@dataclass
class FieldMap:
    """Which record field holds each part of a `Sample` (the config's `data.<part>_key` settings)."""

    problem: str = "problem"
    answer: str = "answer"
    images: str = "images"
    problem_type: str = "problem_type"
    solution: str = "solution"
    id: str = "id"

    @classmethod
    def from_config(cls, data) -> FieldMap:
        """From a `DataConfig` (training or SFT): `data.problem_key`, `data.answer_key`, ..."""
        return cls(**{f.name: getattr(data, f"{f.name}_key") for f in dataclasses.fields(cls)})


@dataclass
class Skip:
    id: str
    reason: str


def _read_rows(source: str, split: str) -> tuple[list[tuple[str, dict | Skip]], Path]:
    """Raw rows of one source as `(default_id, row_or_skip)`, plus the folder image paths are relative to."""
    if source.startswith("hub:") or (not Path(source).exists() and source.count("/") == 1 and "." not in source):
        from datasets import load_dataset

        name = source.removeprefix("hub:")
        try:
            ds = load_dataset(name, split=split)
        except Exception as e:
            raise DataError(f"{source}: cannot load hub dataset split {split!r} ({type(e).__name__}: {e})") from None
        return [(f"{name}:{i}", dict(r)) for i, r in enumerate(ds)], Path.cwd()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: data file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise DataError(f"{source}: unreadable parquet file ({type(e).__name__}: {e})") from None
        return [(f"{path.name}:{i}", r) for i, r in enumerate(table.to_pylist())], path.parent
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{source}: unknown data format {path.suffix!r} (use .jsonl, .json or .parquet)")
    rows: list[tuple[str, dict | Skip]] = []
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # files saved by Windows tools start with a BOM
    if path.suffix == ".json":
        try:
            items = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{source}: not a JSON list ({type(e).__name__}: {e})") from None
        if not isinstance(items, list):
            raise DataError(f"{source}: a .json data file must hold a list of records")
        for i, item in enumerate(items):
            rid = f"{path.name}:{i}"
            rows.append((rid, item if isinstance(item, dict) else Skip(rid, "item is not a JSON object")))
        return rows, path.parent
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        rid = f"{path.name}:{lineno}"
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rows.append((rid, Skip(rid, "line is not valid UTF-8")))
            continue
        except json.JSONDecodeError as e:
            rows.append((rid, Skip(rid, f"line is not JSON ({e.msg})")))
            continue
        except RecursionError:
            rows.append((rid, Skip(rid, "line is not JSON (nested too deeply)")))
            continue
        rows.append((rid, row if isinstance(row, dict) else Skip(rid, "line is not a JSON object")))
    return rows, path.parent


def to_sample(row: dict, default_id: str, fields: FieldMap, base: Path) -> Sample | Skip:
    """Validate and remap one raw row."""
    rid = str(row.get(fields.id) or default_id)
    problem = row.get(fields.problem)
    if not isinstance(problem, str) or not problem.replace("<image>", "").strip():
        return Skip(rid, f"missing or empty question field {fields.problem!r}")
    answer = row.get(fields.answer)
    if (isinstance(answer, int) and not isinstance(answer, bool)) or (
        isinstance(answer, float) and math.isfinite(answer)  # NaN (pandas/parquet null, JSON NaN): missing
    ):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        return Skip(rid, f"missing or empty answer field {fields.answer!r}")
    images = row.get(fields.images) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, (str, dict)) for i in images):
        return Skip(rid, f"field {fields.images!r} must be a list of paths")
    resolved = []
    for img in images:
        if isinstance(img, dict):  # parquet/hub rows: {"path": ...} or {"bytes": ...}
            img = img.get("path") or ""
        if not img:
            return Skip(rid, "image entry without a path")
        is_url = img.startswith(("http://", "https://", "data:image"))
        resolved.append(img if is_url or Path(img).is_absolute() else str(base / img))
    problem = problem.replace("<image>", "").strip()
    ptype = row.get(fields.problem_type)
    solution = row.get(fields.solution)
    return Sample(
        id=rid,
        problem=problem,
        answer=answer.strip(),
        images=resolved,
        problem_type=ptype if isinstance(ptype, str) else None,
        solution=solution if isinstance(solution, str) else None,
    )


@dataclass
class Dataset:
    """Validated samples with a seeded, resumable order.

    The stream position `pos` counts records drawn since the start (over epochs); epoch e visits the samples
    in `randperm(n, seed + e)` order. Saving `pos` is enough to resume the exact same data order.
    """

    samples: list[Sample]
    seed: int = 0
    shuffle: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    pos: int = 0
    skipped: list[Skip] = field(default_factory=list)
    _order: tuple[int, list[int]] | None = None

    def _index(self, pos: int) -> int:
        n = len(self.samples)
        epoch, i = divmod(pos, n)
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            self._order = (epoch, order)
        return self._order[1][i]

    def next_batch(self, size: int) -> list[Sample]:
        """The next `size` samples with their images loaded; unreadable ones are skipped and counted."""
        if not self.samples:
            raise DataError("no usable training records (every record was skipped; see the skip log)")
        out: list[Sample] = []
        tries = 0
        while len(out) < size:
            sample = self.samples[self._index(self.pos)]
            self.pos += 1
            tries += 1
            try:
                sample.pil_images = [load_image(p, self.max_pixels) for p in sample.images]
                out.append(sample)
            except ImageError as e:
                skip = Skip(sample.id, str(e))
                if skip not in self.skipped:  # counted once, not again in every epoch that draws it
                    self.record_skip(skip)
            if tries > 10 * size + len(self.samples):
                raise DataError(f"could not assemble a batch of {size}: too many unreadable records")
        return out

    def record_skip(self, skip: Skip) -> None:
        self.skipped.append(skip)
        log.warning("skipped record %s: %s", skip.id, skip.reason)

    def skip_counts(self) -> dict[str, int]:
        """Skips per kind of reason, most frequent first: `{"line is not JSON": 2, "unreadable image": 1}`."""
        return dict(Counter(skip_kind(s.reason) for s in self.skipped).most_common())


def skip_kind(reason: str) -> str:
    """A skip reason without its details: the image path before it and the parenthesised cause after it.

    >>> skip_kind("/data/a.png: unreadable image (OSError: truncated)")
    'unreadable image'
    >>> skip_kind("line is not JSON (Expecting value)")
    'line is not JSON'
    >>> skip_kind("[val] /data/b.png: image file not found")
    '[val] image file not found'
    """
    prefix = "[val] " if reason.startswith("[val] ") else ""
    kind = re.sub(r"\s*\(.*\)$", "", reason.removeprefix(prefix), flags=re.DOTALL)
    if "image" in kind and ": " in kind:
        kind = kind.rsplit(": ", 1)[1]
    return prefix + kind


def load_dataset_files(
    sources: list[str], fields: FieldMap, split: str = "train", seed: int = 0, shuffle: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS, max_items: int = 0,
) -> Dataset:  # fmt: skip
    """Read every source, validate each record, and return the usable ones with the skip list."""
    samples: list[Sample] = []
    skipped: list[Skip] = []
    seen: set[str] = set()
    for source in sources:
        rows, base = _read_rows(source, split)
        for default_id, row in rows:
            s = row if isinstance(row, Skip) else to_sample(row, default_id, fields, base)
            if isinstance(s, Sample) and s.id in seen:
                s = Skip(s.id, "duplicate record id")
            if isinstance(s, Skip):
                skipped.append(s)
                log.warning("skipped record %s: %s", s.id, s.reason)
                continue
            seen.add(s.id)
            samples.append(s)
    if max_items:
        samples = samples[:max_items]
    return Dataset(samples, seed=seed, shuffle=shuffle, max_pixels=max_pixels, skipped=skipped)
