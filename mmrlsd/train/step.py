"""One RLSD training step, in the paper's order:

    prompts x -> rollout y ~ π_θ(·|x) -> reward R -> group advantage A -> student and teacher log-probs
      -> Δ_t = log P_T(y_t | x, r) - log P_S(y_t | x) -> token advantage Â_t -> PPO update

Δ_t is computed once per rollout batch from the behaviour policy's log-probs (the numbers the released code uses
with one optimizer step per rollout batch), which makes RLSD a pure advantage-shaping stage before the update.
The methods differ only through `mmrlsd.algo.methods` (how A and Δ_t become Â_t, and whether the teacher pass can
matter): GRPO runs the same code and skips the teacher pass. SDPO is a teacher prompt (`teacher_info: sibling`).
Online filtering (`algo.online_filtering`) replaces groups without signal by groups of more prompts before anything
else runs (`mmrlsd.train.refill`); `algo.rlsd_thought_only` / `rlsd_negative_only` keep Δ_t (and so the teacher's
reweighting) to the tokens they name.

The fast path (`model.packing`, `model.share_vision`, `model.share_prefix`, `model.logprob_chunk`,
`optim.token_budget`) runs the same computation with packed, vision-sharing, memory-lean passes. With one
optimizer step per rollout batch it also skips the separate behaviour pass: see `mmrlsd.train.update`, where the
update's own forward gives log P_S and Δ_t, Â_t are formed from it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mmrlsd import dist
from mmrlsd.algo.advantage import all_equal_groups, get_advantage
from mmrlsd.algo.methods import TokenRule, distill_coef, get_method, privileged_gain, token_advantages
from mmrlsd.algo.rlsd import evidence_weights, lam_at, reweight_tokens, thought_span_mask
from mmrlsd.algo.sdpo import demonstration_mask, pick_demonstrations, pick_feedback
from mmrlsd.config import Config
from mmrlsd.data.encoding import encode, repeat_encoding
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.model.logprobs import build_sequences, token_logprobs
from mmrlsd.model.packing import FastOptions, fast_options
from mmrlsd.model.vision import batch_vision_windows, linear_patch_embed
from mmrlsd.reward.rewards import score_responses
from mmrlsd.rollout.engine import HFEngine, RolloutEngine
from mmrlsd.train import faults
from mmrlsd.train.diagnostics import dump_rows, step_metrics
from mmrlsd.train.refill import REFILL_SEED_STRIDE, fill_groups, gather_groups
from mmrlsd.train.update import Credit, Distill, ppo_update
from mmrlsd.types import Groups, Sample, SeqBatch, StepResult


@dataclass
class StepContext:
    cfg: Config
    policy: torch.nn.Module
    teacher: torch.nn.Module  # the policy itself when algo.teacher_refresh == 0
    processor: object
    optimizer: torch.optim.Optimizer
    prompts: PromptBuilder
    engine: RolloutEngine | None = None  # rollout.engine; None: Hugging Face generate on the policy

    def __post_init__(self):
        if self.engine is None:
            self.engine = HFEngine(self.policy, self.processor)
        for model in (self.policy, self.teacher):  # the same model twice when the teacher is the policy
            if self.cfg.model.vision_windows:
                batch_vision_windows(model)
            if self.cfg.model.linear_patch_embed:
                linear_patch_embed(model)


@dataclass
class TeacherPass:
    """The teacher's view of the B*G responses."""

    logp: torch.Tensor  # (B*G, T) log P_T(y_t | x, r)
    mask: torch.Tensor  # (B*G, T) where Δ_t counts: the response, less SDPO rows without a demonstration
    seq: SeqBatch  # (B*G, P'+T) [teacher prompt | response]
    demos: list[int | None] | None  # SDPO: each row's demonstration (a row index); None for other teachers


@contextmanager
def timed(times: dict[str, float], name: str):
    """Stage timer: adds the stage's wall seconds to `times["time/<name>"]`."""
    t0 = time.perf_counter()
    yield
    times[f"time/{name}"] = times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


def rlsd_step(
    ctx: StepContext, samples: list[Sample], step: int, seed: int,
    more_prompts: Callable[[], list[Sample]] | None = None,
) -> StepResult:  # fmt: skip
    """Run optimizer step `step` (1-based) on B prompts; returns the metrics and the per-token dump.
    `more_prompts()` draws the next B prompts, for online filtering's refills."""
    cfg, a, o, t = ctx.cfg, ctx.cfg.algo, ctx.cfg.optim, {}
    fast, method = fast_options(cfg, cfg.rollout.n), get_method(a.token_adv)
    lam = lam_at(step, a.lam0, a.lam_decay_steps, a.lam_warmup_steps)  # λ
    rule = TokenRule(a.token_adv, lam=lam, eps_w=a.eps_w, coef=a.opsd_coef, distill=a.distill)  # Â_t rule
    g = sample_groups(ctx, samples, step, seed, t)  # x, y ~ π_θ(·|x), R (B*G,), A (B*G,)
    live, filt = None, {}
    if a.online_filtering:  # groups inside (filter_low, filter_high) only, refilled from more prompts
        g, live, filt = refill_groups(ctx, g, more_prompts, step, seed, t)  # live: (B*G,) 0 on padding
    mask = update_mask(g, a.dynamic_sampling, live)  # (B*G, T) the tokens the update counts
    student = build_sequences(g.encoding, g.rollouts)  # (B*G, P+T) [x | y]
    teacher = None
    if method.needs_teacher(lam, a.teacher_diagnostics):
        with timed(t, "teacher"):
            teacher = teacher_pass(ctx, g, fast)  # log P_T(y_t | x, r), (B*G, T)
    teacher_logp = teacher.logp if teacher is not None else None
    teacher_mask = teacher.mask if teacher is not None else g.rollouts.response_mask  # (B*G, T)
    if a.rlsd_thought_only or a.rlsd_negative_only:  # Δ_t = 0 (w_t = 1, Â_t = A) outside the named tokens
        thought = thought_mask(ctx, g) if a.rlsd_thought_only else None  # (B*G, T)
        teacher_mask = teacher_mask * reweight_tokens(g.adv, mask, thought, a.rlsd_negative_only)
    student_logp = delta = token_adv = credit = None
    if fast.enabled and o.mini_batches == 1:  # π_old = π_θ: the update's forward gives log P_S
        credit = Credit(g.adv, teacher_logp, teacher_mask, rule)
    else:
        with timed(t, "old_logp"):
            student_logp, _ = token_logprobs(ctx.policy, student, o.micro_batch_size, fast=fast)  # log P_S
        delta = privileged_gain(teacher_logp, student_logp, teacher_mask)  # (B*G, T) Δ_t
        token_adv = token_advantages(rule, g.adv, delta, mask)  # (B*G, T) Â_t
    distill = None
    if a.distill == "jsd":  # the distillation as a full-vocabulary loss term
        distill = Distill(ctx.teacher, teacher.seq, teacher_mask, a.jsd_beta, distill_coef(rule))
    with timed(t, "update"):
        u = ppo_update(ctx.policy, ctx.optimizer, student, mask, old_logp=student_logp, token_adv=token_adv,
                       credit=credit, fast=fast, distill=distill, **update_settings(cfg, step))  # fmt: skip
    if credit is not None:  # formed inside the update
        student_logp, delta, token_adv = u.student_logp, u.delta, u.token_adv
    weights = evidence_weights(g.adv, delta)  # (B*G, T) w_t, for the logs
    metrics = step_metrics(g, delta, weights, token_adv, lam, a.eps_w, teacher)
    dump = dump_rows(step, g, ctx.processor, delta, weights, token_adv, student_logp, teacher, lam,
                     cfg.trainer.dump_max) if cfg.trainer.dump_every else []  # fmt: skip
    return StepResult(metrics={**u.stats, **metrics, **filt, **t}, dump=dump)


def sample_groups(
    ctx: StepContext, samples: list[Sample], step: int, seed: int, t: dict[str, float]
) -> Groups:
    """Rollout, reward and group advantage of B prompts: G responses y ~ π_θ(·|x) each, their rewards R and
    A = (R - mean_G R) / (std_G R + eps). Call it again on other prompts to refill a filtered batch."""
    cfg, G = ctx.cfg, ctx.cfg.rollout.n
    with timed(t, "rollout"):
        texts, images, enc = student_prompts(ctx, samples)  # enc: (B*G, P), each prompt encoded once
        rollouts = ctx.engine.sample(texts, images, group_size=G, seed=seed, cfg=cfg.rollout, encoding=enc)
    faults.point("rollout", step)
    with timed(t, "reward"):
        r = cfg.reward
        results = score_responses(rollouts.texts, [s.answer for s in samples for _ in range(G)],
                                  [s.problem_type for s in samples for _ in range(G)], name=r.name,
                                  timeout=r.timeout, acc_weight=r.acc_weight, format_weight=r.format_weight)  # fmt: skip
        rewards = torch.tensor([x.reward for x in results], dtype=torch.float32)  # (B*G,)
    return Groups(samples, enc, rollouts, results, rewards, group_advantages(cfg, rewards, rollouts))


def student_prompts(ctx: StepContext, samples: list[Sample]) -> tuple[list[str], list, dict]:
    """The student prompts' texts and images, and their encoding with each prompt repeated G times."""
    texts, images = [ctx.prompts.student(s) for s in samples], [s.pil_images for s in samples]
    return texts, images, repeat_encoding(encode(ctx.processor, texts, images), ctx.cfg.rollout.n)


def group_advantages(cfg: Config, rewards: torch.Tensor, rollouts) -> torch.Tensor:
    """A `(B*G,)` by `algo.adv` (REINFORCE++ also needs the response lengths and sums over ranks)."""
    reduce = dist.all_reduce_tensor if dist.enabled() else None
    return get_advantage(cfg.algo.adv)(rewards, rollouts.group_size, norm_std=cfg.algo.norm_std,
                                       lengths=rollouts.response_mask.sum(dim=1), reduce=reduce)  # fmt: skip


def refill_groups(
    ctx: StepContext, g: Groups, more_prompts, step: int, seed: int, t: dict[str, float]
) -> tuple[Groups, torch.Tensor, dict[str, float]]:
    """Online filtering with refill (`mmrlsd.train.refill`): the B groups to train on, `(B*G,)` 1 on the rows the
    update counts (0 on padding groups, used only when the tries ran out), and the `filter/*` metrics."""
    a, G = ctx.cfg.algo, g.group_size
    if more_prompts is None:
        raise ValueError("algo.online_filtering needs more_prompts to refill the batch")

    def more(r: int) -> Groups:  # round r on the next prompts, with its own sampling seed
        return sample_groups(ctx, more_prompts(), step, seed + r * REFILL_SEED_STRIDE, t)

    kept, padding, stats = fill_groups(g, more, key=a.filter_key, low=a.filter_low, high=a.filter_high,
                                       max_rounds=a.max_refill_tries)  # fmt: skip
    tok = ctx.processor.tokenizer
    samples, rollouts, results, rewards = gather_groups(kept + padding, pad_id=tok.pad_token_id or 0)
    live = torch.tensor([1.0] * (len(kept) * G) + [0.0] * (len(padding) * G))  # (B*G,)
    adv = group_advantages(ctx.cfg, rewards, rollouts) * live  # (B*G,) A, 0 on padding
    return Groups(samples, student_prompts(ctx, samples)[2], rollouts, results, rewards, adv), live, stats


def update_mask(g: Groups, dynamic_sampling: bool, live: torch.Tensor | None = None) -> torch.Tensor:
    """`(B*G, T)` response tokens the update counts; with `dynamic_sampling`, none of a group whose rewards are all
    equal (A = 0 there: no GRPO signal, but they would still count in the token mean); none of the rows where
    `live` `(B*G,)` is 0 (online filtering's padding)."""
    mask = g.rollouts.response_mask.float()  # (B*G, T)
    if dynamic_sampling:
        keep = ~all_equal_groups(g.rewards, g.group_size)  # (B,)
        mask = mask * keep.repeat_interleave(g.group_size)[:, None].float()
    if live is not None:
        mask = mask * live[:, None]
    return mask


def thought_mask(ctx: StepContext, g: Groups) -> torch.Tensor:
    """`(B*G, T)` 1 inside the responses' <thought>...</thought> spans (`algo.rlsd_thought_only`)."""
    tok = ctx.processor.tokenizer
    ids = [tok.encode(tag, add_special_tokens=False) for tag in ("<thought>", "</thought>")]
    return thought_span_mask(g.rollouts.response_ids, g.rollouts.response_mask, *ids)


def teacher_pass(ctx: StepContext, g: Groups, fast: FastOptions) -> TeacherPass:
    """log P_T(y_t | x, r) of every response, the teacher prompt carrying the privileged information r. SDPO rows
    without a demonstration get no Δ_t; their prompts differ within a group, so no shared prefix there."""
    enc, demos = teacher_encoding(ctx, g)  # (B*G, P')
    mask = g.rollouts.response_mask  # (B*G, T)
    if demos is not None:
        mask = mask * demonstration_mask(demos)[:, None].to(mask.dtype)  # (B*G, T)
    seq = build_sequences(enc, g.rollouts)  # (B*G, P'+T)
    fast = dataclasses.replace(fast, share_prefix=fast.share_prefix and demos is None)
    logp, _ = token_logprobs(ctx.teacher, seq, ctx.cfg.optim.micro_batch_size, fast=fast)  # (B*G, T)
    return TeacherPass(logp, mask, seq, demos)


def teacher_encoding(ctx: StepContext, g: Groups) -> tuple[dict, list[int | None] | None]:
    """The teacher prompts of the B*G rows, and for `teacher_info: sibling` (SDPO) each row's demonstration.

    `answer | solution`: one teacher prompt per sample, repeated G times. `sibling`: each row's prompt carries the
    first (`algo.sdpo_pick: shortest`: the shortest) other correct response of its group (`demos[i]`, its row
    index), with `shortest` also the shortest other incorrect one as `feedback`; rows without a correct one get
    the student prompt."""
    G = g.group_size
    if ctx.cfg.algo.teacher_info != "sibling":
        texts = [ctx.prompts.teacher(s) for s in g.samples]
        return repeat_encoding(encode(ctx.processor, texts, [s.pil_images for s in g.samples]), G), None
    correct, responses = [x.accuracy >= 1.0 for x in g.results], g.rollouts.texts
    lengths = g.rollouts.response_mask.sum(dim=1).tolist() if ctx.cfg.algo.sdpo_pick == "shortest" else None
    demos = pick_demonstrations(correct, G, lengths)  # the first (or shortest) other correct row
    feedback = pick_feedback(correct, G, lengths) if lengths else [None] * len(demos)  # shortest incorrect
    texts = [ctx.prompts.teacher(g.samples[i // G], demonstration=responses[d],
                                 feedback=responses[f] if f is not None else None) if d is not None
             else ctx.prompts.student(g.samples[i // G]) for i, (d, f) in enumerate(zip(demos, feedback))]  # fmt: skip
    return encode(ctx.processor, texts, [g.samples[i // G].pil_images for i in range(len(texts))]), demos


def update_settings(cfg: Config, step: int) -> dict:
    """`ppo_update`'s settings from the config (the fault point lets tests interrupt a step mid-update)."""
    o, a = cfg.optim, cfg.algo
    return dict(mini_batches=o.mini_batches, micro_batch_size=o.micro_batch_size, clip_low=a.clip_low,
                clip_high=a.clip_high, clip_c=a.clip_c, grad_clip=o.grad_clip,
                on_backward=lambda: faults.point("update", step))  # fmt: skip
