"""`mmrlsd validate`: load a config with its loader (training, or `mmrlsd sft` for a file with an `sft` section)
and report, without running anything."""

from __future__ import annotations

import argparse
import sys

HELP = "check a config (and its templates, data files, model directory) without running it"
EXAMPLES = """example:
  mmrlsd validate configs/qwen2vl_7b.yaml
  mmrlsd validate configs/tiny_cpu.yaml algo.lam0=0
  mmrlsd validate configs/qwen2vl_7b.yaml --no-data-check   # on a machine other than the one that trains
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument(
        "--no-data-check",
        action="store_true",
        help="report missing local data files as warnings, not errors (the data lives on another machine)",
    )


def _is_sft(path: str) -> bool:
    """Whether the file is an `mmrlsd sft` recipe (a top-level `sft` section); unreadable files are not."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return False  # the training loader reports the problem, naming the file
    return isinstance(data, dict) and "sft" in data


def run(args: argparse.Namespace) -> int:
    from mmrlsd.config import load_config, to_dict
    from mmrlsd.train import preflight

    if _is_sft(args.config):
        from mmrlsd.recipes.sft import load_sft_config

        cfg = load_sft_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        # registry names, reward, templates, data files, model directory: what train checks before loading a model
        missing = preflight.check(cfg, data=False)
        for line in missing:
            print(f"{'warning' if args.no_data_check else 'error'}: {line}", file=sys.stderr)
        if missing and not args.no_data_check:
            print(f"{args.config}: {len(missing)} data file(s) missing; train would stop here "
                  "(--no-data-check to validate the rest only)", file=sys.stderr)  # fmt: skip
            return 2
    print(f"{args.config}: OK ({sum(len(v) for v in to_dict(cfg).values())} keys)")
    return 0
