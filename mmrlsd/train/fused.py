"""The policy update on the fast path (issue #6): `ppo_update`'s loss, token mean and skip rules, with
packed token-budget micro-batches, vision features shared per prompt and memory-lean log-probs.

Δ inside the update. With one optimizer step per rollout batch (`mini_batches == 1`) the behaviour policy
is the current policy, so the step skips the old-log-prob pass (`old_logp=None`): the ratio's denominator is
the detached log-prob of the same forward (ρ_t = 1, ∇ρ_t = ∇log π_θ(y_t)), and Δ_t = log P_T(y_t) - log P_S(y_t)
is formed per micro-batch from it, before the optimizer step, i.e. from the behaviour policy: the same numbers
as the separate pass (spec section 3 note), one forward fewer.

Shared vision with gradients: the tower runs once per mini-batch on each prompt's images; the micro-batches
read detached leaf copies, and after the last one the leaves' summed gradients go through the tower once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmrlsd import dist
from mmrlsd.algo.loss import ppo_clip_loss
from mmrlsd.model.logprobs import fast_forward_logprobs
from mmrlsd.model.packing import FastOptions, plan_micro_batches, rope_positions
from mmrlsd.model.vision import vision_features
from mmrlsd.train.update import step_if_finite, update_stats
from mmrlsd.types import SeqBatch

TokenAdv = Callable[[list[int], torch.Tensor], torch.Tensor]
"""`(rows, student_logp (n, T)) -> Â (n, T)`: token advantages of `rows` given the student's log-probs."""


def fused_update(
    policy, optimizer, seq: SeqBatch, old_logp: torch.Tensor | None, token_adv: TokenAdv, mask: torch.Tensor, *,
    fast: FastOptions, mini_batches: int, micro_batch_size: int, clip_low: float, clip_high: float, clip_c: float,
    grad_clip: float, on_backward=None,
) -> tuple[dict[str, float], torch.Tensor]:  # fmt: skip
    """`ppo_update` on the fast path. Returns its stats and the `(N, T)` detached log-probs the update's forward
    saw (the behaviour policy's when `old_logp` is None, since then `mini_batches` must be 1)."""
    if old_logp is None and mini_batches != 1:
        raise ValueError("old_logp=None (Δ inside the update) needs mini_batches == 1")
    n, T = seq.input_ids.shape[0], seq.response_len
    params = [p for group in optimizer.param_groups for p in group["params"]]  # FSDP2: the sharded ones
    device = next(policy.parameters()).device
    positions = rope_positions(policy, seq)  # (3, N, P+T)
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    sums = {"loss": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio": 0.0, "entropy": 0.0}
    grad_norms, skipped, tokens_seen = [], 0, 0.0
    seen = torch.zeros(n, T)  # (N, T) log-probs of the update's forward, detached
    policy.train()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        num_tokens = dist.all_reduce_sum(float(mask[lo:hi].sum()))  # global token count of this mini-batch
        optimizer.zero_grad(set_to_none=True)
        rows_mb = list(range(lo, hi))
        tower = vision_features(policy, seq, rows_mb, fast.group_size) if fast.share_vision else None
        shared = tower.detached() if tower is not None else None
        finite, mb_sums = True, dict.fromkeys(sums, 0.0)
        for rows in plan_micro_batches(policy, seq, rows_mb, fast, micro_batch_size):
            weight = 1.0 if rows else 0.0
            rows = rows or rows_mb[:1]
            logp, ent = fast_forward_logprobs(policy, seq, rows, fast, positions, shared, with_entropy=True)
            seen[rows] = logp.detach().float().cpu()
            old = old_logp[rows] if old_logp is not None else seen[rows]  # (n, T)
            m = mask[rows].to(device) * weight
            loss, st = ppo_clip_loss(
                logp, old.to(device), token_adv(rows, old).to(device), m, clip_low=clip_low, clip_high=clip_high,
                clip_c=clip_c, num_tokens=max(num_tokens, 1.0),
            )  # fmt: skip
            finite = finite and bool(torch.isfinite(loss))
            (loss * dist.world_size()).backward()  # FSDP averages over ranks; the loss is a global token mean
            if on_backward is not None:
                on_backward()
            mb_sums["loss"] += float(loss.detach())  # this rank's share
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
    return stats, seen
