"""`mmrlsd validate`: load a config with the training loader and report, without running anything."""

from __future__ import annotations

import argparse

HELP = "check a config without running it"
EXAMPLES = """example:
  mmrlsd validate configs/qwen2vl_7b.yaml
  mmrlsd validate configs/tiny_cpu.yaml algo.lam0=0
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides")


def run(args: argparse.Namespace) -> int:
    from mmrlsd.config import load_config, to_dict
    from mmrlsd.train.choices import check_registered

    cfg = check_registered(load_config(args.config, args.overrides), str(args.config))
    print(f"{args.config}: OK ({sum(len(v) for v in to_dict(cfg).values())} keys)")
    return 0
