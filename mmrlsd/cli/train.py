"""`mmrlsd train`: RLSD (or a baseline) from a YAML config."""

from __future__ import annotations

import argparse

HELP = "train with RLSD (or a baseline) from a YAML config"
EXAMPLES = """examples:
  mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny      # the built-in tiny default, CPU only
  mmrlsd train configs/qwen2vl_7b.yaml trainer.total_steps=3 algo.lam0=0
  mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny --resume
  torchrun --nproc_per_node 8 -m mmrlsd train configs/qwen3vl_8b.yaml
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.total_steps=3 algo.lam0=0")
    p.add_argument("--output-dir", help="run directory (default: trainer.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in the output directory first"
    )
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume even if the config changes keys that make it a different experiment")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mmrlsd.config import load_config
    from mmrlsd.train.loop import train

    cfg = load_config(args.config, args.overrides)
    # ends by printing the run's summary (validation accuracy, skips, time, next commands)
    train(cfg, args.output_dir, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
          allow_config_change=args.allow_config_change)  # fmt: skip
    return 0
