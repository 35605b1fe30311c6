"""The policy update: PPO clipped loss over micro-batches, global token mean, AdamW, grad-norm clip; one loop for
the plain and the fast forward.

The loss of every micro-batch is divided by the token count of its whole mini-batch (summed over ranks when
distributed), so accumulating micro-batch gradients gives exactly the gradient of one big batch. A mini-batch
whose loss or gradient is not finite is skipped: no optimizer step, weights and optimizer state unchanged.

Forward. With `fast` off, micro-batches are runs of `micro_batch_size` rows through the model's own padded forward.
With it on (`FastOptions`), they are packed token-budget micro-batches with memory-lean log-probs, and with
`fast.share_vision` the vision tower runs once per mini-batch on each prompt's images: the micro-batches read
detached leaf copies, and after the last one the leaves' summed gradients go through the tower once.

Fused behaviour pass. The step normally hands the update the behaviour log-probs (`old_logp`) and the token
advantages Â_t it computed from them. With one optimizer step per rollout batch the behaviour policy is the
policy being updated (π_old = π_θ), so the fast path skips the separate no-grad pass: `old_logp` is None and the
update is given `credit` instead, the inputs Â_t is formed from (A, the teacher's log-probs, where Δ_t counts,
and the `TokenRule`). Each micro-batch's forward then supplies log P_S(y_t) (detached; ρ_t = 1, ∇ρ_t =
∇log π_θ(y_t)), and Δ_t and Â_t are formed from it by the same `mmrlsd.algo` functions the step uses, before the
optimizer step, i.e. from the behaviour policy: the same numbers as the separate pass, one forward fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmrlsd import dist
from mmrlsd.algo.loss import ppo_clip_loss
from mmrlsd.algo.methods import TokenRule, privileged_gain, token_advantages
from mmrlsd.algo.opsd import generalized_jsd
from mmrlsd.model.logprobs import fast_forward_logprobs, logprobs_from_logits, response_logits, slice_seq
from mmrlsd.model.packing import FastOptions, packed_kernel, plan_micro_batches, rope_positions
from mmrlsd.model.vision import vision_features
from mmrlsd.types import SeqBatch


@dataclass
class Credit:
    """What Δ_t and Â_t are formed from, for an update that sees the student's log-probs only in its forward."""

    adv: torch.Tensor  # (N,) A
    teacher_logp: torch.Tensor | None  # (N, T) log P_T(y_t); None without a teacher pass
    teacher_mask: torch.Tensor  # (N, T) where Δ_t counts
    rule: TokenRule


@dataclass
class Distill:
    """`algo.distill: jsd`: the loss term `coef · Σ_t JSD_β(P_T,t || P_S,t) / num_tokens` over the full vocabulary,
    the teacher's logits recomputed without gradient per micro-batch (plain forward only)."""

    teacher: torch.nn.Module
    teacher_seq: SeqBatch  # (N, P'+T) the teacher's prompts with the same responses
    teacher_mask: torch.Tensor  # (N, T) where the teacher's distribution counts
    beta: float
    coef: float


@dataclass
class UpdateResult:
    stats: dict[str, float]
    student_logp: torch.Tensor  # (N, T) the behaviour log-probs the update used
    delta: torch.Tensor | None  # (N, T) Δ_t it formed (with `credit`), else None
    token_adv: torch.Tensor | None  # (N, T) Â_t it formed (with `credit`), else None


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of all gradients (over FSDP shards and ranks); scales them to `max_norm` when above it."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards are disjoint
    sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
    sharded = any(hasattr(g, "to_local") for g in grads)
    total = math.sqrt(dist.all_reduce_sum(float(sq)) if sharded else float(sq))
    if max_norm > 0 and total > max_norm and math.isfinite(total):
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.detach().mul_(coef)
    return total


def step_if_finite(optimizer, params: list[torch.Tensor], grad_clip: float, finite: bool) -> float | None:
    """Clip and take the optimizer step; with a non-finite loss or gradient drop the gradients instead (weights
    and optimizer state unchanged). Returns the grad norm, or None when the mini-batch was skipped."""
    grad_norm = clip_grad_norm(params, grad_clip)
    if not finite or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return grad_norm


def update_stats(sums: dict[str, float], grad_norms: list[float], skipped: int, mini_batches: int,
                 tokens_seen: float) -> dict[str, float]:  # fmt: skip
    """Token means over the mini-batches that were applied."""
    denom, ok = max(tokens_seen, 1.0), mini_batches - skipped
    extra = {"actor/distill_loss": sums["distill"] / max(ok, 1)} if "distill" in sums else {}
    return extra | {
        "loss": sums["loss"] / max(ok, 1),
        "actor/pg_clip_frac": sums["clip_frac"] / denom,
        "actor/dual_clip_frac": sums["dual_clip_frac"] / denom,
        "actor/ratio_mean": sums["ratio"] / denom,
        "actor/entropy": sums["entropy"] / denom,
        "actor/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        "actor/skipped_updates": float(skipped),
    }


def micro_batch_rows(policy, seq: SeqBatch, rows: list[int], fast: FastOptions, micro_batch_size: int):
    """The micro-batches (lists of rows) of one mini-batch: runs of `micro_batch_size` rows, or the fast path's
    plan (under torch.distributed padded with empty lists to the ranks' maximum)."""
    if not fast.enabled:
        return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    return plan_micro_batches(policy, seq, rows, fast, micro_batch_size)


def ppo_update(
    policy, optimizer, seq: SeqBatch, mask: torch.Tensor, *, old_logp: torch.Tensor | None = None,
    token_adv: torch.Tensor | None = None, credit: Credit | None = None, mini_batches: int, micro_batch_size: int,
    clip_low: float, clip_high: float, clip_c: float, grad_clip: float, fast: FastOptions | None = None,
    distill: Distill | None = None, on_backward=None,
) -> UpdateResult:  # fmt: skip
    """`mini_batches` optimizer steps on N sequences `seq` with response mask `mask` `(N, T)`.

    Give either `old_logp` and `token_adv` (`(N, T)` each), or `credit` alone (the fused behaviour pass, see the
    module docstring: needs `mini_batches == 1`). Returns the stats (token means over the whole batch) and the
    log-probs, Δ_t and Â_t used."""
    if (old_logp is None) != (token_adv is None) or (old_logp is None) == (credit is None):
        raise ValueError("ppo_update takes old_logp and token_adv, or credit alone")
    if credit is not None and mini_batches != 1:
        raise ValueError("the fused behaviour pass (credit) needs mini_batches == 1")
    fast = fast or FastOptions()
    if distill is not None and fast.enabled:
        raise ValueError("algo.distill jsd runs on the plain forward (fast path off)")
    n, T = seq.input_ids.shape[0], seq.response_len
    # the optimizer's own list: under FSDP2 `policy.parameters()` can return the root's temporary unsharded
    # tensors right after a no-grad forward, which never receive gradients
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = next(policy.parameters()).device
    positions = rope_positions(policy, seq) if fast.enabled else None  # (3, N, P+T)
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    sums = {"loss": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio": 0.0, "entropy": 0.0}
    if distill is not None:
        sums["distill"] = 0.0
    grad_norms, skipped, tokens_seen = [], 0, 0.0
    seen, delta, adv_used = (torch.zeros(n, T) for _ in range(3))  # (N, T) each; filled with `credit` only
    policy.train()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        num_tokens = dist.all_reduce_sum(float(mask[lo:hi].sum()))  # global token count of this mini-batch
        optimizer.zero_grad(set_to_none=True)
        rows_mb = list(range(lo, hi))
        tower = vision_features(policy, seq, rows_mb, fast.group_size) if fast.share_vision else None
        shared = tower.detached() if tower is not None else None
        finite, mb_sums = True, dict.fromkeys(sums, 0.0)
        for rows in micro_batch_rows(policy, seq, rows_mb, fast, micro_batch_size):
            weight = 1.0 if rows else 0.0  # an empty micro-batch keeps FSDP's collectives in step
            rows = rows or rows_mb[:1]
            if fast.enabled:
                logp, ent = fast_forward_logprobs(
                    policy, seq, rows, fast, positions, shared, with_entropy=True
                )
            else:
                sub = slice_seq(seq, rows[0], rows[-1] + 1)
                logits = response_logits(policy, sub)  # (n, T, V)
                logp, ent = logprobs_from_logits(logits, sub, with_entropy=True)
            m = mask[rows].to(device) * weight
            if credit is None:
                old, adv_t = old_logp[rows], token_adv[rows]  # (n, T)
            else:  # π_old = π_θ: Δ_t and Â_t from this forward's log-probs
                seen[rows] = logp.detach().float().cpu()
                old = seen[rows]
                t_rows = credit.teacher_logp[rows] if credit.teacher_logp is not None else None
                d = privileged_gain(t_rows, old, credit.teacher_mask[rows])  # (n, T) Δ_t
                adv_t = token_advantages(credit.rule, credit.adv[rows], d, mask[rows])  # (n, T) Â_t
                delta[rows], adv_used[rows] = d, adv_t
            loss, st = ppo_clip_loss(
                logp, old.to(device), adv_t.to(device), m, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
                num_tokens=max(num_tokens, 1.0),
            )  # fmt: skip
            if distill is not None:
                with torch.no_grad():
                    t_logits = response_logits(
                        distill.teacher, slice_seq(distill.teacher_seq, rows[0], rows[-1] + 1)
                    )
                tm = m * distill.teacher_mask[rows].to(device)  # (n, T)
                term = distill.coef * generalized_jsd(
                    logits, t_logits, tm, distill.beta, max(num_tokens, 1.0)
                )
                loss = loss + term
                mb_sums["distill"] += float(term.detach())
            finite = finite and bool(torch.isfinite(loss))
            # FSDP averages gradients over ranks; the loss is already normalised by the global token count,
            # so scale by the world size to make the reduced gradient the global token-mean gradient.
            with packed_kernel(policy, fast):  # checkpointed layers recompute with the packed kernel
                (loss * dist.world_size()).backward()
            if on_backward is not None:
                on_backward()
            mb_sums["loss"] += float(loss.detach())  # this rank's share; summed over ranks by the loop
            mb_sums["entropy"] += float((ent * m).sum())
            for k, v in st.items():
                mb_sums[k] += float(v)
        if tower is not None:
            tower.backward_from(shared)  # the vision tower's backward, once per prompt
        grad_norm = step_if_finite(optimizer, params, grad_clip, finite)
        if grad_norm is None:
            skipped += 1
            continue
        grad_norms.append(grad_norm)
        for k in sums:
            sums[k] += mb_sums[k]
        tokens_seen += float(mask[lo:hi].sum())
    optimizer.zero_grad(set_to_none=True)
    stats = update_stats(sums, grad_norms, skipped, mini_batches, tokens_seen)
    if credit is None:
        return UpdateResult(stats, old_logp, None, None)
    return UpdateResult(stats, seen, delta, adv_used)
