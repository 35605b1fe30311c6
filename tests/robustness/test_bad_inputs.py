"""The bad-input corpus: every case is one table entry with its expected outcome, and its pytest id
says which case failed.

Outcomes:

* `Raises(exc, pattern)`: the call raises `exc` and the message matches `pattern`, which names the key, file,
  field or record at fault;
* `Skipped(id, pattern)`: the data loader skips exactly one record, counts it under that record id and gives a
  reason matching `pattern`; the good record beside it still loads;
* `Accepted(check)`: the input is valid (if unusual) and loads; `check` inspects the result.

Covered: configs (unknown key, wrong type, missing value, invalid choice, zero/negative sizes, non-finite
numbers, conflicting settings, bad prompt templates), data (missing/unknown/damaged files, not JSON, not UTF-8,
missing answer, empty question, duplicate ids, too many images, an over-long question, remote images while
off, image paths leaving the data folder, special-token text, ...), images (missing, empty, corrupt, truncated,
decompression bomb as a file or as bytes, an aspect ratio the processor refuses, every pixel mode, a 12000x12000
PNG within the pixel budget and a memory bound), models (missing path,
not a VLM, unsupported architecture, no weights, unknown hub id) and answers (adversarial math and huge
outputs: score 0 in bounded time, never executed). The runtime faults (non-finite loss, SIGTERM, SIGKILL) are in
`test_faults.py`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmrlsd.config import ConfigError, load_config
from mmrlsd.data.images import DEFAULT_MAX_PIXELS, MIN_SIDE, load_image
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.data.sources import FieldMap, RecordLimits, load_dataset_files
from mmrlsd.errors import DataError, ImageError, ModelError
from mmrlsd.model.load import check_checkpoint
from mmrlsd.train.preflight import check_registered

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Raises:
    exc: type[BaseException]
    pattern: str


@dataclass(frozen=True)
class Skipped:
    id: str
    pattern: str
    at_draw: bool = False
    """Image problems are found when a batch loads the record, which stays in the dataset (skipped on each draw,
    counted once)."""


@dataclass(frozen=True)
class Accepted:
    check: Callable[[Any], None]


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], Any]
    """Builds the input under the test's tmp dir and calls the mmrlsd function under test."""
    expect: Raises | Skipped | Accepted


def _run_case(case: Case, tmp_path: Path) -> None:
    if isinstance(case.expect, Raises):
        with pytest.raises(case.expect.exc, match=case.expect.pattern):
            case.run(tmp_path)
        return
    result = case.run(tmp_path)
    if isinstance(case.expect, Skipped):
        ds = result
        assert [s.id for s in ds.skipped] == [case.expect.id], [(s.id, s.reason) for s in ds.skipped]
        assert re.search(case.expect.pattern, ds.skipped[0].reason), ds.skipped[0].reason
        expected = [case.expect.id, "good"] if case.expect.at_draw else ["good"]
        assert [s.id for s in ds.samples] == expected  # the bad record never stops the others
    else:
        case.expect.check(result)


# ---------------------------------------------------------------------------------------------------- configs

BASE = ["model.path=/models/qwen", "data.train_files=[train.jsonl]"]


def _override(*items: str) -> Callable[[Path], Any]:
    return lambda tmp: load_config(None, BASE + list(items))


def _yaml(text: str) -> Callable[[Path], Any]:
    def run(tmp: Path):
        path = tmp / "bad.yaml"
        path.write_text(text)
        return load_config(path)

    return run


def _templates(student: str | None, teacher: str = "{{ problem }} {{ reference }}") -> Callable[[Path], Any]:
    def run(tmp: Path):
        s, t = tmp / "student.jinja", tmp / "teacher.jinja"
        if student is not None:
            s.write_text(student)
        t.write_text(teacher)
        return PromptBuilder(None, s, t, "answer")

    return run


CONFIG_CASES = [
    Case("config-unknown-key-suggests", _yaml("algo:\n  eps_W: 0.1\n"),
         Raises(ConfigError, r"bad\.yaml: unknown key 'algo\.eps_W'; did you mean 'algo\.eps_w'\?")),
    Case("config-unknown-section", _override("algoo.lam0=0"), Raises(ConfigError, r"unknown key 'algoo'")),
    Case("config-unknown-key-override", _override("trainer.total_step=3"),
         Raises(ConfigError, r"\(command-line override\): unknown key 'trainer\.total_step'; did you mean "
                             r"'trainer\.total_steps'")),
    Case("config-wrong-type-int", _override("trainer.total_steps=ten"),
         Raises(ConfigError, r"'trainer\.total_steps' must be int, got str 'ten'")),
    Case("config-wrong-type-float", _override("optim.lr=fast"),
         Raises(ConfigError, r"'optim\.lr' must be float, got str 'fast'")),
    Case("config-wrong-type-bool", _override("algo.norm_std=3"), Raises(ConfigError, r"'algo\.norm_std' must be bool")),
    Case("config-wrong-type-list", _yaml("data: {train_files: {a: 1}}\nmodel: {path: m}\n"),
         Raises(ConfigError, r"'data\.train_files' must be a list, got dict")),
    Case("config-wrong-type-list-item", _override("data.train_files=[1]"),
         Raises(ConfigError, r"'data\.train_files\[0\]' must be str, got int 1")),
    Case("config-section-not-mapping", _yaml("rollout: 3\n"), Raises(ConfigError, r"'rollout' must be a mapping")),
    Case("config-top-level-not-mapping", _yaml("- a\n- b\n"),
         Raises(ConfigError, r"bad\.yaml: the top level must be a mapping")),
    Case("config-not-yaml", _yaml("algo: [\n"), Raises(ConfigError, r"bad\.yaml: not valid YAML")),
    Case("config-file-missing", lambda tmp: load_config(tmp / "nope.yaml"),
         Raises(ConfigError, r"nope\.yaml: config file not found")),
    Case("config-override-malformed", lambda tmp: load_config(None, [*BASE, "trainer.total_steps"]),
         Raises(ConfigError, r"override 'trainer\.total_steps' is not of the form section\.key=value")),
    Case("config-missing-model-path", lambda tmp: load_config(None, ["data.train_files=[t.jsonl]"]),
         Raises(ConfigError, r"'model\.path' is required")),
    Case("config-missing-train-files", lambda tmp: load_config(None, ["model.path=/m"]),
         Raises(ConfigError, r"'data\.train_files' is required")),
    Case("config-null-required", _override("model.path=null"),
         Raises(ConfigError, r"'model\.path' must be str, got NoneType")),
    Case("config-invalid-choice-dtype", _override("model.dtype=fp32"),
         Raises(ConfigError, r"'model\.dtype' is 'fp32'; valid choices: float32, bfloat16, float16")),
    Case("config-invalid-choice-token-adv", lambda tmp: check_registered(load_config(None, [*BASE, "algo.token_adv=ppo"])),
         Raises(ConfigError, r"'algo\.token_adv' is 'ppo'; valid choices: rlsd, grpo")),
    Case("config-invalid-choice-engine", _override("rollout.engine=tgi"),
         Raises(ConfigError, r"'rollout\.engine' is 'tgi'; valid choices: hf, vllm")),
    Case("config-zero-group-size", _override("rollout.n=0"), Raises(ConfigError, r"'rollout\.n' must be > 0, got 0")),
    Case("config-negative-batch-size", _override("rollout.batch_size=-2"),
         Raises(ConfigError, r"'rollout\.batch_size' must be > 0, got -2")),
    Case("config-zero-max-new-tokens", _override("rollout.max_new_tokens=0"),
         Raises(ConfigError, r"'rollout\.max_new_tokens' must be > 0")),
    Case("config-zero-micro-batch", _override("optim.micro_batch_size=0"),
         Raises(ConfigError, r"'optim\.micro_batch_size' must be > 0")),
    Case("config-negative-lr", _override("optim.lr=-1e-6"), Raises(ConfigError, r"'optim\.lr' must be > 0")),
    Case("config-negative-save-every", _override("trainer.save_every=-1"),
         Raises(ConfigError, r"'trainer\.save_every' must be >= 0, got -1")),
    Case("config-zero-max-bad-steps", _override("trainer.max_bad_steps=0"),  # 0 used to abort at step 1
         Raises(ConfigError, r"'trainer\.max_bad_steps' must be > 0, got 0")),
    Case("config-zero-reward-timeout", _override("reward.timeout=0"),  # 0 s: every math check times out
         Raises(ConfigError, r"'reward\.timeout' must be > 0")),
    Case("config-negative-max-pixels", _override("model.max_pixels=-1"),
         Raises(ConfigError, r"'model\.max_pixels' must be >= 0, got -1")),
    Case("config-negative-lam-warmup", _override("algo.lam_warmup_steps=-5"),
         Raises(ConfigError, r"'algo\.lam_warmup_steps' must be >= 0")),
    Case("config-nan-float", _override("optim.lr=.nan"), Raises(ConfigError, r"'optim\.lr' must be a finite number")),
    Case("config-inf-float", _override("reward.timeout=.inf"),
         Raises(ConfigError, r"'reward\.timeout' must be a finite number, got inf")),
    Case("config-out-of-range-lam0", _override("algo.lam0=1.5"), Raises(ConfigError, r"'algo\.lam0' must be in \[0, 1\]")),
    Case("config-out-of-range-eps-w", _override("algo.eps_w=1.5"), Raises(ConfigError, r"'algo\.eps_w' must be <= 1")),
    Case("config-out-of-range-top-p", _override("rollout.top_p=0"), Raises(ConfigError, r"'rollout\.top_p' must be in")),
    Case("config-betas-length", _override("optim.betas=[0.9]"),
         Raises(ConfigError, r"'optim\.betas' must have 2 values")),
    Case("config-conflict-group-of-one", _override("rollout.n=1"),
         Raises(ConfigError, r"'rollout\.n' must be >= 2 for group advantages")),
    Case("config-conflict-mini-batches", _override("rollout.n=2", "rollout.batch_size=2", "optim.mini_batches=5"),
         Raises(ConfigError, r"'optim\.mini_batches' \(5\) exceeds the B\*G responses")),
    Case("config-conflict-pixel-budget", _override("model.min_pixels=5000", "model.max_pixels=4000"),
         Raises(ConfigError, r"'model\.min_pixels' \(5000\) > 'model\.max_pixels' \(4000\)")),
    Case("config-conflict-flash-attn-cpu", _override("model.attn_implementation=flash_attention_2",
                                                     "trainer.device=cpu"),
         Raises(ConfigError, r"'model\.attn_implementation' flash_attention_2 needs 'trainer\.device' cuda")),
    Case("config-conflict-val-without-files", _override("trainer.val_every=5"),
         Raises(ConfigError, r"'trainer\.val_every' needs 'data\.val_files'")),
    Case("config-zero-reward-weights", _override("reward.acc_weight=0", "reward.format_weight=0"),
         Raises(ConfigError, r"'reward\.acc_weight' \+ 'reward\.format_weight' must be > 0")),
    Case("template-missing", _templates(None), Raises(FileNotFoundError, r"student\.jinja: prompt template not found")),
    Case("template-syntax-error", _templates("{{ problem "),
         Raises(ConfigError, r"student\.jinja: not a valid prompt template \(line 1\)")),
    Case("template-unknown-variable", _templates("{{ question }}"),
         Raises(ConfigError, r"student\.jinja: prompt template cannot render: 'question' is undefined")),
    Case("template-sandbox-escape", _templates("{{ problem.__class__.__mro__[1].__subclasses__() }}"),
         Raises(ConfigError, r"student\.jinja: prompt template cannot render: access to attribute")),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- data

GOOD = {"id": "good", "problem": "how many?", "answer": "3"}


def _png(path: Path, size=(48, 48), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path, **save)
    return path


def _records(*bad: dict | str | bytes, name: str = "train.jsonl", good_first: bool = False,
             fields: FieldMap | None = None, limits: RecordLimits | None = None) -> Callable[[Path], Any]:  # fmt: skip
    """A JSONL file with the good record and `bad` lines (dicts are JSON-encoded), loaded unshuffled."""

    def run(tmp: Path):
        lines = [
            b if isinstance(b, bytes) else (b if isinstance(b, str) else json.dumps(b)).encode() for b in bad
        ]
        good = json.dumps(GOOD).encode()
        path = tmp / name
        path.write_bytes(b"\n".join([good, *lines] if good_first else [*lines, good]) + b"\n")
        return load_dataset_files([str(path)], fields or FieldMap(), shuffle=False, limits=limits)

    return run


def _outside_image(kind: str) -> Callable[[Path], Any]:
    """A record whose image path leaves the data folder (`data/`): absolute, `..` or a symlink pointing out."""

    def run(tmp: Path):
        (tmp / "data").mkdir()
        _png(tmp / "secret.png")
        ref = {"absolute": str(tmp / "secret.png"), "dotdot": "../secret.png", "symlink": "link.png"}[kind]
        if kind == "symlink":
            os.symlink(tmp / "secret.png", tmp / "data" / "link.png")
        rec = {"id": "outside", "problem": "q?", "answer": "1", "images": [ref]}
        (tmp / "data" / "train.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(GOOD) + "\n")
        return load_dataset_files([str(tmp / "data" / "train.jsonl")], FieldMap(), shuffle=False)

    return run


def _image_record(make: Callable[[Path], Path | str]) -> Callable[[Path], Any]:
    """A record whose image is made by `make` (first), then the good record; drawing one sample skips the bad."""

    def run(tmp: Path):
        img = make(tmp)
        rec = {"id": "bad_image", "problem": "what is shown?", "answer": "1", "images": [str(img)]}
        (tmp / "train.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(GOOD) + "\n")
        ds = load_dataset_files([str(tmp / "train.jsonl")], FieldMap(), shuffle=False)
        for _ in range(3):  # three epochs: the bad record is drawn (and skipped) three times, counted once
            (sample,) = ds.next_batch(1)
            assert sample.id == "good" and sample.pil_images == []
        return ds

    return run


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _loaded(tmp: Path, name: str, data: bytes | str, **kw):
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return load_dataset_files([str(path)], FieldMap(), **kw)


def _parquet_null_answer(tmp: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["nullans", "good"], "problem": ["q?", GOOD["problem"]], "answer": [None, "3"]}),
                   tmp / "train.parquet")  # fmt: skip
    return load_dataset_files([str(tmp / "train.parquet")], FieldMap(), shuffle=False)


def _saved_dict(tmp: Path, split: str):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"problem": ["q?"], "answer": ["1"]})}).save_to_disk(
        str(tmp / "saved")
    )
    return load_dataset_files([str(tmp / "saved")], FieldMap(), split=split)


def _duplicates_across_files(tmp: Path):
    (tmp / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp / "b.jsonl").write_text(json.dumps({**GOOD, "problem": "another?"}) + "\n")
    return load_dataset_files([str(tmp / "a.jsonl"), str(tmp / "b.jsonl")], FieldMap())


def _all_broken(tmp: Path):
    ds = _loaded(tmp, "train.jsonl", 'not json\n{"problem": "q"}\n')
    assert len(ds.skipped) == 2
    return ds.next_batch(1)


def _all_skipped(pattern: str) -> Callable[[Any], None]:
    """Every record skipped for the same reason (e.g. `data.answer_key` names a field no record has)."""

    def check(ds) -> None:
        assert not ds.samples and len(ds.skipped) == 2
        assert all(re.search(pattern, s.reason) for s in ds.skipped), [s.reason for s in ds.skipped]
        with pytest.raises(DataError, match="no usable training records"):
            ds.next_batch(1)

    return check


def _accepts(n: int, **expect) -> Callable[[Any], None]:
    def check(ds) -> None:
        assert not ds.skipped, [(s.id, s.reason) for s in ds.skipped]
        assert len(ds.samples) == n
        for key, value in expect.items():
            assert getattr(ds.samples[0], key) == value

    return check


DATA_CASES = [
    Case("data-missing-file", lambda tmp: load_dataset_files([str(tmp / "nope.jsonl")], FieldMap()),
         Raises(DataError, r"nope\.jsonl: data file not found")),
    Case("data-unknown-format", lambda tmp: _loaded(tmp, "train.csv", "a,b\n"),
         Raises(DataError, r"train\.csv: unknown data format '\.csv'")),
    Case("data-json-not-a-list", lambda tmp: _loaded(tmp, "train.json", json.dumps(GOOD)),
         Raises(DataError, r"train\.json: a \.json data file must hold a list of records")),
    Case("data-json-file-not-utf8", lambda tmp: _loaded(tmp, "train.json", b'[{"problem": "caf\xe9"}]'),
         Raises(DataError, r"train\.json: not a JSON list \(UnicodeDecodeError")),
    Case("data-parquet-corrupt", lambda tmp: _loaded(tmp, "train.parquet", b"PAR1 this is not parquet"),
         Raises(DataError, r"train\.parquet: unreadable parquet file")),
    Case("data-hub-dataset-unavailable", lambda tmp: load_dataset_files(["hub:no-such-org/no-such-data"], FieldMap()),
         Raises(DataError, r"hub:no-such-org/no-such-data: cannot load hub dataset split 'train'")),
    Case("data-no-usable-record", _all_broken, Raises(DataError, r"no usable training records")),
    Case("data-plain-folder", lambda tmp: load_dataset_files([str(tmp)], FieldMap()),
         Raises(DataError, r"a folder, but not one written by datasets' save_to_disk .* hub:FOLDER")),
    Case("data-saved-dataset-missing-split", lambda tmp: _saved_dict(tmp, "validation"),
         Raises(DataError, r"no split 'validation' \(splits: train\)")),
    Case("data-line-not-json", _records("{'problem': 'single quotes'}"), Skipped("train.jsonl:1", r"line is not JSON")),
    Case("data-line-truncated-json", _records('{"id": "t", "problem": "cut', good_first=True),
         Skipped("train.jsonl:2", r"line is not JSON \(Unterminated string")),
    Case("data-line-nested-too-deep", _records("[" * 100_000), Skipped("train.jsonl:1", r"nested too deeply")),
    Case("data-line-not-object", _records("[1, 2, 3]"), Skipped("train.jsonl:1", r"line is not a JSON object")),
    Case("data-line-not-utf8", _records(b'{"id": "latin1", "problem": "caf\xe9?", "answer": "1"}'),
         Skipped("train.jsonl:1", r"line is not valid UTF-8")),
    Case("data-json-item-not-object", lambda tmp: _loaded(tmp, "train.json", json.dumps(["text", GOOD]), shuffle=False),
         Skipped("train.json:0", r"item is not a JSON object")),
    Case("data-missing-answer", _records({"id": "noans", "problem": "q?"}),
         Skipped("noans", r"missing or empty answer field 'answer'")),
    Case("data-blank-answer", _records({"id": "blank", "problem": "q?", "answer": "   "}),
         Skipped("blank", r"missing or empty answer field 'answer'")),
    Case("data-nan-answer", _records('{"id": "nan", "problem": "q?", "answer": NaN}'),
         Skipped("nan", r"missing or empty answer field 'answer'")),
    Case("data-list-answer", _records({"id": "listans", "problem": "q?", "answer": ["A"]}),
         Skipped("listans", r"missing or empty answer field 'answer'")),
    Case("data-parquet-null-answer", _parquet_null_answer, Skipped("nullans", r"missing or empty answer field")),
    Case("data-renamed-answer-field", _records({"id": "r1", "problem": "q?", "answer": "1"},
                                               fields=FieldMap(answer="label")),
         Accepted(_all_skipped(r"missing or empty answer field 'label'"))),
    Case("data-empty-question", _records({"id": "noq", "problem": "", "answer": "1"}),
         Skipped("noq", r"missing or empty question field 'problem'")),
    Case("data-image-token-only-question", _records({"id": "tok", "problem": " <image> ", "answer": "1"}),
         Skipped("tok", r"missing or empty question field 'problem'")),
    Case("data-question-not-text", _records({"id": "numq", "problem": 42, "answer": "1"}),
         Skipped("numq", r"missing or empty question field")),
    Case("data-duplicate-id", _records(GOOD, good_first=True), Skipped("good", r"duplicate record id")),
    Case("data-duplicate-id-across-files", _duplicates_across_files, Skipped("good", r"duplicate record id")),
    Case("data-images-not-a-list", _records({"id": "imgnum", "problem": "q?", "answer": "1", "images": 5}),
         Skipped("imgnum", r"field 'images' must be a list of paths")),
    Case("data-image-entry-empty", _records({"id": "imgempty", "problem": "q?", "answer": "1", "images": [""]}),
         Skipped("imgempty", r"image entry without a path")),
    Case("data-utf8-bom", lambda tmp: _loaded(tmp, "train.jsonl", b"\xef\xbb\xbf" + json.dumps(GOOD).encode()),
         Accepted(_accepts(1, id="good"))),
    Case("data-crlf-lines", lambda tmp: _loaded(tmp, "train.jsonl", json.dumps(GOOD) + "\r\n\r\n"),
         Accepted(_accepts(1, answer="3"))),
    Case("data-numeric-answer", lambda tmp: _loaded(tmp, "train.jsonl", json.dumps({**GOOD, "answer": 12})),
         Accepted(_accepts(1, answer="12"))),
    Case("data-huge-int-answer", lambda tmp: _loaded(tmp, "train.jsonl", '{"problem": "q", "answer": 1' + "0" * 400 + "}"),
         Accepted(_accepts(1, answer="1" + "0" * 400))),
    Case("data-unicode-question", lambda tmp: _loaded(tmp, "train.jsonl", json.dumps({**GOOD, "problem": "∠ABC = ? 角"})),
         Accepted(_accepts(1, problem="∠ABC = ? 角"))),
    Case("image-missing-file", _image_record(lambda tmp: tmp / "nope.png"),
         Skipped("bad_image", r"nope\.png: image file not found", at_draw=True)),
    Case("image-zero-bytes", _image_record(_write("empty.png", b"")),
         Skipped("bad_image", r"empty\.png: image file is empty \(0 bytes\)", at_draw=True)),
    Case("image-corrupt", _image_record(_write("corrupt.png", os.urandom(2048))),
         Skipped("bad_image", r"corrupt\.png: unreadable image", at_draw=True)),
    Case("image-text-named-jpg", _image_record(_write("page.jpg", b"<html>404 not found</html>")),
         Skipped("bad_image", r"page\.jpg: unreadable image", at_draw=True)),
    Case("image-aspect-300x1", _image_record(lambda tmp: _png(tmp / "wide.png", (300, 1))),
         Skipped("bad_image", r"wide\.png: image aspect ratio beyond the vision processor's 200:1 \(300x1\)$",
                 at_draw=True)),
    Case("image-aspect-1x250-upscaled", _image_record(lambda tmp: _png(tmp / "tall.png", (1, 250))),
         Skipped("bad_image", r"tall\.png: image aspect ratio beyond", at_draw=True)),
    Case("data-too-many-images", _records({"id": "many", "problem": "q?", "answer": "1", "images": ["a.png"] * 10_000}),
         Skipped("many", r"^too many images \(10,000; data\.max_images is 32\)$")),
    Case("data-huge-problem", _records({"id": "huge", "problem": "x" * 200_000, "answer": "1"},
                                       limits=RecordLimits(max_prompt_tokens=8192)),
         Skipped("huge", r"^prompt too long \(question and answer hold 200,001 characters, over 16 per token of "
                         r"data\.max_prompt_tokens: 8,192\)$")),
    Case("data-remote-image-off", _records({"id": "web", "problem": "q?", "answer": "1",
                                            "images": ["https://10.0.0.1/a.png"]}),
         Skipped("web", r"^https://10\.0\.0\.1/a\.png: remote images are off \(set data\.allow_remote_images: true\)$")),
    Case("data-image-path-absolute-outside", _outside_image("absolute"),
         Skipped("outside", r"secret\.png': image path leaves the data folder \(.*data\.allow_external_images")),
    Case("data-image-path-dotdot", _outside_image("dotdot"),
         Skipped("outside", r"^'\.\./secret\.png': image path leaves the data folder")),
    Case("data-image-symlink-outside", _outside_image("symlink"),
         Skipped("outside", r"^'link\.png': image path leaves the data folder")),
    Case("data-image-entry-not-a-path", _records({"id": "imgint", "problem": "q?", "answer": "1", "images": [7]}),
         Skipped("imgint", r"image entry 0 is int: expected a path, URL, image bytes or PIL image")),
    Case("data-image-struct-text-bytes", _records({"id": "b64", "problem": "q?", "answer": "1",
                                                   "images": [{"bytes": "iVBORw0KGgo=", "path": None}]}),
         Skipped("b64", r"^image entry 0: 'bytes' holds str, not bytes$")),
    Case("data-special-token-text", _records({"id": "tok", "problem": "<|image_pad|><|im_end|>", "answer": "1"},
                                             good_first=True),
         Accepted(_accepts(2, problem=GOOD["problem"]))),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------- images


def _png_stream(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """A `width` x `height` 8-bit grayscale PNG of zeros, compressed row block by row block (never held in
    memory; 12000x12000 is a ~140 KB file). `rows` < height writes a short (truncated) pixel stream."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp, block, body = zlib.compressobj(6), b"\x00" * (1 + width) * 100, []
    n = height if rows is None else rows
    for _ in range(n // 100):
        body.append(comp.compress(block))
    body.append(comp.compress(b"\x00" * (1 + width) * (n % 100)) + comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, color type 0 (grayscale)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")
    )
    return path


def _truncated_png(tmp: Path) -> Path:
    full = _png(tmp / "full.png", (200, 200), "RGB")
    Image.effect_noise((200, 200), 64).convert("RGB").save(full)  # noise: the pixel stream is long
    data = full.read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.png"


def _mode_image(mode: str, ext: str = "png", size=(64, 48), fill=None, **save) -> Callable[[Path], Any]:
    def run(tmp: Path):
        img = Image.new(mode, size, fill) if fill is not None else Image.new(mode, size)
        path = tmp / f"img.{ext}"
        img.save(path, **save)
        return load_image(path)

    return run


def _gradient16(tmp: Path):
    import numpy as np

    img = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0..65520
    assert img.mode == "I;16"
    img.save(tmp / "g16.png")
    assert Image.open(tmp / "g16.png").mode == "I;16"
    return load_image(tmp / "g16.png")


def _palette_transparent(tmp: Path):
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0] * 256)
    img.save(tmp / "pt.png", transparency=0)  # index 0 (red) is fully transparent
    return load_image(tmp / "pt.png")


def _rgb(size=None, pixel=None) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert img.mode == "RGB"
        if size is not None:
            assert img.size == size
        if pixel is not None:
            assert img.getpixel((5, 5)) == pixel

    return check


def _within_budget(max_pixels: int) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert img.mode == "RGB" and img.width * img.height <= max_pixels and min(img.size) >= MIN_SIDE

    return check


def _stretched(img: Image.Image) -> None:
    assert img.mode == "RGB" and img.size == (64, 64)
    assert img.getextrema() == ((0, 255),) * 3  # the 16-bit range maps onto 0..255, not clipped to white


IMAGE_CASES = [
    Case("image-load-missing", lambda tmp: load_image(tmp / "gone.png"), Raises(ImageError, r"gone\.png: image file not found")),
    Case("image-load-truncated", lambda tmp: load_image(_truncated_png(tmp)),
         Raises(ImageError, r"truncated\.png: unreadable image")),
    Case("image-decompression-bomb", lambda tmp: load_image(_png_stream(tmp / "bomb.png", 25_000, 25_000, rows=10)),
         Raises(ImageError, r"bomb\.png: 25000x25000 exceeds the 400,000,000-pixel limit")),
    Case("image-bytes-decompression-bomb",
         lambda tmp: load_image({"bytes": _png_stream(tmp / "b.png", 25_000, 25_000, rows=10).read_bytes(),
                                 "path": None}, name="rec9 image 0"),
         Raises(ImageError, r"^rec9 image 0: 25000x25000 exceeds the 400,000,000-pixel limit")),
    Case("image-struct-empty", lambda tmp: load_image({"bytes": None, "path": None}, name="rec9 image 0"),
         Raises(ImageError, r"^rec9 image 0: image entry has neither bytes nor a path")),
    Case("image-data-url-not-base64", lambda tmp: load_image("data:image/png,rawtext"),
         Raises(ImageError, r"a data URL image must be base64-encoded")),
    Case("image-grayscale", _mode_image("L", fill=128), Accepted(_rgb((64, 48), (128, 128, 128)))),
    Case("image-1-bit", _mode_image("1", fill=1), Accepted(_rgb((64, 48), (255, 255, 255)))),
    Case("image-rgba-transparent", _mode_image("RGBA", fill=(255, 0, 0, 0)), Accepted(_rgb((64, 48), (255, 255, 255)))),
    Case("image-rgba-opaque", _mode_image("RGBA", fill=(255, 0, 0, 255)), Accepted(_rgb((64, 48), (255, 0, 0)))),
    Case("image-gray-alpha", _mode_image("LA", fill=(0, 255)), Accepted(_rgb((64, 48), (0, 0, 0)))),
    Case("image-palette", _mode_image("P", fill=3), Accepted(_rgb((64, 48)))),
    Case("image-palette-transparency", _palette_transparent, Accepted(_rgb((40, 40), (255, 255, 255)))),
    Case("image-16-bit", _gradient16, Accepted(_stretched)),
    Case("image-32-bit-int-tiff", _mode_image("I", "tiff", fill=70000), Accepted(_rgb((64, 48)))),
    Case("image-float-tiff", _mode_image("F", "tiff", fill=0.5), Accepted(_rgb((64, 48)))),
    Case("image-cmyk-jpeg", _mode_image("CMYK", "jpg", fill=(0, 0, 0, 0)), Accepted(_rgb((64, 48)))),
    Case("image-tiny-1x1", _mode_image("RGB", size=(1, 1)), Accepted(_rgb((MIN_SIDE, MIN_SIDE)))),
    Case("image-large-jpeg-draft", _mode_image("RGB", "jpg", size=(6000, 4000), fill=(200, 30, 30)),
         Accepted(_within_budget(DEFAULT_MAX_PIXELS))),
    Case("image-large-png-budget", lambda tmp: load_image(_png_stream(tmp / "big.png", 3000, 2000), 112 * 112),
         Accepted(_within_budget(112 * 112))),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------- models


def _model_dir(config: dict | str | None) -> Callable[[Path], Any]:
    def run(tmp: Path):
        d = tmp / "ckpt"
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return check_checkpoint(str(d))

    return run


def _load_model(path_of: Callable[[Path], str]) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from mmrlsd.model.load import load_model

        return load_model(path_of(tmp))

    return run


def _weightless_qwen(tmp: Path) -> str:
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    return str(tmp / "noweights")


MODEL_CASES = [
    Case("model-nonexistent-path", lambda tmp: check_checkpoint(str(tmp / "no-such-model")),
         Raises(ModelError, r"no-such-model: model directory not found")),
    Case("model-path-is-a-file", lambda tmp: check_checkpoint(str(_write("model.bin", b"x")(tmp))),
         Raises(ModelError, r"model\.bin: is a file, not a model directory")),
    Case("model-no-config", _model_dir(None), Raises(ModelError, r"ckpt: no config\.json")),
    Case("model-config-not-json", _model_dir("{model_type: qwen2_vl"), Raises(ModelError, r"config\.json: not valid JSON")),
    Case("model-text-only-llm", _model_dir({"model_type": "qwen2"}),
         Raises(ModelError, r"ckpt: model_type 'qwen2' is not a supported vision-language model; supported: qwen2_vl")),
    Case("model-not-a-language-model", _model_dir({"model_type": "resnet"}),
         Raises(ModelError, r"ckpt: model_type 'resnet' is not a supported vision-language model")),
    Case("model-unsupported-vlm", _model_dir({"model_type": "llava"}),
         Raises(ModelError, r"ckpt: model_type 'llava' is not a supported")),
    Case("model-config-without-type", _model_dir({"hidden_size": 8}), Raises(ModelError, r"ckpt: model_type None")),
    Case("model-no-weights", _load_model(_weightless_qwen),
         Raises(ModelError, r"noweights: cannot load as a vision-language model \(OSError")),
    Case("model-unknown-hub-id", _load_model(lambda tmp: "no-such-org/no-such-vlm"),
         Raises(ModelError, r"no-such-org/no-such-vlm: cannot load as a vision-language model")),
]  # fmt: skip

CASES = CONFIG_CASES + DATA_CASES + IMAGE_CASES + MODEL_CASES


def test_corpus_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES] + [a[0] for a in ANSWER_CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    _run_case(case, tmp_path)


# ------------------------------------------------------------------------------- the 12000 x 12000 image

_MEASURE = """
import json, re, sys
from mmrlsd.data.images import load_image

def hwm_kb():  # this process's peak RSS; unlike ru_maxrss it does not inherit the parent's peak across exec
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

base = hwm_kb()
img = load_image(sys.argv[1], int(sys.argv[2]))
print(json.dumps({"size": img.size, "mode": img.mode, "base_kb": base, "peak_kb": hwm_kb()}))
"""


def test_huge_image_is_downscaled_within_budget_and_memory(tmp_path):
    """A 12000x12000 PNG (144 MB decoded at 8 bits) loads within the pixel budget, and the loader's peak RSS
    stays below 1.5x the decoded size: no full-size RGB copy (432 MB), no second full-size buffer. Measured in
    a fresh interpreter (PIL only, no torch) so the peak belongs to this load; before the fix it was +706 MB."""
    path = _png_stream(tmp_path / "huge.png", 12_000, 12_000)
    assert path.stat().st_size < 1_000_000  # made cheaply: ~140 KB on disk
    budget = DEFAULT_MAX_PIXELS  # 1280*28*28 = 1,003,520 pixels
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(budget)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    w, h = m["size"]
    assert m["mode"] == "RGB" and w * h <= budget and w == h == 1001  # sqrt(1,003,520) = 1001.8
    decoded_mb = 12_000 * 12_000 / 1e6  # 144 MB
    grew_mb = (m["peak_kb"] - m["base_kb"]) * 1024 / 1e6
    print(f"12000x12000 PNG -> {w}x{h}; peak RSS +{grew_mb:.0f} MB (decoded size {decoded_mb:.0f} MB)")
    assert grew_mb < 1.5 * decoded_mb, f"peak RSS grew {grew_mb:.0f} MB loading a {decoded_mb:.0f} MB image"


def test_converted_images_are_train_ready(tiny_model, tmp_path):
    """Every pixel mode, after `load_image`, goes through a real Qwen-VL processor into pixel values."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model("qwen2_vl"))
    imgs = []
    for case in IMAGE_CASES:
        if isinstance(case.expect, Accepted):
            (tmp_path / case.id).mkdir()
            imgs.append(case.run(tmp_path / case.id))
    assert len(imgs) >= 10
    out = processor.image_processor(images=imgs, return_tensors="pt")
    assert out["image_grid_thw"].shape == (len(imgs), 3)
    assert out["pixel_values"].isfinite().all()


# ---------------------------------------------------------------------------------------------------- answers

TIMEOUT = 1.0
BOUND_S = (
    TIMEOUT + 20.0
)  # the time limit plus a worker restart (~1 s idle, up to ~6 s on a loaded 2-core box)

ANSWER_CASES = [
    ("answer-power-tower", r"<answer>2^{2^{2^{2^{2^{100}}}}}</answer>", "1"),
    ("answer-power-tower-9", r"<answer>9^{9^{9^{9}}}</answer>", "3"),
    ("answer-python-power", "<answer>9**9**9**9</answer>", "3"),
    ("answer-huge-factorial", "<answer>100000000!</answer>", "3"),
    ("answer-cancelling-giants", r"<answer>10^{10^{10}} - 10^{10^{10}} + 1</answer>", "2"),
    ("answer-nested-braces-5000", "<answer>" + "{" * 5000 + "1" + "}" * 5000 + "</answer>", "1"),
    ("answer-nested-fractions-9", "<answer>" + r"\frac{1}{" * 9 + "2" + "}" * 9 + "</answer>", "3"),
    ("answer-nested-sqrt-10", "<answer>" + r"\sqrt{" * 10 + "2" + "}" * 10 + "</answer>", "1"),
    ("answer-unbalanced-boxed", r"\boxed{" * 2000, "1"),
    ("answer-huge-output-no-answer", "x" * 2_000_000, "1"),
    ("answer-huge-number", "<answer>" + "9" * 200_000 + "</answer>", "1"),
    ("answer-many-open-tags", "<answer>" * 100_000, "1"),
    ("answer-many-boxes", r"\boxed{1}" * 100_000, "2"),
    ("answer-huge-matrix", r"<answer>\begin{pmatrix}" + "1&" * 5000 + r"1\end{pmatrix}</answer>", "1"),
    ("answer-huge-set", r"<answer>\{" + ",".join(map(str, range(300))) + r"\}</answer>", "1"),
    ("answer-float-overflow", "<answer>1e999999999</answer>", "1"),
    ("answer-control-chars", "<answer>\x00\x01\x02\x1b[2J</answer>", "1"),
    ("answer-lone-surrogate", "<answer>\ud800</answer>", "1"),
    ("answer-adversarial-gold", "<answer>0</answer>", r"2^{2^{2^{2^{100}}}}"),
    ("answer-python-injection", "<answer>__import__('os').system('touch {marker}')</answer>", "0"),
    ("answer-exec-injection", "<answer>exec(\"open('{marker}', 'w')\")</answer>", "1"),
    ("answer-sympy-injection", "<answer>Symbol('x').__class__.__mro__[-1].__subclasses__()</answer>", "1"),
]


@pytest.fixture(scope="module")
def warm_checker():
    """Start the math worker once, outside the timed cases."""
    from mmrlsd.reward.rewards import score_responses

    score_responses([r"<answer>\frac{1}{2}</answer>"], ["0.5"], [None], timeout=30.0)
    return score_responses


@pytest.mark.parametrize("case_id,response,gold", ANSWER_CASES, ids=[c[0] for c in ANSWER_CASES])
def test_adversarial_answer_scores_zero_in_bounded_time(case_id, response, gold, warm_checker, tmp_path):
    marker = tmp_path / "executed"
    response = response.replace("{marker}", str(marker))
    t0 = time.monotonic()
    (result,) = warm_checker([response], [gold], [None], timeout=TIMEOUT)
    elapsed = time.monotonic() - t0
    assert result.reward == 0.0 and result.accuracy == 0.0, result
    assert elapsed < BOUND_S, f"{case_id}: {elapsed:.1f} s"
    assert not marker.exists(), "the answer string was executed"
