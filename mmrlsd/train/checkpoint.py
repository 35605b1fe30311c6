"""Atomic, resumable, reshardable checkpoints.

`checkpoint-N/` holds `state/` (a `torch.distributed.checkpoint` of the policy, its optimizer state and the frozen
teacher snapshot: loadable on any number of ranks), the model config and processor, `rng_rank<r>.pt` and
`trainer_state.json` (step, data position, skips, λ). It is written under a temporary name, flushed, marked
`COMPLETE`, then renamed, so a kill mid-save leaves the previous checkpoint as the newest complete one.
`mmrlsd export` turns a checkpoint into a plain Hugging Face model folder. `torch.load` runs with
`weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmrlsd import dist
from mmrlsd.model.load import empty_model, load_policy_weights
from mmrlsd.train import faults

COMPLETE = "COMPLETE"


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": 3}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))


def _has_snapshot(policy, teacher) -> bool:
    return teacher is not None and teacher is not policy


def save_checkpoint(run_dir: Path, step: int, policy, processor, optimizer, teacher, state: dict, keep_last: int) -> Path:
    """Collective under torchrun: every rank calls it."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    to_save = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    if _has_snapshot(policy, teacher):
        to_save["teacher"] = get_model_state_dict(teacher)
    dcp.save(to_save, checkpoint_id=str(tmp / "state"))
    faults.point("checkpoint", step)
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        policy.config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(
            json.dumps({**state, "step": step, "world_size": dist.world_size()}, indent=1)
        )
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        if final.exists():  # a re-save of the same step: move the old one aside, then drop it
            old = run_dir / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            (old / COMPLETE).unlink(missing_ok=True)
        os.replace(tmp, final)
        shutil.rmtree(run_dir / f".checkpoint-{step}.old", ignore_errors=True)
        prune(run_dir, keep_last)
    dist.barrier()
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
    for p in [*Path(run_dir).glob(".checkpoint-*.tmp"), *Path(run_dir).glob(".checkpoint-*.old")]:  # killed saves
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in complete_checkpoints(run_dir)[:-keep_last]:
            (p / COMPLETE).unlink(missing_ok=True)  # never leave a half-deleted folder marked complete
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, policy, optimizer, teacher) -> dict:
    """Load weights, optimizer, teacher snapshot and RNG into the given (possibly sharded) objects; return the
    trainer state. Works on a different number of ranks than the checkpoint was written with."""
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    if _has_snapshot(policy, teacher):
        state["teacher"] = get_model_state_dict(teacher)
    dcp.load(state, checkpoint_id=str(ckpt / "state"))
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    if _has_snapshot(policy, teacher):
        set_model_state_dict(teacher, state["teacher"])
    rng = ckpt / f"rng_rank{dist.rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint (model + processor) from a training checkpoint."""
    from transformers import AutoProcessor

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete mmrlsd checkpoint (no {COMPLETE} marker)")
    model = empty_model(ckpt)
    model.load_state_dict(load_policy_weights(ckpt))
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(ckpt).save_pretrained(out)
    return out
