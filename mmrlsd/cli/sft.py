"""`mmrlsd sft`: supervised fine-tuning on reference solutions (the recipe in `mmrlsd.recipes.sft`)."""

from __future__ import annotations

import argparse

HELP = "supervised fine-tuning on reference solutions (builds the tiny-lab model)"
EXAMPLES = """example:
  mmrlsd sft configs/tiny_sft.yaml --output-dir runs/sft
  mmrlsd sft configs/tiny_sft.yaml trainer.total_steps=50 optim.lr=1e-4
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (e.g. configs/tiny_sft.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.total_steps=50 optim.lr=1e-4")
    p.add_argument("--output-dir", help="run directory (default: trainer.output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mmrlsd.recipes.sft import load_sft_config, sft

    cfg = load_sft_config(args.config, args.overrides)
    out = sft(cfg, args.output_dir or cfg.trainer.output_dir, progress=not args.no_progress)
    print(f"model: {out}")
    return 0
