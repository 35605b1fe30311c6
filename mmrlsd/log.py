"""Run-directory writers: `metrics.jsonl` (one object per step) and `rollouts/step_NNNNNN.jsonl` dumps."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null means "not finite"
    return v


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines written after the checkpoint we resume
            kept = [line for line in self.path.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            self.path.write_text("".join(k + "\n" for k in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            f.flush()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_dump(run_dir: Path, step: int, rows: list[dict]) -> Path:
    out = Path(run_dir) / "rollouts" / f"step_{step:06d}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out


def read_dump(run_dir: str | Path, step: int) -> list[dict]:
    path = Path(run_dir) / "rollouts" / f"step_{step:06d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
