"""`mmrlsd perf`: arguments and dispatch, without importing torch (the work is in `mmrlsd.experiments.perf`).

The named settings `cpu` and `gpu` ship with the package (`mmrlsd/experiments/perf_configs/<name>.yaml`); any
other value is a YAML path. The `trl` variant needs TRL: `pip install 'mmrlsd[perf]'` (it is reported as failed,
the other variants still run, when TRL is missing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "benchmark the RLSD step against GRPO, the naive path and TRL"
EXAMPLES = """examples:
  mmrlsd perf --config cpu --out eval/results/perf/            # tiny model on CPU: naive, GRPO, RLSD, TRL
  mmrlsd perf --config gpu --out eval/results/perf/            # Qwen2.5-VL-3B shape on one GPU
  mmrlsd perf --config cpu --set repeats=1 --set variants=[naive,rlsd]
  mmrlsd perf --config my_perf.yaml                            # your own settings file
  mmrlsd perf --config cpu --rollout-ab 8 --out eval/results/perf/   # rollout only: generate vs the other decodes
"""


def resolve_config(name: str) -> Path:
    """`cpu`/`gpu` -> the packaged `perf_configs/<name>.yaml`; anything else is a path."""
    from importlib.resources import files

    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return Path(str(files("mmrlsd.experiments").joinpath("perf_configs", f"{name}.yaml")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="cpu", help="cpu | gpu | a YAML file (default: cpu)")
    parser.add_argument("--out", default="eval/results/perf", help="directory for <YYYY-MM-DD>-<device>.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML scalar/list), repeatable")  # fmt: skip
    parser.add_argument("--rollout-ab", type=int, default=0, metavar="N",
                        help="instead of the steps: the rollout alone, `generate` against the lean decode loop "
                             "(with and without dropping finished rows; the same ids asserted), the graph and "
                             "compiled steps and cascade attention (their agreement with generate recorded), N "
                             "calls each in turn; writes <YYYY-MM-DD>-<device>-rollout-ab.json")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from mmrlsd.experiments.perf import load_perf_config
    from mmrlsd.experiments.perf import run as run_perf

    cfg = load_perf_config(resolve_config(args.config), args.set)
    if args.rollout_ab:
        from mmrlsd.experiments.perf import rollout_ab

        _, path = rollout_ab(cfg, args.rollout_ab, Path(args.out))
        print(f"wrote {path}")
        return 0
    result, path = run_perf(cfg, Path(args.out))
    print(f"wrote {path}")
    return 0 if result.get("errors") in (None, {}) else 1
