"""A run killed after its step-2 checkpoint and resumed with --resume matches an uninterrupted 4-step run:
identical metrics (timings aside) and identical final weights (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmrlsd.config import load_config
from mmrlsd.log import read_metrics
from mmrlsd.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_smoke import _weights, tiny_overrides  # noqa: E402

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")




def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_kill_and_resume_matches_uninterrupted(tiny_model, tiny_records, tmp_path):
    args = tiny_overrides(tiny_model("qwen2_5_vl"), tiny_records, **{
        "trainer.total_steps": 4, "trainer.save_every": 2, "trainer.threads": 2, "trainer.keep_last": 0,
        "algo.teacher_refresh": 3, "algo.lam_decay_steps": 3, "optim.warmup_steps": 2,
    })  # fmt: skip
    straight = train(load_config(None, args), tmp_path / "straight", progress=False)

    env = {**os.environ, "PYTHONPATH": PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mmrlsd", "train", str(cfg_file), *args, "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "COMPLETE").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint-2 within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-4").exists()

    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _comparable(read_metrics(out)) == _comparable(read_metrics(straight))
    a, b = _weights(straight, 4), _weights(out, 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
