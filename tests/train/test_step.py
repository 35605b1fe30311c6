"""`rlsd_step` stage by stage: on the tiny model, the dumped Δ_t and Â_t are formed from the student's and the
teacher's log-probs of the starting weights (recomputed here one unpadded row at a time); GRPO skips the teacher
pass; and with every stage but the step's own arithmetic replaced by fixed numbers, Δ_t, λ and Â_t match values
worked out by hand, on the plain path (handed to the update as tensors) and on the fused one (formed inside it)."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from mmrlsd.algo.methods import privileged_gain, token_advantages
from mmrlsd.algo.rlsd import lam_at, rlsd_token_advantages
from mmrlsd.config import load_config
from mmrlsd.data.encoding import encode
from mmrlsd.model.logprobs import forward_logprobs
from mmrlsd.reward.rewards import RewardResult
from mmrlsd.train import step as step_module
from mmrlsd.train.step import StepContext, TeacherPass, rlsd_step
from mmrlsd.train.update import UpdateResult
from mmrlsd.types import Groups, Rollouts, Sample, SeqBatch

REPO = Path(__file__).resolve().parents[2]


def tiny_step_config(tiny_model, tiny_records, *extra: str):
    sys.path.insert(0, str(REPO / "tests" / "plugins"))
    overrides = [f"model.path={tiny_model('qwen2_5_vl')}", f"data.train_files=[{tiny_records}]",
                 "reward.name=charcount", "reward.plugins=[charcount_reward]", "rollout.n=4", "rollout.batch_size=2",
                 "rollout.max_new_tokens=8", "optim.micro_batch_size=3", "optim.mini_batches=2", "trainer.dump_max=8",
                 "algo.teacher_refresh=1", "algo.lam0=0.5", "algo.lam_decay_steps=10", *extra]  # fmt: skip
    return load_config(None, overrides)


def row_logprobs(model, processor, prompt: str, images: list, token_ids: list[int]) -> torch.Tensor:
    """log π(y_t | prompt, y_<t) of one unpadded `[prompt | response]` row: `(T,)`."""
    enc = encode(processor, [prompt], [images])
    resp = torch.tensor([token_ids], dtype=enc["input_ids"].dtype)
    mm = enc.get("mm_token_type_ids")
    seq = SeqBatch(
        input_ids=torch.cat([enc["input_ids"], resp], 1), attention_mask=torch.ones(1, enc["input_ids"].shape[1] + resp.shape[1], dtype=torch.long),
        mm_token_type_ids=torch.cat([mm, torch.zeros_like(resp)], 1) if mm is not None else None,
        pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
        images_per_seq=[len(images)], prompt_len=enc["input_ids"].shape[1],
    )  # fmt: skip
    with torch.no_grad():
        return forward_logprobs(model, seq)[0][0]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_step_forms_delta_and_token_adv_from_the_two_log_prob_passes(tiny_model, tiny_records, fast):
    from mmrlsd.data.sources import FieldMap, load_dataset_files
    from mmrlsd.train.loop import build

    fast_keys = [
        "model.packing=true",
        "model.share_vision=true",
        "model.share_prefix=true",
        "optim.mini_batches=1",
    ]
    cfg = tiny_step_config(tiny_model, tiny_records, *(fast_keys if fast else []))
    ctx = build(cfg)
    start = copy.deepcopy(ctx.policy)  # the behaviour policy: the weights before the step's update
    data = load_dataset_files(cfg.data.train_files, FieldMap(), "train", shuffle=False, seed=0,
                              max_pixels=112 * 112)  # fmt: skip
    samples = data.next_batch(2)
    result = rlsd_step(ctx, samples, step=1, seed=7)
    assert ("time/old_logp" in result.metrics) == (not fast)  # fused: the update's forward gives log P_S
    lam = lam_at(1, 0.5, 10)  # 0.45
    assert result.metrics["rlsd/lam"] == lam and result.metrics["rlsd/teacher_pass"] == 1.0
    assert len(result.dump) == 8
    for row in result.dump:
        s = samples[row["group"]]
        student = row_logprobs(start, ctx.processor, ctx.prompts.student(s), s.pil_images, row["token_ids"])
        teacher = row_logprobs(
            ctx.teacher, ctx.processor, ctx.prompts.teacher(s), s.pil_images, row["token_ids"]
        )
        torch.testing.assert_close(torch.tensor(row["student_logp"]), student, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(row["teacher_logp"]), teacher, rtol=0, atol=1e-5)
        delta = torch.tensor(row["teacher_logp"]) - torch.tensor(row["student_logp"])  # Δ_t, response tokens
        torch.testing.assert_close(torch.tensor(row["delta"]), delta, rtol=0, atol=1e-6)
        want = rlsd_token_advantages(torch.tensor([row["adv"]]), delta[None], torch.ones_like(delta)[None],
                                     lam=lam, eps_w=cfg.algo.eps_w)[0]  # fmt: skip
        torch.testing.assert_close(torch.tensor(row["token_adv"]), want, rtol=0, atol=1e-6)
        w = torch.exp(math.copysign(1.0, row["adv"]) * delta) if row["adv"] else torch.ones_like(delta)
        torch.testing.assert_close(torch.tensor(row["w"]), w, rtol=0, atol=1e-6)
    assert any(abs(d) > 1e-3 for row in result.dump for d in row["delta"])  # the teacher does disagree


def test_grpo_skips_the_teacher_pass(tiny_model, tiny_records, monkeypatch):
    from mmrlsd.data.sources import FieldMap, load_dataset_files
    from mmrlsd.train.loop import build

    called = []
    monkeypatch.setattr(step_module, "teacher_pass", lambda *a, **k: called.append(1))
    for method in (["algo.token_adv=grpo"], ["algo.lam0=0"]):  # the GRPO method, and RLSD with λ = 0
        cfg = tiny_step_config(tiny_model, tiny_records, *method)
        ctx = build(cfg)
        data = load_dataset_files(cfg.data.train_files, FieldMap(), "train", shuffle=False, seed=0,
                                  max_pixels=112 * 112)  # fmt: skip
        result = rlsd_step(ctx, data.next_batch(2), step=1, seed=7)
        assert not called and "time/teacher" not in result.metrics
        assert result.metrics["rlsd/teacher_pass"] == 0.0
        for row in result.dump:
            assert row["teacher_logp"] is None and not any(row["delta"])
            assert row["token_adv"] == [row["adv"]] * len(row["token_ids"])  # Â_t = A


# ---------------------------------------------------------------------------------------------- by hand


def hand_case(monkeypatch, fast: bool):
    """One group of G = 2 responses of 3 tokens (the last one padding), rewards 1 and 0, A = R - mean = ±0.5
    (`norm_std: false`); the teacher is log 2 above the student on token 0 and log 2 below on token 1; λ at step 1
    with λ_0 = 0.5 and D = 2 is 0.5·(1 - 1/2) = 0.25; ε_w = 0.2. Every stage around the step's arithmetic is
    replaced: the rollout and reward (`sample_groups`), the two log-prob passes and the update (which records what
    it is handed)."""
    extra = ["model.packing=true"] if fast else []
    cfg = load_config(None, ["model.path=m", "data.train_files=[t.jsonl]", "rollout.n=2", "rollout.batch_size=1",
                             "algo.norm_std=false", "algo.lam0=0.5", "algo.lam_decay_steps=2", "algo.eps_w=0.2",
                             "optim.mini_batches=1", "trainer.dump_every=0", *extra])  # fmt: skip
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    rollouts = Rollouts(torch.tensor([[5, 6, 0], [7, 8, 0]]), mask, ["a", "b"], group_size=2)
    results = [RewardResult(1.0, 1.0, 1.0, "1"), RewardResult(0.0, 0.0, 1.0, "2")]
    rewards = torch.tensor([1.0, 0.0])
    groups = Groups([Sample("s", "q", "1")], {}, rollouts, results, rewards, torch.tensor([0.5, -0.5]))
    student = torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, 0.0]])
    teacher = student + torch.tensor([[math.log(2), -math.log(2), 0.0]])
    seen = {}

    def fake_update(policy, optimizer, seq, mask, *, old_logp=None, token_adv=None, credit=None, **kw):
        seen.update(old_logp=old_logp, token_adv=token_adv, credit=credit)
        if credit is None:
            return UpdateResult({}, old_logp, None, None)
        d = privileged_gain(credit.teacher_logp, student, credit.teacher_mask)  # what the fused update forms
        return UpdateResult({}, student, d, token_advantages(credit.rule, credit.adv, d, mask))

    monkeypatch.setattr(step_module, "sample_groups", lambda *a: groups)
    monkeypatch.setattr(step_module, "build_sequences", lambda enc, r: None)
    monkeypatch.setattr(step_module, "teacher_pass", lambda *a: TeacherPass(teacher, mask, None, None))
    monkeypatch.setattr(step_module, "token_logprobs", lambda *a, **k: (student, None))
    monkeypatch.setattr(step_module, "ppo_update", fake_update)
    ctx = StepContext(cfg, None, None, None, None, None, engine=object())
    return rlsd_step(ctx, groups.samples, step=1, seed=0), seen


# A = +0.5: token 0, Δ = log 2: w = 2 -> clip 1.2 -> Â = 0.5·(0.75 + 0.25·1.2) = 0.525
#           token 1, Δ = -log 2: w = 0.5 -> clip 0.8 -> Â = 0.5·(0.75 + 0.25·0.8) = 0.475
# A = -0.5: token 0, w = exp(-log 2) = 0.5 -> 0.8 -> Â = -0.5·0.95 = -0.475; token 1, w = 2 -> 1.2 -> -0.525
HAND_TOKEN_ADV = torch.tensor([[0.525, 0.475, 0.0], [-0.475, -0.525, 0.0]])
HAND_DELTA = torch.tensor([[math.log(2), -math.log(2), 0.0], [math.log(2), -math.log(2), 0.0]])


def test_step_arithmetic_by_hand_plain(monkeypatch):
    result, seen = hand_case(monkeypatch, fast=False)
    assert seen["credit"] is None  # Δ_t and Â_t were formed in the step and handed over as tensors
    torch.testing.assert_close(seen["token_adv"], HAND_TOKEN_ADV, rtol=0, atol=1e-6)
    m = result.metrics
    assert m["rlsd/lam"] == 0.25 and m["adv/mean"] == 0.0 and m["rlsd/teacher_pass"] == 1.0
    assert m["rlsd/delta_mean"] == pytest.approx(0.0, abs=1e-7)  # ±log 2 on the four response tokens
    assert m["rlsd/w_clip_frac"] == 1.0  # w = 2 or 0.5 on every response token: all outside [0.8, 1.2]
    assert m["rlsd/token_adv_mean"] == pytest.approx(0.0, abs=1e-7)


def test_step_arithmetic_by_hand_fused(monkeypatch):
    result, seen = hand_case(monkeypatch, fast=True)
    assert seen["old_logp"] is None and seen["token_adv"] is None  # π_old = π_θ: the update forms them
    credit = seen["credit"]
    assert credit.rule.method == "rlsd" and credit.rule.lam == 0.25 and credit.rule.eps_w == 0.2
    d = privileged_gain(
        credit.teacher_logp, torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, 0.0]]), credit.teacher_mask
    )
    torch.testing.assert_close(d, HAND_DELTA * torch.tensor([[1.0, 1.0, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(token_advantages(credit.rule, credit.adv, d, credit.teacher_mask.float()),
                               HAND_TOKEN_ADV, rtol=0, atol=1e-6)  # fmt: skip
    assert "time/old_logp" not in result.metrics and result.metrics["rlsd/w_clip_frac"] == 1.0
