"""The end-of-run summary of `mmrlsd train`: validation accuracy first -> last, skipped records, wall time, the
run directory, its newest checkpoint and the commands to run next. Printed at the end and saved as
`RUN/summary.json`:

    {"run_dir": "runs/tiny", "steps": 100, "total_steps": 100, "finished": true, "wall_time_s": 151.2,
     "val_accuracy": {"first": {"step": 0, "value": 0.498}, "last": {"step": 100, "value": 0.602}},
     "skipped_records": 0, "skip_reasons": {}, "checkpoint": "runs/tiny/checkpoint-100",
     "hf_model": "runs/tiny/checkpoint-100/hf", "next": ["mmrlsd viz ...", "mmrlsd eval ...", "mmrlsd export ..."]}
"""

from __future__ import annotations

import json
from pathlib import Path

from mmrlsd.log import read_metrics


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_summary(run_dir: Path, *, total_steps: int, wall_time_s: float, skip_counts: dict[str, int],
                n_skipped: int, checkpoint: Path | None) -> dict:  # fmt: skip
    """The summary of the run in `run_dir` (read from its `metrics.jsonl`)."""
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    val = [(m["step"], m["val/accuracy"]) for m in metrics if m.get("val/accuracy") is not None]
    steps = max((m["step"] for m in metrics), default=0)
    hf = (
        checkpoint / "hf"
        if checkpoint is not None and (checkpoint / "hf" / "config.json").is_file()
        else None
    )
    nxt = [f"mmrlsd viz {run_dir} --out {run_dir / 'view.html'}"]
    if checkpoint is not None:
        nxt.append(f"mmrlsd eval --bench mathvista --model {checkpoint} --output-dir {run_dir / 'eval'}")
        nxt.append(f"mmrlsd export {checkpoint} --out {run_dir / 'model'}")
    return {
        "run_dir": str(run_dir), "steps": steps, "total_steps": total_steps, "finished": steps >= total_steps,
        "wall_time_s": round(wall_time_s, 3),
        "val_accuracy": {"first": {"step": val[0][0], "value": val[0][1]},
                         "last": {"step": val[-1][0], "value": val[-1][1]}} if val else None,
        "skipped_records": n_skipped, "skip_reasons": dict(skip_counts),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "hf_model": str(hf) if hf is not None else None, "next": nxt,
    }  # fmt: skip


def format_summary(s: dict) -> str:
    """The summary as the lines printed at the end of `mmrlsd train`."""
    state = "finished" if s["finished"] else "stopped"
    lines = [
        f"run {state}: {s['run_dir']} ({s['steps']}/{s['total_steps']} steps, {_fmt_time(s['wall_time_s'])})"
    ]
    v = s["val_accuracy"]
    if v:
        first, last = v["first"], v["last"]
        lines.append(f"validation accuracy: {first['value']:.3f} (step {first['step']}) -> "
                     f"{last['value']:.3f} (step {last['step']})")  # fmt: skip
    reasons = ", ".join(f"{k}: {n}" for k, n in s["skip_reasons"].items())
    lines.append(f"skipped records: {s['skipped_records']}" + (f" ({reasons})" if reasons else ""))
    if s["checkpoint"]:
        hf = f" (Hugging Face folder: {s['hf_model']})" if s["hf_model"] else ""
        lines.append(f"checkpoint: {s['checkpoint']}{hf}")
    lines.append("next:")
    lines += [f"  {cmd}" for cmd in s["next"]]
    lines.append(f"summary: {Path(s['run_dir']) / 'summary.json'}")
    return "\n".join(lines)


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path
