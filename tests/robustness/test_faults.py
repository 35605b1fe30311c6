"""Runtime faults: SIGKILL at three points, SIGTERM, and a non-finite loss.

* SIGKILL during the rollout, during the update, in the middle of a checkpoint write, and at a random moment
  (seeded, reported on failure): each killed run is resumed with `--resume` semantics (`train(..., resume=True)`) and must end with the metrics (`time/*` aside),
  rollout dumps and final weights of one uninterrupted reference run, bit for bit;
* SIGTERM: the run finishes its step, checkpoints, exits with code 0, and resumes to the same result;
* a non-finite loss: the mini-batch is skipped and counted (`actor/skipped_updates`), and the weights and the
  optimizer state stay exactly as they were; `trainer.max_bad_steps` consecutive skipped steps abort.

How it stays fast: the killed runs are `os.fork()` children of the test process (no second ~15 s torch +
transformers import), the resumes run in-process, and all runs share one module-scoped reference run (tiny
Qwen2-VL, B=2, G=2, 8 new tokens, 3 steps). Everything runs with `trainer.threads=1`: a forked child that uses
more OpenMP threads than one after its parent already has hangs in libgomp (measured here), so the parent's
thread count is restored after the module.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmrlsd.config import load_config
from mmrlsd.errors import TrainingError
from mmrlsd.log import read_dump, read_metrics
from mmrlsd.reward.rewards import REWARDS, RewardResult, register_reward
from mmrlsd.train import checkpoint as ckpt
from mmrlsd.train.loop import train

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
sys.path.insert(0, str(TESTS / "plugins"))
from test_train_smoke import _weights, tiny_overrides  # noqa: E402

STEPS = 3
SETTINGS = {
    "trainer.total_steps": STEPS, "trainer.save_every": 1, "trainer.keep_last": 2, "trainer.threads": 1,
    "rollout.n": 2, "rollout.batch_size": 2, "rollout.max_new_tokens": 8, "optim.micro_batch_size": 2,
    "algo.teacher_refresh": 2, "algo.lam_decay_steps": 4, "optim.warmup_steps": 2,
}  # fmt: skip
# λ = 0.5, 0.375, 0.25 (teacher pass every step); the teacher snapshot is refreshed after step 2 and the lr warms
# up over steps 1-2, so a resume from checkpoint 1 or 2 must restore the teacher, λ and lr positions exactly.
CHILD_TIMEOUT_S = 420


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run)]


def _ckpt_steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(run)]


def in_child(fn: Callable[[], int], stderr_path: Path | None = None, kill_after: float | None = None) -> int:
    """Run `fn` in a forked child and return its exit code (negative: killed by that signal); `kill_after`
    seconds: SIGKILL it then, if it is still running. A child that hangs is killed after `CHILD_TIMEOUT_S`, with
    its Python stacks dumped first, and the test fails."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            if stderr_path is not None:
                fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
            faulthandler.dump_traceback_later(CHILD_TIMEOUT_S - 20, exit=True)
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    start = time.monotonic()
    deadline = start + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if kill_after is not None and time.monotonic() - start >= kill_after:
            os.kill(pid, signal.SIGKILL)
            kill_after = None
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked training run still running after {CHILD_TIMEOUT_S} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ref(tiny_model, tmp_path_factory):
    """The uninterrupted reference run, shared by every fault test."""
    from tinydata import write_records

    root = tmp_path_factory.mktemp("faults")
    data = write_records(root / "data")
    model = tiny_model("qwen2_vl")
    args = tiny_overrides(model, data, **SETTINGS)
    t0 = time.monotonic()
    run = train(load_config(None, args), root / "reference", progress=False)
    seconds = time.monotonic() - t0
    assert _steps(run) == [1, 2, 3]
    assert _ckpt_steps(run) == [2, 3]  # trainer.keep_last=2 pruned checkpoint-1
    return SimpleNamespace(root=root, model=model, data=data, args=args, run=run, seconds=seconds,
                           metrics=_comparable(read_metrics(run)), weights=_weights(run, STEPS))  # fmt: skip


def assert_matches_reference(run: Path, ref) -> None:
    assert _comparable(read_metrics(run)) == ref.metrics
    for step in range(1, STEPS + 1):
        assert read_dump(run, step) == read_dump(ref.run, step), f"rollout dump of step {step}"
    weights = _weights(run, STEPS)
    assert weights.keys() == ref.weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], ref.weights[k])]
    assert not different, different[:5]
    assert _ckpt_steps(run) == [2, 3]
    assert not list(run.glob(".checkpoint-*")), "a killed save's temporary directory was not cleaned up"


# fault, complete checkpoints left by the kill, metrics lines left by the kill
KILLS = [
    ("rollout:2", [1], [1]),  # after sampling step 2: resume from checkpoint 1
    ("update:3", [1, 2], [1, 2]),  # after the first backward of step 3: resume from checkpoint 2
    ("checkpoint:2", [1], [1, 2]),  # checkpoint 2 half written: checkpoint 1 is the newest complete one
]


@pytest.mark.parametrize("fault,ckpts_left,steps_left", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_matches_uninterrupted(fault, ckpts_left, steps_left, ref):
    out = ref.root / f"killed_{fault.replace(':', '_')}"

    def killed_run() -> int:
        os.environ["MMRLSD_FAULT"] = fault
        train(load_config(None, ref.args), out, progress=False)
        return 0  # not reached: the fault point SIGKILLs the process

    assert in_child(killed_run) == -signal.SIGKILL
    assert _ckpt_steps(out) == ckpts_left
    assert _steps(out) == steps_left
    if fault.startswith("checkpoint"):
        (partial,) = out.glob(".checkpoint-2*")  # the interrupted write, never renamed into place
        assert not (partial / ckpt.COMPLETE).exists() and not (out / "checkpoint-2").exists()

    train(load_config(None, ref.args), out, resume=True, progress=False)
    assert_matches_reference(out, ref)


def test_sigkill_at_a_random_moment_then_resume_matches_uninterrupted(ref):
    """SIGKILL from outside at a random moment of the run (model loading, a step, a checkpoint write, after the
    end: anything goes), then resume. Reproduce a failure with the seed in its message: MMRLSD_KILL_SEED=<seed>."""
    seed = int(os.environ.get("MMRLSD_KILL_SEED", time.time_ns() % 1_000_000))
    delay = random.Random(seed).uniform(0.0, 1.2 * ref.seconds)
    out = ref.root / "killed_random"
    where = f"MMRLSD_KILL_SEED={seed}: SIGKILL after {delay:.2f} s of a ~{ref.seconds:.0f} s run"

    def run() -> int:
        train(load_config(None, ref.args), out, progress=False)
        return 0

    code = in_child(run, kill_after=delay)
    assert code in (0, -signal.SIGKILL), where
    left = _ckpt_steps(out) if out.exists() else []
    train(load_config(None, ref.args), out, resume=True, progress=False)
    try:
        assert_matches_reference(out, ref)
    except AssertionError as e:
        raise AssertionError(f"{where} (complete checkpoints left: {left}): {e}") from None
    print(where, f"-> exit {code}, resumed from checkpoint {left[-1] if left else None}")


def test_sigterm_checkpoints_exits_cleanly_and_resumes(ref):
    """SIGTERM arrives during step 2's rollout: step 2 completes, is checkpointed (save_every=0, so only because
    of the signal), and `mmrlsd train` exits 0; `--resume` then finishes the run as if nothing happened."""
    from mmrlsd import cli
    from mmrlsd.train import faults

    out = ref.root / "sigterm"
    args = [a for a in ref.args if not a.startswith("trainer.save_every=")] + ["trainer.save_every=0"]
    cfg_file = ref.root / "empty.yaml"
    cfg_file.write_text("{}\n")
    log_path = ref.root / "sigterm.log"

    def terminated_run() -> int:
        def sigterm_at(name: str, step: int) -> None:
            if (name, step) == ("rollout", 2):
                os.kill(os.getpid(), signal.SIGTERM)

        faults.point = sigterm_at
        logging.getLogger("mmrlsd").addHandler(logging.FileHandler(log_path))
        return cli.main(["train", str(cfg_file), *args, "--output-dir", str(out), "--no-progress"])

    code = in_child(terminated_run, stderr_path=ref.root / "sigterm.stderr")
    assert code == 0, (ref.root / "sigterm.stderr").read_text()[-3000:]
    assert "stopped cleanly at step 2; resume with --resume" in log_path.read_text()
    assert _ckpt_steps(out) == [2] and _steps(out) == [1, 2]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2

    train(load_config(None, args), out, resume=True, progress=False)
    assert _comparable(read_metrics(out)) == ref.metrics
    weights = _weights(out, STEPS)
    assert all(torch.equal(weights[k], ref.weights[k]) for k in ref.weights)


# ------------------------------------------------------------------------------------------ non-finite loss


@pytest.fixture(scope="module")
def update_setup(tiny_model):
    """A tiny policy, its AdamW after one real step (so there is optimizer state to protect), and 4 text-only
    sequences of 6 response tokens with their behaviour log-probs."""
    from mmrlsd.data.encoding import chat_text, encode
    from mmrlsd.model.load import load_model
    from mmrlsd.model.logprobs import build_sequences, token_logprobs
    from mmrlsd.types import Rollouts

    torch.manual_seed(0)
    policy, processor = load_model(str(tiny_model("qwen2_vl")))
    enc = encode(processor, [chat_text(processor, f"what is {i} + {i}?", 0) for i in range(4)], [[]] * 4)
    ids = torch.randint(10, 200, (4, 6))  # (N, T) arbitrary ordinary tokens
    seq = build_sequences(enc, Rollouts(ids, torch.ones_like(ids), [""] * 4, group_size=2))
    old_logp, _ = token_logprobs(policy, seq, 4)  # (N, T)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    return SimpleNamespace(
        policy=policy, optimizer=optimizer, seq=seq, old_logp=old_logp, mask=torch.ones(4, 6)
    )


def _update(s, token_adv: torch.Tensor, mini_batches: int = 1) -> dict[str, float]:
    from mmrlsd.train.update import ppo_update

    return ppo_update(s.policy, s.optimizer, s.seq, s.mask, old_logp=s.old_logp, token_adv=token_adv,
                      mini_batches=mini_batches, micro_batch_size=2, clip_low=0.2, clip_high=0.28, clip_c=3.0,
                      grad_clip=1.0).stats  # fmt: skip


def _snapshot(s) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in s.policy.named_parameters()}
    opt = s.optimizer.state_dict()
    state = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
        for i, st in opt["state"].items()
    }
    return params, state


def _assert_same(s, before: tuple[dict, dict]) -> None:
    params, state = before
    now_params, now_state = _snapshot(s)
    changed = [k for k in params if not torch.equal(params[k], now_params[k])]
    assert not changed, f"weights changed: {changed[:3]}"
    assert now_state.keys() == state.keys()
    for i in state:
        for k, v in state[i].items():
            assert torch.equal(now_state[i][k], v) if torch.is_tensor(v) else now_state[i][k] == v, (i, k)
    assert all(p.grad is None for p in s.policy.parameters()), "gradients left behind"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_loss_skips_the_update_and_keeps_weights_and_optimizer_state(bad, update_setup):
    s = update_setup
    ok = _update(s, torch.randn(4, 6))  # a finite step first: AdamW now holds step/exp_avg/exp_avg_sq
    assert ok["actor/skipped_updates"] == 0.0 and s.optimizer.state_dict()["state"]
    before = _snapshot(s)
    adv = torch.randn(4, 6)
    adv[1, 2] = bad  # one token of one response; the mini-batch loss becomes non-finite
    stats = _update(s, adv)
    assert stats["actor/skipped_updates"] == 1.0
    assert math.isnan(stats["actor/grad_norm"])  # no applied step to report a norm for
    _assert_same(s, before)


def test_nonfinite_minibatch_is_skipped_alone(update_setup):
    """Two mini-batches, the first with a NaN advantage: it is skipped, the second is applied (one AdamW step)."""
    s = update_setup
    _update(s, torch.randn(4, 6))
    params, state = _snapshot(s)
    adv = torch.randn(4, 6)
    adv[0, 0] = math.nan  # rows 0-1 are mini-batch 1, rows 2-3 mini-batch 2
    stats = _update(s, adv, mini_batches=2)
    assert stats["actor/skipped_updates"] == 1.0 and math.isfinite(stats["actor/grad_norm"])
    now_params, now_state = _snapshot(s)
    assert any(not torch.equal(params[k], now_params[k]) for k in params)
    assert all(float(now_state[i]["step"]) == float(state[i]["step"]) + 1 for i in state)


if "nan_for_tests" not in REWARDS:

    @register_reward("nan_for_tests")
    def _nan_reward(responses, answers, problem_types=None, **_):
        """A broken reward plugin: every reward is NaN, so every advantage and loss is NaN."""
        return [RewardResult(reward=math.nan, accuracy=0.0, format=0.0, extracted=None) for _ in responses]


def test_nonfinite_steps_through_the_loop_are_counted_then_abort(ref, tmp_path):
    """Through `train`: step 1's loss is NaN, so its update is skipped and counted and checkpoint 1 holds the
    initial weights; the second bad step in a row reaches `trainer.max_bad_steps=2` and aborts the run."""
    from transformers import AutoModelForImageTextToText

    args = ref.args + ["reward.name=nan_for_tests", "reward.plugins=[]", "trainer.max_bad_steps=2",
                       "trainer.keep_last=0"]  # fmt: skip
    with pytest.raises(TrainingError, match="step 2: 2 consecutive steps skipped"):
        train(load_config(None, args), tmp_path / "nan", progress=False)
    (m,) = read_metrics(tmp_path / "nan")
    assert m["step"] == 1 and m["actor/skipped_updates"] == 1.0 and m["actor/grad_norm"] is None
    init = AutoModelForImageTextToText.from_pretrained(ref.model).state_dict()
    saved = _weights(tmp_path / "nan", 1)
    assert saved.keys() == init.keys()
    assert all(torch.equal(saved[k], init[k]) for k in init), "a skipped step changed the weights"
