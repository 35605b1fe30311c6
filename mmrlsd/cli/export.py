"""`mmrlsd export`: a plain Hugging Face model folder from a training checkpoint."""

from __future__ import annotations

import argparse

HELP = "write a plain Hugging Face model folder from a training checkpoint"
EXAMPLES = """example:
  mmrlsd export runs/tiny/checkpoint-100 --out models/tiny
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="RUN_DIR/checkpoint-N")
    p.add_argument("--out", required=True, help="output folder (loadable by from_pretrained and vLLM)")


def run(args: argparse.Namespace) -> int:
    from mmrlsd.train.checkpoint import export

    print(export(args.checkpoint, args.out))
    return 0
