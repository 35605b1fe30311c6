"""Shared fixtures: tiny random Qwen-VL checkpoints built locally (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinydata import write_records  # noqa: F401  (re-exported for older imports)

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: `tiny_model("qwen2_5_vl")` -> directory of a tiny random checkpoint (built once per session)."""
    from mmrlsd.model.tiny import make_tiny

    cache: dict[str, Path] = {}

    def build(arch: str = "qwen2_5_vl") -> Path:
        if arch not in cache:
            cache[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), seed=0)
        return cache[arch]

    return build


@pytest.fixture
def tiny_records(tmp_path) -> Path:
    return write_records(tmp_path / "data")


@pytest.fixture
def record_instances(monkeypatch):
    """`record_instances(owner, name)`: the class `owner.<name>` replaced, for the test, by a subclass that records
    its instances; returns the list they are appended to, in order."""

    def record(owner, name: str) -> list:
        made, base = [], getattr(owner, name)

        class Spy(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(self)

        monkeypatch.setattr(owner, name, Spy)
        return made

    return record


@pytest.fixture
def without_interleave_flag(tmp_path):
    """`without_interleave_flag(checkpoint)`: a copy of a Qwen3-VL checkpoint whose config lacks
    `mrope_interleaved` (the flag vLLM needs to rotate image tokens as transformers does)."""
    import json
    import shutil

    def copy(src: Path) -> Path:
        dst = tmp_path / f"{Path(src).name}-no-interleave"
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        del cfg["text_config"]["rope_parameters"]["mrope_interleaved"]
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst

    return copy
