"""Atomic, resumable, reshardable checkpoints.

`checkpoint-N/` holds `state/` (a `torch.distributed.checkpoint` of the policy, its optimizer state and the frozen
teacher snapshot: loadable on any number of ranks), the model config and processor, `rng_rank<r>.pt` and
`trainer_state.json` (step, data position, skips, λ), and `hf/`: the policy as a plain Hugging Face model folder
(config, safetensors weights in the run's `model.dtype`, generation config, processor with its tokenizer and chat
template) that `from_pretrained`, vLLM, lmms-eval and VLMEvalKit load unchanged. It is written under a temporary
name, flushed, marked `COMPLETE`, then renamed, so a kill mid-save leaves the previous checkpoint as the newest
complete one. `mmrlsd export` writes the same `hf/` folder from a checkpoint saved without one
(`trainer.save_hf: false`). `torch.load` runs with `weights_only=True`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmrlsd.train import dist, faults

COMPLETE = "COMPLETE"
HF_DIR = "hf"
"""The plain Hugging Face folder inside every checkpoint."""


@contextmanager
def _single_process_ok():
    """torch.distributed.checkpoint warns on every save and load outside torchrun that it assumes one process:
    that is the intended use here, so the warning is hidden (only inside these calls)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


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


def save_checkpoint(run_dir: Path, step: int, policy, processor, optimizer, teacher, state: dict, keep_last: int,
                    hf_dtype: str | None = None) -> Path:  # fmt: skip
    """Collective under torchrun: every rank calls it. `hf_dtype` (float32/bfloat16/float16): also write `hf/`,
    the policy's full weights gathered on rank 0 and saved in that dtype (None: no `hf/` folder)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    to_save = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    if _has_snapshot(policy, teacher):
        to_save["teacher"] = get_model_state_dict(teacher)
    with _single_process_ok():
        dcp.save(to_save, checkpoint_id=str(tmp / "state"))
    faults.point("checkpoint", step)
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    if hf_dtype is not None:  # collective: every rank hands its shards to rank 0
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_main():
            write_hf_folder(policy, full, processor, tmp / HF_DIR, dtype=hf_dtype)
        del full
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
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(ckpt / "state"))
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    if _has_snapshot(policy, teacher):
        set_model_state_dict(teacher, state["teacher"])
    rng = ckpt / f"rng_rank{dist.rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_policy_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The policy's full state dict from a checkpoint, in one process (for export and comparisons)."""
    model = _empty_model(Path(ckpt))
    state = {"model": model.state_dict()}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(Path(ckpt) / "state"))
    return state["model"]


def _empty_model(ckpt: Path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(ckpt)
    return AutoModelForImageTextToText.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)


def write_hf_folder(
    model, state_dict: dict[str, torch.Tensor], processor, out: Path, dtype: str | None = None
) -> Path:
    """A plain Hugging Face model folder at `out`: `model`'s config and generation config, `state_dict` (full,
    unsharded tensors) as safetensors, cast to `dtype` (None: as they are), and the processor (tokenizer, chat
    template, image processor with the run's pixel budget). The one writer behind `hf/` and `mmrlsd export`."""
    if dtype is not None:
        target = getattr(torch, dtype)
        for k in list(state_dict):  # one tensor at a time: the peak stays one full copy of the weights
            v = state_dict[k]
            state_dict[k] = v.to(target) if v.is_floating_point() else v
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    try:
        model.save_pretrained(out, state_dict=state_dict)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    config = copy.deepcopy(model.config)  # save_pretrained wrote the in-memory dtype (fp32 master weights)
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = str(dtypes.pop()).removeprefix("torch.")
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint (model + processor) from a training checkpoint."""
    from transformers import AutoProcessor

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete mmrlsd checkpoint (no {COMPLETE} marker)")
    processor = AutoProcessor.from_pretrained(ckpt)
    return write_hf_folder(_empty_model(ckpt), load_policy_weights(ckpt), processor, out)
