"""The default run's acceptance check: `mmrlsd train configs/tiny_cpu.yaml` timed end to end and judged."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from mmrlsd.experiments.lab.runs import mmrlsd_train
from mmrlsd.experiments.lab.stats import read_run
from mmrlsd.log import read_metrics

FLOORS = {"wall_s": 600.0, "sample_accuracy_gain": 0.10, "accuracy_gain": 0.05, "val_items": 500}
"""The tiny lab's bar for `mmrlsd train configs/tiny_cpu.yaml`: at most 10 minutes, val/sample_accuracy +0.10 and
val/accuracy +0.05 from the first validation to the last, on at least 500 validation items."""


def check_default(run_dir: Path, out: Path | None, config: str = "configs/tiny_cpu.yaml",
                  overrides: Sequence[str] = ()) -> dict:  # fmt: skip
    """Run `mmrlsd train CONFIG --output-dir RUN_DIR` in a fresh process, time it end to end (imports included),
    and judge it against `FLOORS`; writes the verdict as JSON to `out` when given."""
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    subprocess.run(
        mmrlsd_train(config, run_dir, overrides), check=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    wall = time.perf_counter() - t0
    run = read_run(run_dir)
    rows = read_metrics(run_dir)
    n_val = int(next(r["val/n"] for r in rows if "val/n" in r))
    acc, sacc = run["val/accuracy"], run["val/sample_accuracy"]
    res = {
        "command": " ".join(["mmrlsd train", config, "--output-dir", str(run_dir), *overrides]),
        "wall_s": round(wall, 1),
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "step_s_median": round(run["time/step_s_median"], 3),
        "steps": len(run["steps"]),
        "val_items": n_val,
        "val_steps": run["val_steps"],
        "val_accuracy": [round(x, 4) for x in acc],
        "val_sample_accuracy": [round(x, 4) for x in sacc],
        "accuracy_gain": round(acc[-1] - acc[0], 4),
        "sample_accuracy_gain": round(sacc[-1] - sacc[0], 4),
        "floors": FLOORS,
    }
    res["passed"] = (wall <= FLOORS["wall_s"] and res["sample_accuracy_gain"] >= FLOORS["sample_accuracy_gain"]
                     and res["accuracy_gain"] >= FLOORS["accuracy_gain"] and n_val >= FLOORS["val_items"])  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
    return res
