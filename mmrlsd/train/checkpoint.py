"""Atomic, resumable, reshardable checkpoints.

`checkpoint-N/` holds `state/` (a `torch.distributed.checkpoint` of the policy, its optimizer state and the frozen
teacher snapshot: loadable on any number of ranks), the model config and processor, `rng_rank<r>.pt` and
`trainer_state.json` (step, data position, skips, λ), and `hf/`: the policy as a plain Hugging Face model folder
(config, safetensors weights in the run's `model.dtype`, generation config, processor with its tokenizer and chat
template) that `from_pretrained`, vLLM, lmms-eval and VLMEvalKit load unchanged. It is written under a temporary
name, flushed, marked `COMPLETE`, then renamed, so a kill mid-save leaves the previous checkpoint as the newest
complete one. `mmrlsd export` writes the same folder (one writer, `write_hf_folder`) from a checkpoint saved
without it (`trainer.save_hf: false`).

A run directory is data, never code: `torch.distributed.checkpoint` stores its `.metadata` and the optimizer's
non-tensor entries as pickles, which torch reads with plain `pickle`. Here they are read by `_SafeUnpickler`
(only the checkpoint-metadata record types, torch dtypes/sizes and paths) and `torch.load(weights_only=True)`;
anything else is refused with `UnsafeCheckpointError`, naming the file, before a byte of it runs. A damaged
checkpoint (truncated shard, unreadable `trainer_state.json` or RNG file) raises `CheckpointError`, and resume
falls back to the newest intact one.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmrlsd import dist
from mmrlsd.errors import CheckpointError, UnsafeCheckpointError
from mmrlsd.train import faults

COMPLETE = "COMPLETE"
HF_DIR = "hf"
"""The plain Hugging Face folder inside every checkpoint."""
log = logging.getLogger("mmrlsd.train")

_DCP_META = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    **{(_DCP_META, n): True for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                      "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                      "StorageMeta", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): True,
    ("torch", "Size"): True,
    ("torch.serialization", "_get_layout"): True,  # looks a layout up by name in a fixed table
    ("collections", "OrderedDict"): True,
    **{(m, n): True for m in ("pathlib", "pathlib._local")
       for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
}  # fmt: skip


class _SafeUnpickler(pickle.Unpickler):
    """Only the globals a `torch.distributed.checkpoint` metadata file needs; anything else is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):  # fmt: skip
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load it: it names {module}.{name}, which a checkpoint's metadata never "
            "holds (this file was not written by mmrlsd, or was altered; loading it could run code)"
        )

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.path}: refusing to load it: unexpected persistent id in a pickle")


def read_metadata(path: str | Path) -> Metadata:
    """A checkpoint's `state/.metadata`, read without running anything it holds."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = _SafeUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # truncated or garbage bytes: pickle raises many types
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not checkpoint metadata (holds a {type(meta).__name__})")
    return meta


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        meta = read_metadata(Path(self.path) / ".metadata")
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) with `weights_only=True` instead of a plain pickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refusing to load the entry {read_item.dest_index.fqn!r} of a checkpoint shard: {e}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextmanager
def _single_process_ok():
    """torch.distributed.checkpoint warns on every save and load outside torchrun that it assumes one process:
    that is the intended use here, so the warning is hidden (only inside these calls)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dcp_load(state: dict, state_dir: Path) -> None:
    """`dcp.load` through the safe reader and planner; a damaged or unsafe shard raises our own errors."""
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=_SafeReader(str(state_dir)), planner=_SafePlanner())
    except CheckpointException as e:
        errors = [exc for exc, _ in e.failures.values()]
        ours = [x for x in errors if isinstance(x, CheckpointError)]
        if ours:
            raise ours[0] from None
        first = errors[0] if errors else e
        raise CheckpointError(f"{state_dir}: damaged shard data ({type(first).__name__}: {first})") from None


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check every file a resume reads, without loading weights; return the trainer state.

    Raises `UnsafeCheckpointError` for a pickle naming a forbidden global and `CheckpointError`, naming the file,
    for anything damaged: no COMPLETE marker, an unreadable `trainer_state.json`, `.metadata` or RNG file, a
    missing or truncated shard."""
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt}: not a complete mmrlsd checkpoint (no {COMPLETE} marker)")
    ts = ckpt / "trainer_state.json"
    try:
        state = json.loads(ts.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{ts}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "data_pos" not in state:
        raise CheckpointError(f"{ts}: not a trainer state (needs an integer 'step' and 'data_pos')")
    meta = read_metadata(ckpt / "state" / ".metadata")
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None or Path(rel).name != rel:
            raise CheckpointError(f"{ckpt / 'state' / '.metadata'}: a shard path {rel!r} outside the folder")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in need.items():
        shard = ckpt / "state" / rel
        have = shard.stat().st_size if shard.is_file() else -1
        if have < size:
            what = "missing" if have < 0 else f"truncated ({have} bytes, the metadata needs {size})"
            raise CheckpointError(f"{shard}: {what}")
    for rng in sorted(ckpt.glob("rng_rank*.pt")):
        try:
            r = torch.load(rng, weights_only=True)
            ok = isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) and "python" in r
        except Exception as e:  # garbage bytes: torch raises several types
            raise CheckpointError(f"{rng}: unreadable ({type(e).__name__}: {e})") from None
        if not ok:
            raise CheckpointError(f"{rng}: not an RNG state")
    return state


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


def save_checkpoint(
    run_dir: Path, step: int, policy, processor, optimizer, teacher, state: dict, keep_last: int,
    hf_dtype: str | None = None,
) -> Path:  # fmt: skip
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
    for p in [
        *Path(run_dir).glob(".checkpoint-*.tmp"),
        *Path(run_dir).glob(".checkpoint-*.old"),
    ]:  # killed saves
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in complete_checkpoints(run_dir)[:-keep_last]:
            (p / COMPLETE).unlink(missing_ok=True)  # never leave a half-deleted folder marked complete
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, policy, optimizer, teacher) -> dict:
    """Load weights, optimizer, teacher snapshot and RNG into the given (possibly sharded) objects; return the
    trainer state. Works on a different number of ranks than the checkpoint was written with."""
    verify_checkpoint(ckpt)
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    if _has_snapshot(policy, teacher):
        state["teacher"] = get_model_state_dict(teacher)
    _dcp_load(state, ckpt / "state")
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    if _has_snapshot(policy, teacher):
        set_model_state_dict(teacher, state["teacher"])
    rng = ckpt / f"rng_rank{dist.rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def resume_latest(run_dir: Path, policy, optimizer, teacher) -> tuple[Path | None, dict]:
    """Load the newest intact checkpoint; a damaged newer one is passed over with a warning saying which and why.
    A checkpoint that would run code (`UnsafeCheckpointError`) stops the resume: the run directory was altered."""
    damaged = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            return ckpt, load_checkpoint(ckpt, policy, optimizer, teacher)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint %s: %s", ckpt.name, e)
            damaged.append(str(e))
    if damaged:  # never start over silently (and the weights may hold part of a failed load)
        raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from: " + "; ".join(damaged))
    return None, {}


def load_policy_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The policy's full state dict from a checkpoint, in one process (for export and comparisons)."""
    verify_checkpoint(ckpt)
    model = _empty_model(Path(ckpt))
    state = {"model": model.state_dict()}
    _dcp_load(state, Path(ckpt) / "state")
    return state["model"]


def _empty_model(ckpt: Path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(ckpt)
    return AutoModelForImageTextToText.from_config(
        config, dtype=getattr(config, "dtype", None) or torch.float32
    )


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint (model + processor) from a training checkpoint."""
    from transformers import AutoProcessor

    ckpt, out = Path(ckpt), Path(out)
    verify_checkpoint(ckpt)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: exists and is not a folder")
    processor = AutoProcessor.from_pretrained(ckpt)
    return write_hf_folder(_empty_model(ckpt), load_policy_weights(ckpt), processor, out)


def write_hf_folder(
    model, state_dict: dict[str, torch.Tensor], processor, out: Path, dtype: str | None = None
) -> Path:
    """A plain Hugging Face model folder at `out`: `model`'s config and generation config, `state_dict` (full,
    unsharded tensors) as safetensors, cast to `dtype` (None: as they are), and the processor (tokenizer, chat
    template, image processor with the run's pixel budget). The one writer behind `hf/` and `mmrlsd export`."""
    from transformers.utils import logging as hf_logging

    if dtype is not None:
        target = getattr(torch, dtype)
        for k in list(state_dict):  # one tensor at a time: the peak stays one full copy of the weights
            v = state_dict[k]
            state_dict[k] = v.to(target) if v.is_floating_point() else v
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
