"""The policy update: PPO clipped loss over micro-batches, global token-mean, AdamW, grad-norm clip.

The loss of every micro-batch is divided by the token count of its whole mini-batch (summed over ranks when
distributed), so accumulating micro-batch gradients gives exactly the gradient of one big batch. A mini-batch
whose loss or gradient is not finite is skipped: no optimizer step, weights and optimizer state unchanged.
"""

from __future__ import annotations

import math

import torch

from mmrlsd import dist
from mmrlsd.algo.loss import ppo_clip_loss
from mmrlsd.model.logprobs import forward_logprobs, logprobs_from_logits, response_logits, slice_seq
from mmrlsd.types import SeqBatch


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


def ppo_update(
    policy, optimizer, seq: SeqBatch, old_logp: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor, *,
    mini_batches: int, micro_batch_size: int, clip_low: float, clip_high: float, clip_c: float, grad_clip: float,
    on_backward=None, distill=None,
) -> dict[str, float]:  # fmt: skip
    """One or more optimizer steps on N sequences; returns scalar stats (token means over the whole batch).

    `distill(start, stop, logits, mask, num_tokens) -> loss`: an extra loss term of rows start..stop given the
    student's `(n, T, V)` response logits (OPSD's full-vocabulary JSD), normalised like the PPO term."""
    n = seq.input_ids.shape[0]
    # the optimizer's own list: under FSDP2 `policy.parameters()` can return the root's temporary unsharded
    # tensors right after a no-grad forward, which never receive gradients
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    sums = {"loss": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio": 0.0, "entropy": 0.0}
    if distill is not None:
        sums["distill"] = 0.0
    grad_norms, skipped, tokens_seen = [], 0, 0.0
    device = next(policy.parameters()).device
    policy.train()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        num_tokens = dist.all_reduce_sum(float(mask[lo:hi].sum()))  # global token count of this mini-batch
        optimizer.zero_grad(set_to_none=True)
        finite = True
        mb_sums = dict.fromkeys(sums, 0.0)
        for start in range(lo, hi, micro_batch_size):
            stop = min(hi, start + micro_batch_size)
            sub = slice_seq(seq, start, stop)
            if distill is None:
                logp, ent = forward_logprobs(policy, sub, with_entropy=True)
            else:
                logits = response_logits(policy, sub)  # (n, T, V)
                logp, ent = logprobs_from_logits(logits, sub, with_entropy=True)
            m = mask[start:stop].to(device)
            loss, st = ppo_clip_loss(
                logp, old_logp[start:stop].to(device), token_adv[start:stop].to(device), m,
                clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, num_tokens=max(num_tokens, 1.0),
            )  # fmt: skip
            if distill is not None:
                term = distill(start, stop, logits, m, max(num_tokens, 1.0))
                loss = loss + term
                mb_sums["distill"] += float(term.detach())
            if not torch.isfinite(loss):
                finite = False
            # FSDP averages gradients over ranks; the loss is already normalised by the global token count,
            # so scale by the world size to make the reduced gradient the global token-mean gradient.
            (loss * dist.world_size()).backward()
            if on_backward is not None:
                on_backward()
            mb_sums["loss"] += float(loss.detach())  # this rank's share; summed over ranks by the loop
            mb_sums["entropy"] += float((ent * m).sum())
            for k, v in st.items():
                mb_sums[k] += float(v)
        grad_norm = step_if_finite(optimizer, params, grad_clip, finite)
        if grad_norm is None:
            skipped += 1
            continue
        grad_norms.append(grad_norm)
        for k in sums:
            sums[k] += mb_sums[k]
        tokens_seen += float(mask[lo:hi].sum())
    optimizer.zero_grad(set_to_none=True)
    return update_stats(sums, grad_norms, skipped, mini_batches, tokens_seen)
