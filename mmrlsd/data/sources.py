"""Training records from local JSONL/JSON/parquet files, a `datasets` `save_to_disk` folder or a hub dataset,
validated, bounded, remapped and ordered.

A record needs a question and an answer; `images` may be absent for text-only problems. An image entry is a path
(relative to the data file's folder), a `{"bytes": ..., "path": ...}` struct (parquet files written by
`datasets`, hub datasets), encoded bytes, a PIL image, a `data:image/...;base64` URL or, with
`data.allow_remote_images`, an `http(s)` URL. Images stored inside a table (parquet, `save_to_disk`, hub) stay
in its Arrow columns and are read one record at a time, when a batch needs them.

A bad record never stops training: it is skipped and counted with its id and reason (`Dataset.skipped`), both
at load time (missing answer, empty question, not JSON, duplicate id, too many images, a question far beyond
`data.max_prompt_tokens`, a remote image while those are off, an image path leaving the data folder) and when
its images are loaded for a batch (missing, empty, corrupt or refused image; a prompt over
`data.max_prompt_tokens`).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmrlsd.data.images import DEFAULT_MAX_PIXELS, is_url, load_image
from mmrlsd.data.remote import RemotePolicy
from mmrlsd.errors import DataError, ImageError, RecordError
from mmrlsd.types import Sample

log = logging.getLogger("mmrlsd.data")

MAX_CHARS_PER_TOKEN = 16
"""Cheap bound before any tokenising: a question plus answer longer than this many characters per token of
`data.max_prompt_tokens` is skipped at load time (the exact token count is checked when a batch draws it)."""


@dataclass
class FieldMap:
    """Which record field holds each part of a `Sample` (the config's `data.<part>_key` settings)."""

    problem: str = "problem"
    answer: str = "answer"
    images: str = "images"
    problem_type: str = "problem_type"
    solution: str = "solution"
    id: str = "id"
    options: str = "options"
    require_solution: bool = False
    """Skip (and count) records without a non-empty `solution` text: it is the teacher's privileged information
    (`algo.teacher_info: solution`, OPSD), and a silent fallback to the answer would change the method."""

    @classmethod
    def from_config(cls, data) -> FieldMap:
        """From a `DataConfig` (training or SFT): each part from its `data.<part>_key` setting."""
        return cls(**{f.name: getattr(data, f"{f.name}_key") for f in dataclasses.fields(cls)
                      if hasattr(data, f"{f.name}_key")})  # fmt: skip


@dataclass
class RecordLimits:
    """What a record may hold and where its images may come from (the `data.*` keys of the same names)."""

    max_images: int = 32
    max_prompt_tokens: int = 16384
    allow_remote_images: bool = False
    allow_external_images: bool = False
    remote_image_timeout: float = 10.0
    remote_image_max_bytes: int = 20_000_000

    @classmethod
    def from_config(cls, data) -> RecordLimits:
        """From a `DataConfig` (any object with these attributes)."""
        return cls(**{f.name: getattr(data, f.name) for f in dataclasses.fields(cls)})

    def remote(self) -> RemotePolicy | None:
        if not self.allow_remote_images:
            return None
        return RemotePolicy(timeout=self.remote_image_timeout, max_bytes=self.remote_image_max_bytes)


@dataclass
class Skip:
    id: str
    reason: str


@dataclass(frozen=True, eq=False)  # identity: never compare the Arrow column
class EmbeddedImage:
    """An image inside a table column (`column[row]`, or item `index` of that row's list), read on demand."""

    column: Any  # a pyarrow ChunkedArray
    row: int
    index: int | None

    def get(self):
        value = self.column[self.row]
        if self.index is not None:
            value = value.values[self.index]
        return value.as_py()


@dataclass(frozen=True, eq=False)
class _TableImages:
    """A row's image cell in a table, counted without reading any image."""

    column: Any
    row: int
    count: int
    is_list: bool

    def refs(self) -> list[EmbeddedImage]:
        if not self.is_list:
            return [EmbeddedImage(self.column, self.row, None)] if self.count else []
        return [EmbeddedImage(self.column, self.row, j) for j in range(self.count)]


@dataclass
class _Rows:
    rows: list[tuple[str, dict | Skip]]
    roots: list[Path]
    """Folders image paths must stay inside (the first one is where relative paths start)."""
    name: str


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _mapped_columns(fields: FieldMap) -> list[str]:
    """The column names a `FieldMap` reads, images included."""
    return list(
        dict.fromkeys(v for f in dataclasses.fields(fields) if isinstance(v := getattr(fields, f.name), str))
    )


def _table_rows(table, label: str, fields: FieldMap) -> list[tuple[str, dict]]:
    """Rows of an Arrow table as dicts of the mapped text fields; the image column stays in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = [k for k in _mapped_columns(fields) if k != fields.images and k in table.column_names]
    rows = table.select(keys).to_pylist()
    if fields.images in table.column_names:
        col = table.column(fields.images)
        is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
        item = col.type.value_type if is_list else col.type
        if pa.types.is_string(item) or pa.types.is_large_string(item):  # paths/URLs: checked like JSON rows
            for row, value in zip(rows, col.to_pylist()):
                row[fields.images] = value
            return [(f"{label}:{i}", r) for i, r in enumerate(rows)]
        if is_list:
            counts = pc.fill_null(pc.list_value_length(col), 0).to_pylist()
        else:
            counts = pc.invert(pc.is_null(col)).cast(pa.int64()).to_pylist()
        for i, row in enumerate(rows):
            row[fields.images] = _TableImages(col, i, counts[i], is_list)
    return [(f"{label}:{i}", r) for i, r in enumerate(rows)]


def _hub_roots() -> list[Path]:
    import datasets
    from huggingface_hub import constants

    return [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]


def _dataset_table(ds, source: str, split: str):
    """The Arrow table of a `datasets` Dataset (or the `split` of a DatasetDict)."""
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{source}: not a map-style dataset ({type(ds).__name__})")
    return ds.with_format("arrow")[:]  # memory-mapped: a zero-copy view, images are not decoded


def _read_rows(source: str, split: str, fields: FieldMap) -> _Rows:
    """Raw rows of one source as `(default_id, row_or_skip)`, and the folders image paths must stay in."""
    path = Path(source)
    hub = source.startswith("hub:") or (not path.exists() and source.count("/") == 1 and "." not in source)
    if hub:
        from datasets import load_dataset

        name = source.removeprefix("hub:")
        try:
            table = _dataset_table(load_dataset(name, split=split), source, split)
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"{source}: cannot load hub dataset split {split!r} ({type(e).__name__}: {e})"
            ) from None
        local = Path(name)
        roots = ([local.resolve()] if local.is_dir() else []) + _hub_roots()
        return _Rows(_table_rows(table, name, fields), roots, source)
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        try:
            table = _dataset_table(load_from_disk(str(path)), source, split)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{source}: unreadable saved dataset ({type(e).__name__}: {e})") from None
        return _Rows(_table_rows(table, path.name, fields), [path], source)
    if path.is_dir():
        raise DataError(f"{source}: a folder, but not one written by datasets' save_to_disk (no state.json or "
                        "dataset_dict.json); give the data files, or hub:FOLDER to load it with load_dataset")  # fmt: skip
    if not path.is_file():
        raise DataError(f"{source}: data file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:  # only the mapped columns: a long unused column (a reasoning trace) is never read
            present = set(pq.read_schema(path).names)
            table = pq.read_table(path, columns=[c for c in _mapped_columns(fields) if c in present])
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise DataError(f"{source}: unreadable parquet file ({type(e).__name__}: {e})") from None
        return _Rows(_table_rows(table, path.name, fields), [path.parent], source)
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
        return _Rows(rows, [path.parent], source)
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
    return _Rows(rows, [path.parent], source)


@functools.lru_cache(maxsize=64)
def _real_root(root: Path) -> str:
    real = os.path.realpath(root)
    return real if real.endswith(os.sep) else real + os.sep


def resolve_image_path(img: str, roots: list[Path], allow_external: bool) -> str:
    """`img` relative to the first root (absolute paths unchanged); unless `allow_external`, an `ImageError`
    when the path, with `..` and symlinks resolved, lies outside every root."""
    full = img if os.path.isabs(img) else str(roots[0] / img)
    if not allow_external:
        real = os.path.realpath(full)
        if not any((real + os.sep).startswith(_real_root(r)) for r in roots):
            raise ImageError(
                f"{img!r}: image path leaves the data folder (an absolute path, '..' or a symlink outside "
                f"{roots[0]}; set data.allow_external_images: true to allow it)"
            )
    return full


def _image_entry(img, j: int, rid: str, roots: list[Path], limits: RecordLimits) -> tuple[str, Any]:
    """`(display name, what to load)` of one image entry of a JSON row; `ImageError` when it is unusable."""
    if isinstance(img, dict):  # {"path": ...} or {"bytes": ...}
        if img.get("bytes"):
            if not isinstance(img["bytes"], (bytes, bytearray)):
                raise ImageError(f"image entry {j}: 'bytes' holds {type(img['bytes']).__name__}, not bytes")
            return f"{rid} image {j} (embedded)", bytes(img["bytes"])
        img = img.get("path") or ""
    if isinstance(img, (bytes, bytearray)) and img:
        return f"{rid} image {j} (embedded)", bytes(img)
    if hasattr(img, "getbbox"):  # a PIL image (rows built in Python, datasets' decoded Image feature)
        return f"{rid} image {j} (PIL)", img
    if not isinstance(img, str):
        raise ImageError(
            f"image entry {j} is {type(img).__name__}: expected a path, URL, image bytes or PIL image"
        )
    if not img:
        raise ImageError("image entry without a path")
    if img.startswith("data:"):
        return f"{rid} image {j} (data URL)", img
    if is_url(img):
        if not limits.allow_remote_images:
            raise ImageError(f"{img[:200]}: remote images are off (set data.allow_remote_images: true)")
        return img, img
    path = resolve_image_path(img, roots, limits.allow_external_images)
    return path, path


def to_sample(row: dict, default_id: str, fields: FieldMap, base: Path | list[Path],
              limits: RecordLimits | None = None) -> Sample | Skip:  # fmt: skip
    """Validate and remap one raw row; `base`: the folder(s) image paths must stay inside."""
    limits = limits or RecordLimits()
    roots = [base] if isinstance(base, Path) else list(base)
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
    chars = len(problem) + len(answer)
    if limits.max_prompt_tokens and chars > MAX_CHARS_PER_TOKEN * limits.max_prompt_tokens:
        return Skip(rid, f"prompt too long (question and answer hold {chars:,} characters, over "
                         f"{MAX_CHARS_PER_TOKEN} per token of data.max_prompt_tokens: {limits.max_prompt_tokens:,})")  # fmt: skip
    images = row.get(fields.images) or []
    if isinstance(images, (str, dict, bytes, _TableImages)) or hasattr(images, "getbbox"):
        images = images if isinstance(images, _TableImages) else [images]
    n_images = (
        images.count if isinstance(images, _TableImages) else len(images) if isinstance(images, list) else -1
    )
    if n_images < 0:
        return Skip(rid, f"field {fields.images!r} must be a list of paths")
    if limits.max_images and n_images > limits.max_images:
        return Skip(rid, f"too many images ({n_images:,}; data.max_images is {limits.max_images})")
    names, data = [], []
    if isinstance(images, _TableImages):
        for j, ref in enumerate(images.refs()):
            names.append(f"{rid} image {j} (embedded)")
            data.append(ref)
    else:
        for j, img in enumerate(images):
            try:
                name, src = _image_entry(img, j, rid, roots, limits)
            except ImageError as e:
                return Skip(rid, str(e))
            names.append(name)
            data.append(src)
    markers = problem.count("<image>")
    if markers and markers != len(names):
        return Skip(rid, f"question has {markers} <image> markers for {len(names)} images")
    options = row.get(fields.options)
    if options is None:
        options = []
    elif isinstance(options, str):
        options = [options]
    elif isinstance(options, (list, tuple)) and all(isinstance(o, (str, int, float)) for o in options):
        options = [str(o) for o in options]
    else:
        return Skip(rid, f"field {fields.options!r} must be a list of strings")
    problem = problem.strip()
    ptype = row.get(fields.problem_type)
    solution = row.get(fields.solution)
    if fields.require_solution and (not isinstance(solution, str) or not solution.strip()):
        return Skip(
            rid, f"missing or empty solution field {fields.solution!r} (the teacher's privileged text)"
        )
    return Sample(
        id=rid,
        problem=problem,
        answer=answer.strip(),
        images=names,
        problem_type=ptype if isinstance(ptype, str) else None,
        solution=solution if isinstance(solution, str) else None,
        options=options,
        image_data=data,
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
    limits: RecordLimits = field(default_factory=RecordLimits)
    roots: dict[str, list[Path]] = field(default_factory=dict)
    """Per sample id: the folders an embedded struct's path (one without bytes) must stay inside."""
    check: Callable[[Sample], None] | None = None
    """Called once per record with its images loaded, before it first joins a batch; raises `RecordError` to
    skip it (the trainer's prompt-length check: `mmrlsd.data.sanitize.PromptCheck`)."""
    _checked: set[str] = field(default_factory=set)
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

    def load(self, sample: Sample) -> Sample:
        """A copy of `sample` with its images loaded (`RecordError` when one is unusable or `check` refuses).

        The dataset's own samples never hold decoded images, so an epoch does not accumulate them in memory."""
        remote = self.limits.remote()
        pil = []
        for name, src in zip(sample.images, sample.image_data or sample.images):
            if isinstance(src, EmbeddedImage):
                try:
                    src = src.get()
                except Exception as e:  # pyarrow errors for a damaged column
                    raise ImageError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None
                if src is None:
                    raise ImageError(f"{name}: empty image entry (null)")
                if isinstance(src, dict) and not src.get("bytes") and isinstance(src.get("path"), str):
                    src = _struct_path(src["path"], self.roots.get(sample.id, []), self.limits)
            pil.append(load_image(src, self.max_pixels, name=name, remote=remote))
        loaded = dataclasses.replace(sample, pil_images=pil)
        if self.check is not None and sample.id not in self._checked:
            self.check(loaded)
            self._checked.add(sample.id)
        return loaded

    def load_all(self) -> list[Sample]:
        """Every sample once, in order, with its images loaded; unusable ones are skipped and counted (a
        validation set: no record is drawn twice to make up for a skipped one)."""
        out = []
        for sample in self.samples:
            try:
                out.append(self.load(sample))
            except RecordError as e:
                self.record_skip(Skip(sample.id, str(e)))
        return out

    def next_batch(self, size: int) -> list[Sample]:
        """The next `size` samples with their images loaded; unusable ones are skipped and counted."""
        if not self.samples:
            raise DataError("no usable training records (every record was skipped; see the skip log)")
        out: list[Sample] = []
        tries = 0
        while len(out) < size:
            sample = self.samples[self._index(self.pos)]
            self.pos += 1
            tries += 1
            try:
                out.append(self.load(sample))
            except RecordError as e:
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


def export_images(samples: list[Sample], run_dir: Path, folder: str = "rollouts/images") -> dict[str, str]:
    """Save the loaded images of `samples` that have no file of their own (bytes, PIL, table cells, URLs) as PNG
    under `run_dir/folder`, once each, so a rollout dump can point at them. Returns `{label: path relative to
    run_dir}` for `Sample.images` labels."""
    import hashlib

    out = {}
    for s in samples:
        for j, (label, img) in enumerate(zip(s.images, s.pil_images)):
            src = s.image_data[j] if j < len(s.image_data) else label
            if isinstance(src, str) and not src.startswith(("data:", "http://", "https://")):
                continue  # a file: the dump keeps its path
            rel = f"{folder}/{hashlib.sha256(label.encode()).hexdigest()[:20]}.png"
            path = run_dir / rel
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path, format="PNG")
            out[label] = rel
    return out


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


def _struct_path(path: str, roots: list[Path], limits: RecordLimits) -> str:
    """The path of an image struct stored without bytes, under the same rules as a path entry."""
    if is_url(path) or path.startswith("data:"):
        if is_url(path) and not limits.allow_remote_images:
            raise ImageError(f"{path[:200]}: remote images are off (set data.allow_remote_images: true)")
        return path
    if not roots:
        raise ImageError(f"image path {path!r}: no data folder to resolve it against")
    return resolve_image_path(path, roots, limits.allow_external_images)


def load_dataset_files(
    sources: list[str], fields: FieldMap, split: str = "train", seed: int = 0, shuffle: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS, max_items: int = 0, limits: RecordLimits | None = None,
) -> Dataset:  # fmt: skip
    """Read every source, validate and bound each record, and return the usable ones with the skip list.

    `sources`: JSONL/JSON/parquet files, `save_to_disk` folders, or hub datasets (`hub:org/name`, also
    `hub:LOCAL_FOLDER` for anything `datasets.load_dataset` reads)."""
    limits = limits or RecordLimits()
    samples: list[Sample] = []
    skipped: list[Skip] = []
    seen: set[str] = set()
    roots: dict[str, list[Path]] = {}
    for source in sources:
        src = _read_rows(source, split, fields)
        for default_id, row in src.rows:
            s = row if isinstance(row, Skip) else to_sample(row, default_id, fields, src.roots, limits)
            if isinstance(s, Sample) and s.id in seen:
                s = Skip(s.id, "duplicate record id")
            if isinstance(s, Skip):
                skipped.append(s)
                log.warning("skipped record %s: %s", s.id, s.reason)
                continue
            seen.add(s.id)
            samples.append(s)
            if any(isinstance(d, EmbeddedImage) for d in s.image_data):
                roots[s.id] = src.roots
    if max_items:
        samples = samples[:max_items]
    return Dataset(samples, seed=seed, shuffle=shuffle, max_pixels=max_pixels, skipped=skipped, limits=limits,
                   roots=roots)  # fmt: skip
