"""Experiment trackers, through their own libraries: `trainer.logger: [console, tensorboard, wandb, mlflow]`.

`metrics.jsonl` is always written; each tracker gets the same scalars under the same names (`loss`,
`reward/mean`, `val/accuracy`, ...; non-finite values are left out) with the step number, and the run's resolved
config once at the start. Only rank 0 logs.

    console       one line per step on the `mmrlsd.train` logger (loss, reward, accuracy, λ, length, time, val/*)
    tensorboard   `RUN/tensorboard/` (torch's SummaryWriter; needs `pip install 'mmrlsd[tensorboard]'`); the
                  config as text; `--resume` purges events after the checkpoint's step
    wandb         `wandb.init(project=trainer.project_name, name=trainer.experiment_name, config=...)`; files under
                  `$WANDB_DIR`, else `RUN/`; `WANDB_MODE=offline` and the other WANDB_* variables work as usual;
                  `--resume` continues the same W&B run
    mlflow        experiment trainer.project_name, run trainer.experiment_name; `$MLFLOW_TRACKING_URI`, else a
                  file store in `RUN/mlruns`; the config as flattened params and as `config.yaml`; `--resume`
                  continues the same MLflow run

The experiment name defaults to the run directory's name. Tracker run ids live in `RUN/trackers.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import yaml

log = logging.getLogger("mmrlsd.train")

CONSOLE_KEYS = ("loss", "reward/mean", "reward/accuracy", "rlsd/lam", "response/length_mean", "time/step_s")


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, names unchanged, without `step`."""
    out = {}
    for k, v in metrics.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class _Console:
    def __init__(self, total_steps: int):
        self.total = total_steps

    def log(self, values: dict[str, float], step: int) -> None:
        keys = [k for k in CONSOLE_KEYS if k in values] + sorted(k for k in values if k.startswith("val/"))
        log.info("step %d/%d  %s", step, self.total, "  ".join(f"{k} {values[k]:.4g}" for k in keys))

    def close(self, failed: bool = False) -> None:
        pass


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)  # fmt: skip
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # a Markdown code block

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, project: str, name: str, run_id: str | None):
        import wandb

        kw = {} if os.environ.get("WANDB_DIR") else {"dir": str(run_dir)}
        self.run = wandb.init(project=project, name=name, config=config, id=run_id,
                              resume="allow" if run_id else None, **kw)  # fmt: skip
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    def __init__(self, run_dir: Path, config: dict, project: str, name: str, run_id: str | None):
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3 wants an opt-in for its (still supported) local file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        if run_id is None:
            mlflow.set_experiment(project)
            self.run = mlflow.start_run(run_name=name)
            params = _flatten(config)
            mlflow.log_params(params)
            mlflow.log_dict(config, "config.yaml")
        else:
            self.run = mlflow.start_run(run_id=run_id)
        self.id = self.run.info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class Trackers:
    """The trackers of `trainer.logger` for one run (rank 0 only)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, project: str, name: str,
                 total_steps: int, resume_step: int | None = None):  # fmt: skip
        ids_path = run_dir / "trackers.json"
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        name = name or run_dir.resolve().name
        self.trackers = []
        for n in names:
            if n == "console":
                self.trackers.append(_Console(total_steps))
            elif n == "tensorboard":
                self.trackers.append(_TensorBoard(run_dir, config, resume_step))
            elif n == "wandb":
                self.trackers.append(_WandB(run_dir, config, project, name, ids.get("wandb")))
            elif n == "mlflow":
                self.trackers.append(_MLflow(run_dir, config, project, name, ids.get("mlflow")))
            else:
                raise ValueError(f"unknown tracker {n!r}")
        new_ids = {n: t.id for n, t in zip(names, self.trackers) if hasattr(t, "id")}
        if new_ids:
            ids_path.write_text(json.dumps(new_ids, indent=1) + "\n")

    def log(self, metrics: dict) -> None:
        values = scalars(metrics)
        for t in self.trackers:
            t.log(values, int(metrics["step"]))

    def close(self, failed: bool = False) -> None:
        for t in self.trackers:
            t.close(failed)
