"""Atomic, resumable checkpoints.

`checkpoint-N/` holds the policy in Hugging Face format (loadable by `from_pretrained`, with the processor),
`optimizer.pt`, `teacher.safetensors` (the frozen teacher snapshot, when there is one), `rng.pt` and
`trainer_state.json` (step, data position, skips). It is written under a temporary name, flushed, marked
`COMPLETE`, then renamed, so a kill mid-save leaves the previous checkpoint as the newest complete one.
`torch.load` always runs with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from mmrlsd.train import faults

COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": 3}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))


def save_checkpoint(run_dir: Path, step: int, policy, processor, optimizer, teacher, state: dict, keep_last: int) -> Path:
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if teacher is not None and teacher is not policy:
        st_save_model(teacher, str(tmp / "teacher.safetensors"))
    faults.point("checkpoint", step)
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_dir(tmp)
    (tmp / COMPLETE).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(run_dir, keep_last)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / COMPLETE).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune(run_dir: Path, keep_last: int) -> None:
    for p in Path(run_dir).glob(".checkpoint-*.tmp-*"):  # leftovers of killed saves
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, policy, optimizer, teacher) -> dict:
    """Load weights, optimizer, teacher snapshot and RNG into the given objects; return the trainer state."""
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(loaded.state_dict())
    del loaded
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    if teacher is not None and teacher is not policy and (ckpt / "teacher.safetensors").is_file():
        st_load_model(teacher, str(ckpt / "teacher.safetensors"))
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())
