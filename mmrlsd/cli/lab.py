"""`mmrlsd lab ...`: the tiny lab's data, the method comparison and the default run's check
(`mmrlsd.experiments.lab`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HELP = "the tiny lab and the credit lab: data, the GRPO/RLSD/OPSD/SDPO comparisons, the default run's check"
EXAMPLES = """examples:
  mmrlsd lab data --out data/tiny/lab                                  # the committed RL data
  mmrlsd lab data --out data/synth_sft --n 24000 --n-val 0 --seed 1    # the SFT data
  mmrlsd lab check                                                     # time + judge the default run
  mmrlsd lab compare trainer.threads=1                                 # the comparison (2 runs at a time)
  mmrlsd lab compare --add --methods sdpo trainer.threads=1            # one more method, same budget
  mmrlsd lab data --task credit --out data/tiny/credit                 # the credit lab's RL data
  mmrlsd lab credit                                                    # the credit lab's comparison
"""


class Data:
    HELP = "write the lab's data (train + val)"
    EXAMPLES = "example:\n  mmrlsd lab data --out data/tiny/lab\n"

    @staticmethod
    def add_arguments(d: argparse.ArgumentParser) -> None:
        d.add_argument("--out", type=Path, default=Path("data/tiny/lab"))
        d.add_argument("--n", type=int, default=4000, help="train records (default 4000)")
        d.add_argument("--n-val", type=int, default=512, help="val records (default 512)")
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--task", choices=("tiny", "credit"), default="tiny",
                       help="tiny: the tiny lab's four short families; credit: the credit lab's digit_chain")  # fmt: skip

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmrlsd.experiments.lab.data import TASKS, write_lab_data

        families, levels = TASKS[args.task]
        meta = write_lab_data(args.out, args.n, args.n_val, args.seed, families, levels)
        print(f"wrote {meta['counts']} records to {args.out}")
        return 0


class Compare:
    HELP = "run each method for each seed and write the results"
    EXAMPLES = "examples:\n  mmrlsd lab compare trainer.threads=1\n  mmrlsd lab compare --skip-runs\n"

    @staticmethod
    def add_arguments(c: argparse.ArgumentParser) -> None:
        from mmrlsd.experiments.lab.runs import METHODS  # the standard library only

        c.add_argument("--out", type=Path, default=Path("eval/results/tiny_lab"))
        c.add_argument("--runs", type=Path, default=Path("runs/tiny_lab"), help="run directories go here")
        c.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
        c.add_argument("--seeds", default="0,1,2")
        c.add_argument(
            "--jobs", type=int, default=2, help="runs at a time (on 2 cores: 2, with trainer.threads=1)"
        )
        c.add_argument("--skip-runs", action="store_true", help="only summarise existing run directories")
        c.add_argument("--add", action="store_true",
                       help="run only --methods and add them to the existing results.json (same seeds and overrides)")  # fmt: skip
        c.add_argument("overrides", nargs="*", help="dotted overrides for every run (the shared budget)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmrlsd.experiments.lab.compare import compare
        from mmrlsd.experiments.lab.report import table_markdown
        from mmrlsd.experiments.lab.runs import METHODS

        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            print(f"error: unknown method(s) {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split(",") if s]
        command = (
            shlex.join(["mmrlsd", "lab", *sys.argv[sys.argv.index("lab") + 1 :]]) if "lab" in sys.argv else ""
        )
        res = compare(args.out, args.runs, methods, seeds, args.overrides, args.jobs, skip_runs=args.skip_runs,
                      add=args.add, command=command)  # fmt: skip
        print(table_markdown(res))
        wall = res["added"][-1]["wall_s"] if args.add else res["wall_s"]
        print(f"wrote {args.out}/results.json, curves.png, table.md in {wall:.0f}s")
        return 0


class Credit:
    HELP = "the credit lab: GRPO, RLSD (+ an eps_w / lambda sweep), OPSD, SDPO on digit_chain, 5 seeds each"
    EXAMPLES = ("examples:\n  mmrlsd lab credit                     # the whole comparison, 2 runs at a time\n"
                "  mmrlsd lab credit --skip-runs         # re-summarise existing run directories\n"
                "  mmrlsd lab credit --methods grpo,rlsd --seeds 0 trainer.total_steps=2   # a smoke run\n")  # fmt: skip

    @staticmethod
    def add_arguments(c: argparse.ArgumentParser) -> None:
        from mmrlsd.experiments.lab.credit import CREDIT_METHODS, DEFAULT_SEEDS  # the standard library only

        c.add_argument("--out", type=Path, default=Path("eval/results/credit_lab"))
        c.add_argument("--runs", type=Path, default=Path("runs/credit_lab"), help="run directories go here")
        c.add_argument("--methods", default=",".join(CREDIT_METHODS), help="comma-separated (default: all)")
        c.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
        c.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core)")
        c.add_argument("--skip-runs", action="store_true", help="only summarise existing run directories")
        c.add_argument("--model", default="data/tiny/sft-credit", help="tokenizer for mean_response_tokens")
        c.add_argument(
            "--census-items",
            type=int,
            default=256,
            help="validation items for the greedy error census of the start model and every run (0: off)",
        )
        c.add_argument("overrides", nargs="*", help="dotted overrides for every run (the shared budget)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmrlsd.experiments.lab.credit import CREDIT_METHODS, credit_compare

        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in CREDIT_METHODS]
        if unknown or not methods:
            print(f"error: unknown method(s) {unknown}; known: {', '.join(CREDIT_METHODS)}", file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split(",") if s]
        command = (
            shlex.join(["mmrlsd", "lab", *sys.argv[sys.argv.index("lab") + 1 :]]) if "lab" in sys.argv else ""
        )
        res = credit_compare(args.out, args.runs, methods, seeds, args.overrides, args.jobs,
                             skip_runs=args.skip_runs, command=command, model=args.model,
                             census_items=args.census_items)  # fmt: skip
        p = res.get("paired_rlsd_minus_grpo")
        if p:
            print(
                f"paired RLSD - GRPO greedy gain: {p['mean']} (95% interval {p['ci95']}) over {p['n']} seeds"
            )
        print(f"wrote {args.out}/results.json, credit.png, README.md in {res['wall_s']:.0f}s")
        return 0


class Check:
    HELP = "time the default run and judge it against its bar"
    EXAMPLES = "example:\n  mmrlsd lab check --run-dir runs/tiny_default\n"

    @staticmethod
    def add_arguments(k: argparse.ArgumentParser) -> None:
        k.add_argument("--run-dir", type=Path, default=Path("runs/tiny_default"))
        k.add_argument("--out", type=Path, default=Path("eval/results/tiny_lab/default_run.json"))
        k.add_argument("--config", default="configs/tiny_cpu.yaml")
        k.add_argument("overrides", nargs="*", help="dotted overrides passed to mmrlsd train")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmrlsd.experiments.lab.check import check_default

        res = check_default(args.run_dir, args.out, args.config, args.overrides)
        print(json.dumps({k: v for k, v in res.items() if k not in ("floors",)}, indent=1))
        return 0 if res["passed"] else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mmrlsd.cli import attach

    sub = p.add_subparsers(dest="lab_command", required=True)
    for name, job in (("data", Data), ("compare", Compare), ("credit", Credit), ("check", Check)):
        attach(sub, name, job)


def run(args: argparse.Namespace) -> int:  # only reached without a subcommand, which argparse refuses
    return 2
