"""The `mmrlsd` command: parse, then dispatch to library functions (no torch import at parse time)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mmrlsd import __version__

EXAMPLES = """examples:
  mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny      # the built-in tiny default, CPU only
  mmrlsd train configs/qwen2vl_7b.yaml trainer.total_steps=3 algo.lam0=0
  mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny --resume
  mmrlsd validate configs/qwen3vl_8b.yaml
  mmrlsd eval --bench mathvista --model runs/tiny/checkpoint-100
  mmrlsd make-tiny --arch qwen2_5_vl --out /tmp/tiny
  mmrlsd ls
"""


def _train(args) -> int:
    from mmrlsd.config import load_config
    from mmrlsd.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, args.output_dir, resume=args.resume, progress=not args.no_progress)  # prints the run's summary
    return 0


def _validate(args) -> int:
    from mmrlsd.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(f"{args.config}: OK ({sum(len(v) for v in to_dict(cfg).values())} keys)")
    return 0


def _ls(args) -> int:
    from mmrlsd.algo import ADVANTAGES, TOKEN_ADVANTAGES
    from mmrlsd.config import CHOICES
    from mmrlsd.model.tiny import ARCHS
    from mmrlsd.reward.rewards import REWARDS

    rows = {"token advantages (algo.token_adv)": sorted(TOKEN_ADVANTAGES) + ["grpo_opsd"],
            "teacher information (algo.teacher_info; sibling = SDPO)": list(CHOICES["algo.teacher_info"]),
            "distillation (algo.distill)": list(CHOICES["algo.distill"]),
            "group advantages (algo.adv)": sorted(ADVANTAGES), "rewards (reward.name)": sorted(REWARDS),
            "tiny architectures (make-tiny --arch)": list(ARCHS)}  # fmt: skip
    try:
        from mmrlsd.bench import BENCHES

        rows["benchmarks (eval --bench)"] = sorted(BENCHES)
    except ImportError:
        pass
    for title, names in rows.items():
        print(f"{title}: {', '.join(names)}")
    return 0


def _make_tiny(args) -> int:
    from mmrlsd.model.tiny import make_tiny

    print(make_tiny(args.arch, args.out, seed=args.seed))
    return 0


def _eval(args) -> int:
    from mmrlsd.bench.cli import main

    return main(args)


def _sft(args) -> int:
    from mmrlsd.train.sft import main

    return main(args)


def _viz(args) -> int:
    from mmrlsd.viz_cli import main

    return main(args)


def _perf(args) -> int:
    from mmrlsd.perf_cli import main

    return main(args)


def _export(args) -> int:
    from mmrlsd.train.checkpoint import export

    print(export(args.checkpoint, args.out))
    return 0


def _synth(args) -> int:
    from mmrlsd.data.synth import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrlsd", description="RLSD training and evaluation for Qwen-VL models.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train with RLSD (or a baseline) from a YAML config", epilog=EXAMPLES,
                       formatter_class=fmt)  # fmt: skip
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.total_steps=3 algo.lam0=0")
    t.add_argument("--output-dir", help="run directory (default: trainer.output_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)

    v = sub.add_parser("validate", help="check a config without running it",
                       epilog="example:\n  mmrlsd validate configs/qwen2vl_7b.yaml", formatter_class=fmt)  # fmt: skip
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_validate)

    ls = sub.add_parser("ls", help="list registered algorithms, rewards and benchmarks",
                        epilog="example:\n  mmrlsd ls", formatter_class=fmt)  # fmt: skip
    ls.set_defaults(fn=_ls)

    mt = sub.add_parser(
        "make-tiny",
        help="write a tiny random Qwen-VL checkpoint (no download)",
        epilog="example:\n  mmrlsd make-tiny --arch qwen3_vl --out /tmp/tiny3",
        formatter_class=fmt,
    )
    mt.add_argument("--arch", required=True, choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    mt.add_argument("--out", required=True)
    mt.add_argument("--seed", type=int, default=0)
    mt.set_defaults(fn=_make_tiny)

    e = sub.add_parser("eval", help="generate and/or score a benchmark", formatter_class=fmt)
    try:
        from mmrlsd.bench.cli import add_arguments as add_eval
    except ImportError:  # pragma: no cover - the bench package is part of the install
        add_eval = None
    if add_eval is not None:
        add_eval(e)
    e.set_defaults(fn=_eval)

    ft = sub.add_parser(
        "sft",
        help="supervised fine-tuning on reference solutions (builds the tiny-lab model)",
        formatter_class=fmt,
        epilog="example:\n  mmrlsd sft configs/tiny_sft.yaml --output-dir runs/sft",
    )
    ft.add_argument("config", help="YAML config (e.g. configs/tiny_sft.yaml)")
    ft.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. trainer.total_steps=50 optim.lr=1e-4"
    )
    ft.add_argument("--output-dir", help="run directory (default: trainer.output_dir)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(fn=_sft)

    x = sub.add_parser(
        "export",
        help="write a plain Hugging Face model folder from a training checkpoint",
        formatter_class=fmt,
        epilog="example:\n  mmrlsd export runs/tiny/checkpoint-100 --out models/tiny",
    )
    x.add_argument("checkpoint", help="RUN_DIR/checkpoint-N")
    x.add_argument("--out", required=True, help="output folder (loadable by from_pretrained and vLLM)")
    x.set_defaults(fn=_export)

    for name, module, fn, helptext in (
        ("viz", "mmrlsd.viz_cli", _viz, "render RLSD token credit (text + image overlay) to HTML or PNG"),
        ("perf", "mmrlsd.perf_cli", _perf, "benchmark the RLSD step against GRPO, the naive path and TRL"),
    ):
        try:
            mod = importlib.import_module(module)
            add, examples = mod.add_arguments, getattr(mod, "EXAMPLES", None)
        except (ImportError, AttributeError):
            add, examples = None, None
        sp = sub.add_parser(name, help=helptext, formatter_class=fmt, epilog=examples)
        if add is not None:
            add(sp)
        sp.set_defaults(fn=fn)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser(
        "synth",
        help="write the synthetic visual-reasoning data set",
        formatter_class=fmt,
        epilog="example:\n  mmrlsd data synth --out data/tiny --n 4000 --seed 0",
    )
    try:
        from mmrlsd.data.synth import add_arguments as add_synth
    except ImportError:  # pragma: no cover
        add_synth = None
    if add_synth is not None:
        add_synth(s)
    s.set_defaults(fn=_synth)
    return p


def setup_logging(verbose: bool = False) -> None:
    """One stderr handler on the `mmrlsd` logger only. The root logger is left unconfigured, so other libraries'
    records (which often have their own handler and propagate) are printed once, by their own handler."""
    logger = logging.getLogger("mmrlsd")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_mmrlsd", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._mmrlsd = True
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may follow options (`train CFG --output-dir D key=value`), which argparse cannot interleave
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(verbose=args.verbose)
    from mmrlsd.config import ConfigError
    from mmrlsd.errors import MmrlsdError

    try:
        return args.fn(args)
    except (ConfigError, MmrlsdError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
