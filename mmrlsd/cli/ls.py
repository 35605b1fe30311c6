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
    from mmrlsd.bench import BENCHES
    from mmrlsd.config import CHOICES
    from mmrlsd.model.tiny import ARCHS
    from mmrlsd.train.preflight import registered_choices

    rows = {key: list(names) for key, names in registered_choices().items()}
    rows["algo.teacher_info (sibling = SDPO)"] = list(CHOICES["algo.teacher_info"])
    rows["algo.distill"] = list(CHOICES["algo.distill"])
    rows["make-tiny --arch"] = list(ARCHS)
    rows["eval --bench"] = sorted(BENCHES)
    for title, names in rows.items():
        print(f"{title}: {', '.join(names)}")
    return 0
