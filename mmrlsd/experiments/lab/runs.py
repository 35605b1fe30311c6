"""The comparison's runs: one `mmrlsd train` process per (method, seed), a few at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = {
    "grpo": "configs/grpo_tiny_cpu.yaml",
    "rlsd": "configs/tiny_cpu.yaml",
    "opsd": "configs/opsd_tiny_cpu.yaml",
    "sdpo": "configs/sdpo_tiny_cpu.yaml",
}
"""Method -> its config; they differ only where the method does (see the configs' headers)."""


def run_dir_of(runs: Path, method: str, seed: int) -> Path:
    return runs / f"{method}-seed{seed}"


def train_command(
    method: str, seed: int, runs: Path, overrides: Sequence[str], config: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The `mmrlsd train` command line of one run; `extra` (the method's own overrides) comes last and wins."""
    return mmrlsd_train(
        config or METHODS[method],
        run_dir_of(runs, method, seed),
        [f"trainer.seed={seed}", *overrides, *extra],
    )


def mmrlsd_train(config: str, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """`python -m mmrlsd train CONFIG --output-dir RUN_DIR --overwrite --no-progress OVERRIDES...` in this
    interpreter (a lab run regenerates its run directory)."""
    return [sys.executable, "-m", "mmrlsd", "train", config, "--output-dir", str(run_dir), "--overwrite",
            "--no-progress", *overrides]  # fmt: skip


def run_all(
    methods: Sequence[str], seeds: Sequence[int], runs: Path, overrides: Sequence[str], jobs: int = 2,
    configs: dict[str, str] | None = None, extra: dict[str, Sequence[str]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Run every (method, seed), `jobs` processes at a time (interleaved by seed, so each method sees the same
    machine load on average); returns wall seconds per run. A failed run raises after all have finished.
    `configs` / `extra`: a method's config and its own overrides, instead of `METHODS[method]` and none."""
    runs.mkdir(parents=True, exist_ok=True)
    order = [(m, s) for s in seeds for m in methods]
    walls: dict[str, float] = {}
    failed: list[str] = []

    def one(ms: tuple[str, int]) -> None:
        m, s = ms
        cmd = train_command(m, s, runs, overrides, (configs or {}).get(m), (extra or {}).get(m, ()))
        log = run_dir_of(runs, m, s).with_suffix(".log")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.call(
                cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}
            )
        walls[f"{m}-seed{s}"] = time.perf_counter() - t0
        print(f"{m} seed {s}: rc={rc} in {walls[f'{m}-seed{s}']:.0f}s ({log})", flush=True)
        if rc != 0:
            failed.append(f"{m}-seed{s} (see {log})")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, order))
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}")
    return walls
