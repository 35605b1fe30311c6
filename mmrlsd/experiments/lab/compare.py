"""A comparison: run every method for every seed on one budget, summarise, write results.json, curves and
tables; or add methods to an earlier comparison."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from mmrlsd.experiments.lab.report import plot, table_markdown
from mmrlsd.experiments.lab.runs import METHODS, run_all
from mmrlsd.experiments.lab.stats import summarize


def budget_text(config: str, overrides: Sequence[str]) -> str:
    """`100 steps x 16 prompts x 8 samples, lr 0.0001, val every 20 steps` from a method's config + overrides."""
    from mmrlsd.config import load_config

    c = load_config(config, list(overrides))
    return (f"{c.trainer.total_steps} steps x {c.rollout.batch_size} prompts x {c.rollout.n} samples, "
            f"lr {c.optim.lr:g}, val every {c.trainer.val_every} steps")  # fmt: skip


def compare(
    out: Path, runs: Path, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], jobs: int,
    configs: dict[str, str] | None = None, skip_runs: bool = False, add: bool = False, command: str = "",
) -> dict:  # fmt: skip
    """Run (unless `skip_runs`) and summarise the comparison; writes results.json, curves.png, table.md.

    `add`: run only `methods` and add them to the existing `out/results.json` (same seeds and overrides, the
    earlier methods' run directories still under `runs`); how each batch of runs was launched and timed is kept.
    `command`: the command line recorded in results.json."""
    if add:
        return add_methods(out, runs, methods, seeds, overrides, jobs, configs, command)
    t0 = time.perf_counter()
    walls = {} if skip_runs else run_all(methods, seeds, runs, overrides, jobs, configs)
    previous = (
        json.loads((out / "results.json").read_text())
        if skip_runs and (out / "results.json").is_file()
        else {}
    )
    results = {
        "command": command,
        "methods_configs": {m: (configs or {}).get(m, METHODS[m]) for m in methods},
        "seeds": list(seeds),
        "overrides": list(overrides),
        "budget_text": budget_text(configs.get(methods[0]) if configs else METHODS[methods[0]], overrides),
        "jobs": jobs,
        "wall_s": round(time.perf_counter() - t0, 1),
        "run_wall_s": {k: round(v, 1) for k, v in walls.items()},
        "load_avg_at_end": list(os.getloadavg()),
        "methods": summarize(runs, methods, seeds),
    }
    if previous:  # re-summarising existing runs: keep how and how long they ran
        keep = ("command", "jobs", "wall_s", "run_wall_s", "load_avg_at_end", "added")
        results.update({k: previous[k] for k in keep if k in previous})
    return write_results(out, results)


def write_results(out: Path, results: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table_markdown(results))
    plot(results, out / "curves.png")
    return results


def add_methods(
    out: Path, runs: Path, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], jobs: int,
    configs: dict[str, str] | None = None, command: str = "",
) -> dict:  # fmt: skip
    """`compare(..., add=True)`: see there."""
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --add needs an earlier comparison to add to")
    prev = json.loads(path.read_text())
    if list(seeds) != prev["seeds"] or list(overrides) != prev["overrides"]:
        raise ValueError(f"{path}: --add must use the earlier seeds {prev['seeds']} and overrides "
                         f"{prev['overrides']} (the same budget), got {list(seeds)} and {list(overrides)}")  # fmt: skip
    t0 = time.perf_counter()
    walls = run_all(methods, seeds, runs, overrides, jobs, configs)
    every = list(prev["methods"]) + [m for m in methods if m not in prev["methods"]]
    added = {"command": command, "methods": list(methods),
             "jobs": jobs, "wall_s": round(time.perf_counter() - t0, 1), "load_avg_at_end": list(os.getloadavg())}  # fmt: skip
    results = {
        **prev,
        "methods_configs": {
            **prev["methods_configs"],
            **{m: (configs or {}).get(m, METHODS[m]) for m in methods},
        },
        "run_wall_s": {**prev["run_wall_s"], **{k: round(v, 1) for k, v in walls.items()}},
        "added": [*prev.get("added", []), added],
        "methods": summarize(runs, every, seeds),
    }
    return write_results(out, results)
