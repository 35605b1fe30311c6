"""FSDP2 under torchrun (2 CPU ranks, gloo) reproduces a single-process run, and a checkpoint written by 2 ranks
resumes on 1 rank with the same metrics."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmrlsd.config import load_config
from mmrlsd.log import read_metrics
from mmrlsd.train.checkpoint import load_policy_weights
from mmrlsd.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_smoke import tiny_overrides  # noqa: E402

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
# metrics that are the same whatever the layout (per-rank std or token-weighted means are not)
SAME = ["loss", "reward/mean", "adv/mean", "adv/abs_mean", "rlsd/lam", "actor/grad_norm"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    from tinydata import write_records

    tmp = tmp_path_factory.mktemp("fsdp")
    data = write_records(tmp / "data", n=8, text_only_every=0)  # every micro-batch calls the vision tower
    args = tiny_overrides(tiny_model("qwen2_vl"), data, **{
        "trainer.total_steps": 2, "trainer.save_every": 1, "trainer.keep_last": 0, "trainer.threads": 1,
        "rollout.batch_size": 2, "optim.micro_batch_size": 2, "algo.teacher_refresh": 1,
        "trainer.logger": "[console,tensorboard]",
    })  # fmt: skip
    cfg_file = tmp / "cfg.yaml"
    cfg_file.write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    two = tmp / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmrlsd",
           "train", str(cfg_file), *args, "--output-dir", str(two), "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert (two / "checkpoint-2" / "COMPLETE").is_file(), r.stderr[-4000:]
    one = train(load_config(None, args), tmp / "one_rank", progress=False)
    torch.set_num_threads(os.cpu_count() or 1)
    return args, two, one, cfg_file, env


def test_two_ranks_match_single_process(runs):
    _, two, one, _, _ = runs
    m2, m1 = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m2, m1):
        for k in SAME:
            assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    w2, w1 = load_policy_weights(two / "checkpoint-2"), load_policy_weights(one / "checkpoint-2")
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    assert any(not torch.equal(w1[k], v) for k, v in load_policy_weights(one / "checkpoint-1").items())
    # the hf/ folder the two ranks wrote (full weights gathered on rank 0) holds the same weights as state/
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(two / "checkpoint-2" / "hf").state_dict()
    assert hf.keys() == w2.keys() and all(torch.equal(hf[k], w2[k]) for k in w2)
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1  # only rank 0 logs


def test_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    args, two, _, cfg_file, env = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("checkpoint-2"))
    cmd = [sys.executable, "-m", "mmrlsd", "train", str(cfg_file), *args, "--output-dir", str(resumed),
           "--resume", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (a,) = [m for m in read_metrics(resumed) if m["step"] == 2]
    (b,) = [m for m in read_metrics(two) if m["step"] == 2]
    for k in SAME:
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    w_res, w_two = load_policy_weights(resumed / "checkpoint-2"), load_policy_weights(two / "checkpoint-2")
    for k in w_two:
        torch.testing.assert_close(w_res[k], w_two[k], rtol=0, atol=1e-5, msg=k)


def test_two_ranks_refill_online_filtering_in_step(tiny_model, tmp_path):
    """Online filtering under 2 ranks (gloo): each rank refills its own share of the batch, and a rank whose share
    is full keeps rolling out while the other's is not, so both run the same rounds and their collectives pair up.
    The band (0.45, 0.6) drops most groups of this data: refills and padding happen, and the run finishes. (Each
    rank filters its own groups, so the batch, unlike without filtering, depends on the number of ranks.)"""
    from test_fsdp_mixed import run_two_ranks
    from tinydata import write_records

    data = write_records(tmp_path / "data", n=12, text_only_every=3)
    args = tiny_overrides(tiny_model("qwen2_vl"), data, **{
        "trainer.total_steps": 2, "trainer.threads": 1, "algo.online_filtering": "true",
        "algo.filter_low": 0.45, "algo.filter_high": 0.6, "algo.max_refill_tries": 4,
    })  # fmt: skip
    env = {**os.environ, "PYTHONPATH": PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "two_ranks"
    r = run_two_ranks(args, run, env, timeout=180)  # ranks whose rounds do not pair up hang; ~15 s in step
    assert r.returncode == 0, r.stderr[-4000:]
    m = read_metrics(run)
    assert [x["step"] for x in m] == [1, 2]
    assert max(x["filter/rounds"] for x in m) > 1 and max(x["filter/padded_groups"] for x in m) > 0
    assert all(x["filter/rounds"] <= 4 and abs(x["loss"]) < 1e3 for x in m)
