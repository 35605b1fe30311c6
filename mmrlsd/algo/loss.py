"""The PPO clipped surrogate with dual clip, aggregated as a global token mean (DAPO style)."""

from __future__ import annotations

import torch


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    token_adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_c: float,
    num_tokens: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`L = Σ_t mask_t · ℓ_t / num_tokens`, with per token

        ρ_t = exp(logp_t - old_logp_t)
        ℓ_t = -min(ρ_t Â_t, clip(ρ_t, 1-ε_low, 1+ε_high) Â_t)          (standard PPO)
        ℓ_t = min(ℓ_t, -c·Â_t)              where Â_t < 0, if c > 0      (dual clip: bounds the loss
                                                                            when ρ_t is very large)

    Args:
        logp: `(B, T)` current-policy log-probs of the sampled tokens (with grad).
        old_logp: `(B, T)` behaviour-policy log-probs (no grad).
        token_adv: `(B, T)` Â_t.
        mask: `(B, T)` response-token mask.
        num_tokens: the token count of the WHOLE optimizer step (all micro-batches and ranks), so that summing
            the micro-batch losses gives the global token mean regardless of how the batch is split.
    Returns:
        `(loss, stats)`; stats are detached sums over this micro-batch's tokens (divide by the token count
        to report means): `clip_frac` (ratio clip active), `dual_clip_frac`, `ratio`.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    surr1 = ratio * token_adv  # (B, T)
    surr2 = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * token_adv  # (B, T)
    loss_t = -torch.min(surr1, surr2)  # (B, T)
    dual = torch.zeros_like(loss_t, dtype=torch.bool)
    if clip_c > 0:
        cap = -clip_c * token_adv  # (B, T) upper bound on the loss of a negative-advantage token
        dual = (token_adv < 0) & (loss_t > cap)
        loss_t = torch.where(token_adv < 0, torch.min(loss_t, cap), loss_t)  # (B, T)
    loss = (loss_t * mask).sum() / num_tokens
    with torch.no_grad():
        clipped = (surr2 < surr1) & (mask > 0)  # the clipped branch was taken by the min
        stats = {
            "clip_frac": clipped.float().sum(),
            "dual_clip_frac": (dual & (mask > 0)).float().sum(),
            "ratio": (ratio * mask).sum(),
        }
    return loss, stats
