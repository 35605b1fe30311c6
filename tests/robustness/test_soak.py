"""Soak: a 200-step tiny run with resident memory sampled after every step; no upward trend.

RSS comes from `/proc/self/statm` (resident pages x page size) after each `rlsd_step`, sampled by wrapping the
step the loop calls. The run checkpoints every 50 steps (keep_last=2) and writes a rollout dump every step, so
those paths are in the soak too. The bound: the least-squares slope of RSS over the last 150 steps (after
warm-up) stays below `MAX_SLOPE_KB_PER_STEP`, i.e. under 7.5 MB of drift over those steps; a leak of one
rollout batch per step (a few hundred KB here) would exceed it many times over.

Measured on the 2-core CPU dev box (tiny Qwen2-VL, B=2, G=2, 8 new tokens): see `SOAK_RESULT` printed by the
test (run with `-s`) and the JSON it writes; the README's "Failure behaviour" section quotes one run.

    python -m pytest tests/robustness/test_soak.py -m slow -s
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mmrlsd.config import load_config
from mmrlsd.log import read_metrics
from mmrlsd.train import loop

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
sys.path.insert(0, str(TESTS / "plugins"))
from test_train_smoke import tiny_overrides  # noqa: E402

STEPS = 200
WARMUP = 50
MAX_SLOPE_KB_PER_STEP = 50.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_kb() -> float:
    """Resident set size of this process in KB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1024


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ... (units of ys per step).

    >>> slope([1.0, 3.0, 5.0])
    2.0
    """
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def test_slope_of_a_line():
    assert slope([5.0, 5.0, 5.0]) == 0.0
    assert abs(slope([10.0 + 0.5 * i for i in range(150)]) - 0.5) < 1e-12


@pytest.mark.slow
def test_soak_200_steps_no_memory_growth(tiny_model, tmp_path, monkeypatch):
    from tinydata import write_records

    data = write_records(tmp_path / "data")
    args = tiny_overrides(tiny_model("qwen2_vl"), data, **{
        "trainer.total_steps": STEPS, "trainer.save_every": 50, "trainer.keep_last": 2, "rollout.n": 2,
        "rollout.batch_size": 2, "rollout.max_new_tokens": 8, "optim.micro_batch_size": 2,
    })  # fmt: skip
    samples: list[float] = []
    step_fn = loop.rlsd_step

    def sampled_step(*a, **kw):
        result = step_fn(*a, **kw)
        samples.append(rss_kb())
        return result

    monkeypatch.setattr(loop, "rlsd_step", sampled_step)
    threads = torch.get_num_threads()
    try:
        run = loop.train(load_config(None, args), tmp_path / "soak", progress=False)
    finally:
        torch.set_num_threads(threads)

    assert len(samples) == STEPS and len(read_metrics(run)) == STEPS
    tail = samples[WARMUP:]
    result = {
        "steps": STEPS, "rss_first_mb": samples[0] / 1024, "rss_at_warmup_mb": samples[WARMUP] / 1024,
        "rss_last_mb": samples[-1] / 1024, "rss_max_mb": max(samples) / 1024,
        "slope_last_150_kb_per_step": slope(tail), "bound_kb_per_step": MAX_SLOPE_KB_PER_STEP,
        "rss_kb": [round(s) for s in samples],
    }  # fmt: skip
    (tmp_path / "soak_rss.json").write_text(json.dumps(result))
    print("SOAK_RESULT", json.dumps({k: v for k, v in result.items() if k != "rss_kb"}))
    assert result["slope_last_150_kb_per_step"] < MAX_SLOPE_KB_PER_STEP, result
