"""`mmrlsd ls`: the names each registry accepts (what config keys and flags take)."""

from __future__ import annotations

import argparse

HELP = "list registered algorithms, rewards and benchmarks"
EXAMPLES = """example:
  mmrlsd ls
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from mmrlsd.algo import ADVANTAGES, METHODS
    from mmrlsd.config import CHOICES
    from mmrlsd.model.tiny import ARCHS
    from mmrlsd.reward.rewards import REWARDS

    rows = {"methods (algo.token_adv)": list(METHODS),
            "teacher information (algo.teacher_info; sibling = SDPO)": list(CHOICES["algo.teacher_info"]),
            "distillation (algo.distill)": list(CHOICES["algo.distill"]),
            "group advantages (algo.adv)": sorted(ADVANTAGES), "rewards (reward.name)": sorted(REWARDS),
            "tiny architectures (make-tiny --arch)": list(ARCHS)}  # fmt: skip
    from mmrlsd.bench import BENCHES

    rows["benchmarks (eval --bench)"] = sorted(BENCHES)
    for title, names in rows.items():
        print(f"{title}: {', '.join(names)}")
    return 0
