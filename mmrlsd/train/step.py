"""One RLSD training step, stage by stage (spec section 3):

    prompts -> rollout -> reward -> group advantage -> student/teacher log-probs -> Δ -> token advantage -> update

Δ is computed once per rollout batch from the behaviour policy's log-probs (the numbers the released code uses
with one optimizer step per rollout batch), which makes RLSD a pure advantage-shaping stage before the update.
GRPO (λ = 0, or `token_adv: grpo`) runs the same code and skips the teacher pass, which cannot matter then.

Fast path (issue #6, `FastOptions` from `model.packing`, `model.share_vision`, `model.logprob_chunk`,
`optim.token_budget`): packed, vision-sharing, memory-lean passes and `fused_update`. With one optimizer step
per rollout batch it also skips the old-log-prob pass: π_old = π_θ then, so the update's own forward gives the
behaviour log-probs and Δ is formed inside it, from the same numbers.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from mmrlsd.algo.advantage import all_equal_groups, get_advantage
from mmrlsd.algo.opsd import generalized_jsd
from mmrlsd.algo.rlsd import get_token_advantage, grpo_opsd_token_advantages, grpo_token_advantages, lam_at
from mmrlsd.algo.sdpo import demonstration_mask, pick_demonstrations
from mmrlsd.config import Config
from mmrlsd.data.encoding import encode, repeat_encoding
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.model.logprobs import build_sequences, response_logits, slice_seq, token_logprobs
from mmrlsd.model.packing import FastOptions, fast_options
from mmrlsd.reward.rewards import score_responses
from mmrlsd.rollout.generate import generate
from mmrlsd.train import faults
from mmrlsd.train.diagnostics import dump_rows, step_metrics
from mmrlsd.train.fused import fused_update
from mmrlsd.train.update import ppo_update
from mmrlsd.types import Sample, SeqBatch, StepResult


@dataclass
class StepContext:
    cfg: Config
    policy: torch.nn.Module
    teacher: torch.nn.Module  # the policy itself when algo.teacher_refresh == 0
    processor: object
    optimizer: torch.optim.Optimizer
    prompts: PromptBuilder
    engine: object | None = None  # a VLLMEngine when rollout.engine == "vllm", else HF generate


@contextmanager
def timed(times: dict[str, float], name: str):
    """Stage timer (verl style): adds the stage's wall seconds to `times["time/<name>"]`."""
    t0 = time.perf_counter()
    yield
    times[f"time/{name}"] = times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


def encode_group(ctx: StepContext, samples: list[Sample], render, G: int):
    """Prompt encodings with every prompt repeated G times (prompt b owns rows b*G .. b*G+G-1); each prompt is
    tokenised and its images preprocessed once."""
    enc = encode(ctx.processor, [render(s) for s in samples], [s.pil_images for s in samples])
    return repeat_encoding(enc, G)


def teacher_encoding(ctx: StepContext, samples: list[Sample], rollouts, results, G: int):
    """`(encoding, demos)`: the teacher prompts of all B*G rows, and for `teacher_info: sibling` (SDPO) each row's
    demonstration (None otherwise).

    SDPO: each row's prompt carries the first other correct response of its group (`demos[i]`, its row index);
    rows without one get the student prompt and no Δ. Otherwise one prompt per sample, repeated G times."""
    if ctx.cfg.algo.teacher_info != "sibling":
        return encode_group(ctx, samples, ctx.prompts.teacher, G), None
    demos = pick_demonstrations([r.accuracy >= 1.0 for r in results], G)
    texts = [ctx.prompts.teacher(samples[i // G], demonstration=rollouts.texts[d]) if d is not None
             else ctx.prompts.student(samples[i // G]) for i, d in enumerate(demos)]  # fmt: skip
    enc = encode(ctx.processor, texts, [samples[i // G].pil_images for i in range(len(texts))])
    return enc, demos


def needs_teacher(cfg: Config, lam: float) -> bool:
    if cfg.algo.token_adv in ("opsd", "grpo_opsd"):
        return True
    return cfg.algo.token_adv == "rlsd" and (lam > 0 or cfg.algo.teacher_diagnostics)


def token_advantages(cfg: Config, adv, delta, mask, lam: float) -> torch.Tensor:
    if cfg.algo.distill == "jsd":  # the distillation is a loss term (`jsd_term`), not part of Â_t
        return grpo_token_advantages(adv, delta, mask) * float(cfg.algo.token_adv == "grpo_opsd")
    if cfg.algo.token_adv == "grpo_opsd":
        return grpo_opsd_token_advantages(adv, delta, mask, coef=cfg.algo.opsd_coef)
    return get_token_advantage(cfg.algo.token_adv)(adv, delta, mask, lam=lam, eps_w=cfg.algo.eps_w)


def privileged_gain(teacher_logp, student_logp, teacher_mask) -> torch.Tensor:
    """Δ_t = log P_T(y_t) - log P_S(y_t) where `teacher_mask` is 1, else 0; all 0 without a teacher pass."""
    if teacher_logp is None:
        return torch.zeros_like(student_logp)
    return (teacher_logp - student_logp) * teacher_mask  # no grad


def shape_rows(
    cfg: Config, adv, teacher_logp, teacher_mask, mask, lam: float, rows, student_logp
) -> torch.Tensor:
    """Â_t of `rows` `(n, T)` given the student's log-probs there."""
    t_rows = teacher_logp[rows] if teacher_logp is not None else None
    delta = privileged_gain(t_rows, student_logp, teacher_mask[rows])  # (n, T)
    return token_advantages(cfg, adv[rows], delta, mask[rows], lam)


def jsd_term(ctx: StepContext, teacher_seq: SeqBatch, teacher_mask: torch.Tensor):
    """`algo.distill: jsd`: the loss term `coef · Σ_t JSD_β(P_T,t || P_S,t) / num_tokens` of rows start..stop
    over the full vocabulary (spec section 7, OPSD), the teacher's logits recomputed without gradient per
    micro-batch. coef is 1 for opsd and `algo.opsd_coef` for grpo_opsd."""
    a = ctx.cfg.algo
    coef = a.opsd_coef if a.token_adv == "grpo_opsd" else 1.0

    def term(
        start: int, stop: int, logits: torch.Tensor, mask: torch.Tensor, num_tokens: float
    ) -> torch.Tensor:
        with torch.no_grad():
            t_logits = response_logits(ctx.teacher, slice_seq(teacher_seq, start, stop))  # (n, T, V)
        m = mask * teacher_mask[start:stop].to(mask.device)  # (n, T)
        return coef * generalized_jsd(logits, t_logits, m, a.jsd_beta, num_tokens)

    return term


def update(
    ctx: StepContext, seq: SeqBatch, old_logp, shaped, mask, fast: FastOptions, step: int, distill=None
):
    """`ppo_update`, or on the fast path `fused_update` (Δ inside the update when `old_logp` is None).
    Returns the update stats and the student log-probs Δ used."""
    o, a = ctx.cfg.optim, ctx.cfg.algo
    kw = dict(mini_batches=o.mini_batches, micro_batch_size=o.micro_batch_size, clip_low=a.clip_low,
              clip_high=a.clip_high, clip_c=a.clip_c, grad_clip=o.grad_clip,
              on_backward=lambda: faults.point("update", step))  # fmt: skip
    if not fast.enabled:
        all_rows = list(range(seq.input_ids.shape[0]))
        return ppo_update(
            ctx.policy, ctx.optimizer, seq, old_logp, shaped(all_rows, old_logp), mask, distill=distill, **kw
        ), old_logp
    stats, seen = fused_update(ctx.policy, ctx.optimizer, seq, old_logp, shaped, mask, fast=fast, **kw)
    return stats, (seen if old_logp is None else old_logp)


def rlsd_step(ctx: StepContext, samples: list[Sample], step: int, seed: int) -> StepResult:
    """Run step `step` (1-based) on B samples; returns metrics and the per-token dump."""
    cfg, G, mb, t = ctx.cfg, ctx.cfg.rollout.n, ctx.cfg.optim.micro_batch_size, {}
    fast = fast_options(cfg, G)
    with timed(t, "rollout"):
        student_enc = encode_group(ctx, samples, ctx.prompts.student, G)  # (B*G, P)
        if ctx.engine is not None:  # colocated vLLM, same sampling settings
            rollouts = ctx.engine.sample([ctx.prompts.student(s) for s in samples], [s.pil_images for s in samples],
                                         group_size=G, seed=seed, cfg=cfg.rollout)  # fmt: skip
        else:
            rollouts = generate(ctx.policy, ctx.processor, student_enc, group_size=G, seed=seed,
                                max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                gen_batch_size=cfg.rollout.gen_batch_size,
                                share_prefill=cfg.rollout.share_prefill,
                                decode=cfg.rollout.hf_decode)  # fmt: skip
    faults.point("rollout", step)
    with timed(t, "reward"):
        answers = [s.answer for s in samples for _ in range(G)]
        types = [s.problem_type for s in samples for _ in range(G)]
        results = score_responses(
            rollouts.texts,
            answers,
            types,
            name=cfg.reward.name,
            timeout=cfg.reward.timeout,
            acc_weight=cfg.reward.acc_weight,
            format_weight=cfg.reward.format_weight,
        )
        rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)  # (B*G,)
    adv = get_advantage(cfg.algo.adv)(rewards, G, norm_std=cfg.algo.norm_std)  # (B*G,)
    mask = rollouts.response_mask.float()  # (B*G, T)
    if cfg.algo.dynamic_sampling:  # drop groups whose rewards are all equal: they carry no GRPO signal
        mask = mask * (~all_equal_groups(rewards, G)).repeat_interleave(G)[:, None].float()
    student = build_sequences(student_enc, rollouts)  # (B*G, P+T)
    lam = lam_at(step, cfg.algo.lam0, cfg.algo.lam_decay_steps, cfg.algo.lam_warmup_steps)
    teacher_logp, distill = None, None
    teacher_mask, demos = rollouts.response_mask, None  # (B*G, T): where Δ_t counts
    if needs_teacher(cfg, lam):
        with timed(t, "teacher"):
            teacher_enc, demos = teacher_encoding(ctx, samples, rollouts, results, G)  # (B*G, P'), includes r
            teacher_seq = build_sequences(teacher_enc, rollouts)  # (B*G, P'+T)
            teacher_fast = dataclasses.replace(
                fast, share_prefix=fast.share_prefix and cfg.algo.teacher_info != "sibling"
            )
            teacher_logp, _ = token_logprobs(ctx.teacher, teacher_seq, mb, fast=teacher_fast)  # (B*G, T)
            if demos is not None:  # SDPO: no Δ on rows without a demonstration
                has_demo = demonstration_mask(demos)  # (B*G,)
                teacher_mask = rollouts.response_mask * has_demo[:, None].to(teacher_mask.dtype)
        if cfg.algo.distill == "jsd":
            distill = jsd_term(ctx, teacher_seq, teacher_mask)
    shaped = partial(shape_rows, cfg, adv, teacher_logp, teacher_mask, mask, lam)  # Â_t of some rows
    student_logp = None  # fast path, one optimizer step: π_old = π_θ, the update's forward gives it
    if not (fast.enabled and cfg.optim.mini_batches == 1):
        with timed(t, "old_logp"):
            student_logp, _ = token_logprobs(ctx.policy, student, mb, fast=fast)  # (B*G, T), behaviour policy
    with timed(t, "update"):
        stats, student_logp = update(ctx, student, student_logp, shaped, mask, fast, step, distill)
    rows = list(range(len(rollouts.texts)))
    token_adv = shaped(rows, student_logp)  # (B*G, T), Â_t: what the update used
    delta = privileged_gain(teacher_logp, student_logp, teacher_mask)  # (B*G, T), Δ_t
    metrics = step_metrics(
        rollouts,
        rewards,
        torch.tensor([r.accuracy for r in results]),
        torch.tensor([r.format for r in results]),
        adv,
        delta,
        token_adv,
        lam,
        cfg.algo.eps_w,
        all_equal_groups(rewards, G),
    )
    metrics["rlsd/teacher_pass"] = float(teacher_logp is not None)
    if demos is not None:
        metrics["sdpo/demo_frac"] = float(has_demo.mean())  # rows with a demonstration
    dump = dump_rows(step, samples, rollouts, ctx.processor, results, adv, delta, token_adv, student_logp,
                     teacher_logp, lam, cfg.trainer.dump_max) if cfg.trainer.dump_every else []  # fmt: skip
    for row in dump if demos is not None else []:
        row["demo"] = demos[row["sample"]]  # SDPO: the row whose response the teacher saw (None: no Δ)
    return StepResult(metrics={**stats, **metrics, **t}, dump=dump)
