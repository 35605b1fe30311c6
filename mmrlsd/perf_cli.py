"""`mmrlsd perf`: arguments and dispatch, without importing torch (the work is in `mmrlsd.perf`).

mmrlsd perf --config cpu --out eval/results/perf/              # eval/perf/cpu.yaml, writes <date>-cpu.json
mmrlsd perf --config gpu --out eval/results/perf/              # eval/perf/gpu.yaml, on one GPU
mmrlsd perf --config eval/perf/cpu.yaml --set repeats=1 --set variants=[naive,rlsd]
mmrlsd perf --config gpu --install-trl --trl-wheels wheels/    # install TRL first (no other package changes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "eval" / "perf"
EXAMPLES = """examples:
  mmrlsd perf --config cpu --out eval/results/perf/            # tiny model on CPU: naive, GRPO, RLSD, TRL
  mmrlsd perf --config gpu --out eval/results/perf/            # Qwen2.5-VL-3B shape on one GPU
  mmrlsd perf --config cpu --set repeats=1 --set variants=[naive,rlsd]
"""


def resolve_config(name: str) -> Path:
    """`cpu`/`gpu` -> `eval/perf/<name>.yaml`; anything else is a path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name}.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="cpu", help="cpu | gpu | a YAML file (default: cpu)")
    parser.add_argument("--out", default="eval/results/perf", help="directory for <YYYY-MM-DD>-<device>.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML scalar/list), repeatable")  # fmt: skip
    parser.add_argument(
        "--install-trl",
        action="store_true",
        help="pip-install the pinned TRL first, refusing if torch/transformers/accelerate would change",
    )
    parser.add_argument(
        "--trl-wheels", default=None, help="install TRL from this wheel folder (offline machines)"
    )


def main(args: argparse.Namespace) -> int:
    from mmrlsd.perf import install_trl, load_perf_config, run

    cfg = load_perf_config(resolve_config(args.config), args.set)
    if args.install_trl:
        install_trl(cfg.trl_version, args.trl_wheels)
    result, path = run(cfg, Path(args.out))
    print(f"wrote {path}")
    return 0 if result.get("errors") in (None, {}) else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="mmrlsd perf", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(ap)
    raise SystemExit(main(ap.parse_args()))
