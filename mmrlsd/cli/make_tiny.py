"""`mmrlsd make-tiny`: a tiny random-weight Qwen-VL checkpoint built locally (no download)."""

from __future__ import annotations

import argparse

HELP = "write a tiny random Qwen-VL checkpoint (no download)"
EXAMPLES = """example:
  mmrlsd make-tiny --arch qwen3_vl --out /tmp/tiny3
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from mmrlsd.model.tiny import make_tiny

    print(make_tiny(args.arch, args.out, seed=args.seed))
    return 0
