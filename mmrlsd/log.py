"""Run-directory writers: `metrics.jsonl` (one object per step) and `rollouts/step_NNNNNN.jsonl` dumps.

Each metrics line is appended with one `os.write` on an `O_APPEND` descriptor, and dumps are written to a
temporary file and renamed, so a crash or a full disk can at worst leave a torn *last* line: readers drop it with
a warning. Any other line that is not a JSON object is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from mmrlsd.errors import MmrlsdError

log = logging.getLogger("mmrlsd.log")


class RunFileError(MmrlsdError):
    """A run-directory file that cannot be read (a damaged line that is not the last one)."""


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL run file; a torn last line (an interrupted write) is dropped with a warning."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunFileError(f"{path}: cannot be read ({e.strerror})") from None
    lines = data.split(b"\n")
    rows = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            if i >= len(lines) - 1 and all(not x.strip() for x in lines[i:]):  # the last line: a torn write
                log.warning("%s:%d: dropping a torn last line (%s)", path, i, str(e)[:80])
                break
            raise RunFileError(
                f"{path}:{i}: not a JSON object ({str(e)[:80]}); delete or repair the line"
            ) from None
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace `path` with these rows at once (a temporary file, fsynced, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null means "not finite"
    return v


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if (
            resume_step is not None and self.path.exists()
        ):  # drop lines written after the checkpoint we resume
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            write_jsonl(self.path, kept)
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        line = (json.dumps({k: _clean(v) for k, v in record.items()}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:  # one write call for the line; the loop only covers a short write
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def write_dump(run_dir: Path, step: int, rows: list[dict]) -> Path:
    out = Path(run_dir) / "rollouts" / f"step_{step:06d}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    return out


def read_dump(run_dir: str | Path, step: int) -> list[dict]:
    return read_jsonl(Path(run_dir) / "rollouts" / f"step_{step:06d}.jsonl")
