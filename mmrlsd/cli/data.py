"""`mmrlsd data ...`: data utilities (today: `synth`, the synthetic visual-reasoning data set)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "data utilities"
EXAMPLES = """examples:
  mmrlsd data synth --out data/synth --n 2000 --seed 0
  mmrlsd data synth --out data/synth_count --n 5000 --families count_color,count_shape --level 1
"""


class Synth:
    """`mmrlsd data synth`."""

    HELP = "write the synthetic visual-reasoning data set"
    EXAMPLES = EXAMPLES

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from mmrlsd.data.synth import FAMILIES, LEVELS, LONG_FAMILIES  # PIL only, no torch

        p.add_argument("--out", required=True, type=Path, help="output directory")
        p.add_argument("--n", type=int, default=2000, help="number of train records (default 2000)")
        p.add_argument("--n-val", type=int, default=512, help="number of val records (default 512)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument(
            "--families",
            default=None,
            help=f"comma-separated families (default: {','.join(FAMILIES)}; long, by name only: "
            f"{','.join(LONG_FAMILIES)})",
        )
        p.add_argument(
            "--level", type=int, choices=LEVELS, default=None, help="fixed difficulty (default: mixed)"
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Write the dataset and print one summary line; 2 on an unknown family."""
        from mmrlsd.data.synth import write_dataset

        try:
            meta = write_dataset(args.out, args.n, args.n_val, args.seed, args.families, args.level)
        except KeyError as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            return 2
        n_train, n_val = sum(meta["counts"]["train"].values()), sum(meta["counts"]["val"].values())
        print(f"wrote {n_train} train + {n_val} val records ({len(meta['families'])} families) to {args.out}")
        return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mmrlsd.cli import attach

    sub = p.add_subparsers(dest="data_command", required=True)
    attach(sub, "synth", Synth)


def run(args: argparse.Namespace) -> int:  # only reached without a subcommand, which argparse refuses
    return 2
