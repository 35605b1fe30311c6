"""Reading a run directory for the plots: config, metrics, rollout dumps, checkpoints, and the per-token signals.

Nothing here imports torch or matplotlib. The signals are exactly what the update used (written by
`mmrlsd.train.diagnostics.dump_rows`); `signal_values` only re-expresses them around their neutral value:

    signal      shown value          coloured by (0 = neutral)      meaning of the neutral value
    w           w_t                  log w_t = sign(A)·Δ_t          the teacher agrees with the student
    token_adv   Â_t                  Â_t − A                        the token gets GRPO's uniform credit A
    delta       Δ_t                  Δ_t                            log P_T(y_t) = log P_S(y_t)

Colouring log w rather than w makes w = 2 and w = 1/2 equally strong; Â_t − A = A·λ·(clip(w_t) − 1) is the
credit RLSD moves onto (positive) or off (negative) the token relative to GRPO.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mmrlsd.log import read_dump, read_metrics

SIGNALS = {
    "w": "w_t = exp(sign(A)·Δ_t), coloured by log w_t",
    "token_adv": "Â_t, coloured by Â_t − A (credit moved relative to GRPO)",
    "delta": "Δ_t = log P_T(y_t) − log P_S(y_t)",
}


@dataclass
class Run:
    """A training run directory, read once: `config` is the YAML as a dict, `metrics` one dict per step."""

    path: Path
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    """Steps with a rollout dump, ascending."""
    checkpoints: dict[int, Path] = field(default_factory=dict)
    """Complete checkpoints by step."""

    def rows(self, step: int) -> list[dict]:
        """The rollout dump of `step`: one dict per response (see `dump_rows`)."""
        if step not in self.steps:
            raise KeyError(f"{self.path}: no rollout dump for step {step}; dumped steps: {self.steps}")
        return read_dump(self.path, step)

    def row(self, step: int, sample: int) -> dict:
        rows = self.rows(step)
        for r in rows:
            if r.get("sample") == sample:
                return r
        raise KeyError(
            f"{self.path}: step {step} has no sample {sample}; samples: {[r['sample'] for r in rows]}"
        )

    @property
    def eps_w(self) -> float:
        return float(self.config.get("algo", {}).get("eps_w", 0.2))


def open_run(path: str | Path) -> Run:
    """Read `config.yaml`, `metrics.jsonl`, the dumped steps and the complete checkpoints of a run directory.
    A checkpoint folder `RUN/checkpoint-N` opens its run with that checkpoint as the only one (the overlay uses
    it)."""
    import yaml

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: run directory not found")
    suffix = p.name.split("-", 1)[1] if p.name.startswith("checkpoint-") else ""
    if suffix.isdigit() and (p / "COMPLETE").is_file():
        run = open_run(p.parent)
        run.checkpoints = {int(suffix): p}
        return run
    cfg_path = p / "config.yaml"
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{cfg_path}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(config, (dict, type(None))):
        raise ValueError(f"{cfg_path}: not a mapping")
    metrics = read_metrics(p) if (p / "metrics.jsonl").is_file() else []
    steps = sorted(int(f.stem.split("_")[1]) for f in (p / "rollouts").glob("step_*.jsonl")
                   if f.stem.split("_")[1].isdigit())  # fmt: skip
    ckpts = {}
    for c in p.glob("checkpoint-*"):
        suffix = c.name.split("-", 1)[1]
        if suffix.isdigit() and (c / "COMPLETE").is_file():
            ckpts[int(suffix)] = c
    return Run(p, config or {}, metrics, steps, dict(sorted(ckpts.items())))


def newest_run(root: str | Path = "runs") -> Path:
    """The most recently modified directory under `root` that holds a `metrics.jsonl` (searched two deep)."""
    base = Path(root)
    found = [m.parent for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl") for m in base.glob(pattern)]
    if not found:
        raise FileNotFoundError(f"no run directory (with metrics.jsonl) under {base.resolve()}")
    return max(found, key=lambda d: (d / "metrics.jsonl").stat().st_mtime)


def resolve_run_dir(value: str | Path) -> Path:
    """A run directory given relative to where the user is, found from where the code runs: tried against the
    current directory, the directory the process was launched from (`$PWD`: a Jupyter kernel starts in the
    notebook's folder, the server keeps the launch directory there) and each folder above the current one (the
    repository root for `notebooks/`). Absolute paths are returned as they are."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    bases = (
        [Path.cwd()] + ([Path(os.environ["PWD"])] if os.environ.get("PWD") else []) + list(Path.cwd().parents)
    )
    for base in bases:
        if (base / p).is_dir():
            return base / p
    tried = ", ".join(str(b / p) for b in bases[:3])
    raise FileNotFoundError(f"run directory {str(value)!r} not found (tried {tried} and the folders above)")


def default_run_dir(root: str | Path | None = None) -> Path:
    """`$MMRLSD_RUN_DIR` when set (a relative value is found by `resolve_run_dir`: from the repository root, or
    where Jupyter was launched), else the newest run under `root` (default: `runs/`, or `../runs/` when run from
    `notebooks/`)."""
    env = os.environ.get("MMRLSD_RUN_DIR")
    if env:
        return resolve_run_dir(env)
    if root is None:
        root = next((r for r in (Path("runs"), Path("..") / "runs") if r.is_dir()), Path("runs"))
    return newest_run(root)


def checkpoint_for(run: Run, step: int) -> tuple[int, Path]:
    """The checkpoint closest to the weights that sampled step `step` (those after step `step − 1`):
    the newest one at or before `step − 1`, else the oldest one after it."""
    if not run.checkpoints:
        raise FileNotFoundError(f"{run.path}: no complete checkpoint-N folder (needed for the image overlay)")
    before = [s for s in run.checkpoints if s <= step - 1]
    s = max(before) if before else min(run.checkpoints)
    return s, run.checkpoints[s]


def image_paths(run: Run, row: dict) -> list[Path]:
    """The row's images as existing paths: absolute as dumped, else relative to the working directory or the
    run directory (a missing file raises, naming what was tried)."""
    out = []
    for img in row["images"]:
        tries = [Path(img)] if Path(img).is_absolute() else [Path.cwd() / img, run.path / img]
        hit = next((t for t in tries if t.is_file()), None)
        if hit is None:
            raise FileNotFoundError(
                f"image {img!r} of {row['id']} not found (tried {', '.join(map(str, tries))})"
            )
        out.append(hit)
    return out


def default_step(run: Run) -> int:
    """The newest dumped step that has a response with an image (else the newest step)."""
    if not run.steps:
        raise FileNotFoundError(f"{run.path}: no rollout dumps under rollouts/")
    for step in reversed(run.steps):
        if any(r["images"] for r in run.rows(step)):
            return step
    return run.steps[-1]


def default_sample(rows: list[dict]) -> int:
    """The first sample with an image and a non-zero advantage (where a weight can act), else the first one."""
    for need_adv in (True, False):
        for r in rows:
            if r["images"] and (r["adv"] != 0 or not need_adv):
                return r["sample"]
    return rows[0]["sample"]


def signal_values(row: dict, signal: str) -> tuple[list[float], list[float], float]:
    """`(shown, centred, neutral)` per token: the value to print, the value to colour (0 = neutral, see the
    module docstring) and the neutral value of `shown`.

    >>> signal_values({"w": [2.0, 0.5], "adv": 1.0}, "w")[1]
    [0.6931471805599453, -0.6931471805599453]
    >>> signal_values({"token_adv": [1.1, 0.9], "adv": 1.0}, "token_adv")[1]
    [0.10000000000000009, -0.09999999999999998]
    """
    if signal not in SIGNALS:
        raise KeyError(f"unknown signal {signal!r}; known: {', '.join(SIGNALS)}")
    shown = [float(v) for v in row[signal]]
    if signal == "w":
        return shown, [math.log(max(v, 1e-30)) for v in shown], 1.0
    if signal == "token_adv":
        return shown, [v - row["adv"] for v in shown], row["adv"]
    return shown, shown, 0.0


def top_tokens(row: dict, signal: str = "w", k: int = 5) -> list[int]:
    """Indices of the `k` tokens furthest from the neutral value of `signal`, in text order."""
    _, centred, _ = signal_values(row, signal)
    order = sorted(range(len(centred)), key=lambda i: -abs(centred[i]))
    return sorted(order[:k])


def token_label(tok: str) -> str:
    """A token made printable: newline -> ↵, tab -> →, other control characters -> \\xNN.

    >>> token_label("a\\nb\\x1f")
    'a↵b\\\\x1f'
    """
    out = []
    for ch in tok:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
