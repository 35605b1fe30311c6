"""Run-directory guards, checked before a model is loaded.

* one writer: `RUN/.lock` is held with `fcntl.flock` for the whole run, so a second trainer on the same directory
  stops with an error naming the first one's pid (the kernel drops the lock when a process dies, so a crash never
  leaves a stale lock behind);
* no silent mixing: a directory that already holds a run is refused unless `--resume` continues it or
  `--overwrite` clears it; a non-empty folder that is not a run is never cleared;
* `--resume` of a different experiment is refused: the saved `config.yaml` is compared with the new config and
  every changed key that alters the training trajectory is listed (`--allow-config-change` accepts them).
  Changing `HARMLESS` keys (length, cadence of logging, validation and checkpoints, trackers, paths, threads,
  sharding) is always allowed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

import yaml

from mmrlsd.config import Config, to_dict
from mmrlsd.errors import MmrlsdError

log = logging.getLogger("mmrlsd.train")

LOCK = ".lock"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoint-*", ".checkpoint-*", "rollouts", "skipped.jsonl")
HARMLESS = {
    "trainer.total_steps", "trainer.save_every", "trainer.keep_last", "trainer.val_every", "trainer.dump_every",
    "trainer.dump_max", "trainer.output_dir", "trainer.threads", "trainer.max_bad_steps", "trainer.device",
    "data.val_files", "data.val_split", "data.max_val_items", "rollout.val_temperature", "rollout.val_n",
    "rollout.val_top_p", "rollout.val_top_k", "rollout.val_presence_penalty",
    "trainer.logger", "trainer.project_name", "trainer.experiment_name",
    "dist.fsdp", "dist.backend", "dist.teacher_offload",
    "trainer.save_hf",
}  # fmt: skip
HARMLESS_SECTIONS = ("log.", "logging.", "tracker.", "trackers.")


class RunDirError(MmrlsdError):
    """A run directory that cannot be used as asked (locked, holds another run, unwritable, config changed)."""


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # before torch.distributed is initialised


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)


def _is_run(run_dir: Path) -> bool:
    return any(next(run_dir.glob(pattern), None) is not None for pattern in RUN_MARKERS)


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` exclusively (a no-op on ranks other than 0)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        if not _is_main():
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                f"{self.path.parent}: cannot write to the run directory ({e.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent}: another trainer (pid {holder}) is writing to this run directory; wait for "
                "it to finish or use another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def make_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output-dir {run_dir}: exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--output-dir {run_dir}: cannot create it ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"--output-dir {run_dir}: not writable")


def check_fresh(run_dir: Path, overwrite: bool) -> None:
    """Without --resume: the directory must be empty, or hold a run that --overwrite may clear."""
    if not _is_main():
        return
    entries = _entries(run_dir)
    if not entries:
        return
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not _is_run(run_dir):
        raise RunDirError(f"--output-dir {run_dir}: not empty and not a run directory ({shown}); use a new or "
                          "empty folder")  # fmt: skip
    if not overwrite:
        raise RunDirError(
            f"--output-dir {run_dir}: already holds a run ({shown}); pass --resume to continue it, --overwrite "
            "to delete it and start again, or use another --output-dir"
        )
    log.warning("--overwrite: deleting the previous run in %s", run_dir)
    for name in entries:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """`key: old -> new` for every key that differs and is not harmless (keys only one side knows are ignored:
    a newer or older version of mmrlsd)."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]
            and k not in HARMLESS and not k.startswith(HARMLESS_SECTIONS)]  # fmt: skip


def check_resume_config(run_dir: Path, cfg: Config, allow_change: bool) -> None:
    path = run_dir / "config.yaml"
    if not _is_main() or not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunDirError(f"{path}: the saved config of the run cannot be read ({e})") from None
    if not isinstance(saved, dict):
        raise RunDirError(f"{path}: the saved config of the run is not a mapping")
    changes = config_changes(saved, cfg)
    if not changes:
        return
    listing = "\n  ".join(changes)
    if not allow_change:
        raise RunDirError(
            f"--resume {run_dir}: the config differs from the run's saved {path.name} in keys that make it a "
            f"different experiment:\n  {listing}\nresume with the same config, or pass --allow-config-change"
        )
    log.warning("--allow-config-change: resuming %s with changed keys:\n  %s", run_dir, listing)
