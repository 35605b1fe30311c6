"""FSDP2 under torchrun (2 CPU ranks, gloo) when only some ranks' micro-batches have images.

Under FSDP the vision tower's parameters are all-gathered collectively, so a rank whose micro-batch is text-only
must call the tower too (a dummy image, output x 0) or the ranks' collectives fall out of step and the run hangs.
Each case trains two steps where one rank's prompts are all text-only (and, in `fast`, the other rank mixes image
and text prompts): rollout, teacher pass, old log-probs (plain) / Δ inside the update (fast), the update, and
validation (plain). The run must finish within a timeout and match a single-process run on the same data: the
dummy adds exactly 0 to the activations and its gradients are 0.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mmrlsd.config import load_config
from mmrlsd.log import read_metrics
from mmrlsd.train.checkpoint import load_policy_weights
from mmrlsd.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fsdp import PLUGINS, SAME  # noqa: E402
from test_train_smoke import tiny_overrides  # noqa: E402

TIMEOUT_S = 420  # a normal 2-rank run takes ~30 s here; a hang waits for gloo's 30 min timeout

# `I` has an image, `T` is text-only. Ranks take contiguous halves of each global batch (rollout.batch_size).
CASES = {
    # batch 2: rank 0 [I], rank 1 [T] every step; old-log-prob pass, ppo_update, validation (rank 1 text-only).
    # lr 1e-4: the single process pads the text-only prompt to the image prompt's length, so its logits agree
    # with the 2 ranks' to ~1e-7, not bitwise, and Adam (g / (sqrt(v) + 1e-8)) turns a ~1e-10 difference in a
    # gradient that is itself ~1e-9 (an embedding row whose contributions cancel) into ~1.5e-2 * lr of weight.
    "plain": ("IT" * 2, {"rollout.batch_size": 2, "optim.micro_batch_size": 2, "trainer.val_every": 1,
                         "data.max_val_items": 2, "optim.lr": 1e-4}),
    # batch 4: step 1 rank 0 [I, T], rank 1 [T, T]; step 2 rank 0 [T, T], rank 1 [I, I]. Packed, prefix and vision
    # shared per prompt, chunked log-probs, token-budget micro-batches, fused update.
    "fast": ("ITTT" + "TTII", {"rollout.batch_size": 4, "optim.micro_batch_size": 3, "model.packing": "true",
                               "model.share_prefix": "true", "model.share_vision": "true", "model.logprob_chunk": 8,
                               "optim.token_budget": 96}),
}  # fmt: skip


def write_pattern(root: Path, pattern: str) -> Path:
    """Training records in the order of `pattern` (from `write_records`' alternating image/text records)."""
    from tinydata import write_records

    lines = write_records(root, n=2 * len(pattern), text_only_every=2).read_text().splitlines()
    with_image = [x for x in lines if "images" in json.loads(x)]
    text_only = [x for x in lines if "images" not in json.loads(x)]
    out = [with_image.pop(0) if c == "I" else text_only.pop(0) for c in pattern]
    path = root / "pattern.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc): torchrun starts each rank in a session of its own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def torchrun(argv: list[str], env: dict, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGV...`; after `timeout` seconds torchrun and its ranks are
    killed and the test fails instead of hanging. Output goes through files: a rank left running would hold a
    pipe open."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(p.pid), p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()
            err.seek(0)
            pytest.fail(
                f"2-rank run did not finish within {timeout} s (collectives out of step?)\n{err.read()[-3000:]}"
            )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())


def run_two_ranks(args: list[str], out: Path, env: dict, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`mmrlsd train` on 2 ranks with `args` (overrides) into `out` (killed after `timeout` seconds: `torchrun`)."""
    cfg_file = out.parent / "cfg.yaml"
    cfg_file.write_text("{}\n")
    return torchrun(
        ["-m", "mmrlsd", "train", str(cfg_file), *args, "--output-dir", str(out), "--no-progress"], env, timeout
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, tiny_model, tmp_path_factory):
    pattern, extra = CASES[request.param]
    tmp = tmp_path_factory.mktemp(f"fsdp_mixed_{request.param}")
    data = write_pattern(tmp / "data", pattern)
    if "trainer.val_every" in extra:
        extra = {**extra, "data.val_files": f"[{data}]"}
    model_dir = tiny_model("qwen2_vl")
    args = tiny_overrides(model_dir, data, **{
        "trainer.total_steps": 2, "trainer.save_every": 0, "trainer.keep_last": 0, "trainer.threads": 1,
        "algo.teacher_refresh": 1, "data.shuffle": "false", **extra,
    })  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    two = tmp / "two_ranks"
    r = run_two_ranks(args, two, env)
    assert r.returncode == 0 and (two / "checkpoint-2" / "COMPLETE").is_file(), r.stderr[-4000:]
    one = train(load_config(None, args), tmp / "one_rank", progress=False)
    torch.set_num_threads(os.cpu_count() or 1)
    return request.param, model_dir, two, one


def test_text_only_rank_matches_single_process(runs):
    case, model_dir, two, one = runs
    m2, m1 = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == ([0, 1, 2] if case == "plain" else [1, 2])
    for a, b in zip(m2, m1):
        for k in SAME if a["step"] else []:
            assert abs(a[k] - b[k]) <= 1e-5, (case, a["step"], k, a[k], b[k])
        for k in [
            k for k in b if k.startswith("val/")
        ]:  # validation: rank 1 generates for a text-only prompt
            assert abs(a[k] - b[k]) <= 1e-5, (case, a["step"], k, a[k], b[k])
    w2, w1 = load_policy_weights(two / "checkpoint-2"), load_policy_weights(one / "checkpoint-2")
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    from transformers import AutoModelForImageTextToText

    init = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    moved = [k for k in init if ".visual." in f".{k}" and not torch.equal(init[k], w1[k])]
    assert moved, "the vision tower got no gradient: the image prompts did not reach the update"
