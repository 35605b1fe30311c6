"""RLSD token advantages: the reward sets the sign, the privileged teacher sets each token's magnitude.

    Δ_t  = log P_T(y_t) - log P_S(y_t)                       (stop-gradient, sampled token only)
    w_t  = exp(sign(A) · Δ_t)                                 (P_T/P_S if A > 0, P_S/P_T if A < 0)
    Â_t  = A · ((1 - λ) + λ · clip(w_t, 1 - ε_w, 1 + ε_w))

This is what the authors' released code runs, and what mmrlsd runs. The printed paper's "final objective"
(Eq. 16) puts w_t inside a one-sided `min` with no policy ratio; we follow the code: Â_t replaces A inside the
usual PPO clipped surrogate (`mmrlsd.algo.loss.ppo_clip_loss`). No normalisation of w over the sequence or group.
"""

from __future__ import annotations

import torch


def evidence_weights(advantages: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`w_t = exp(sign(A)·Δ_t)`: `(B,)`, `(B, T)` -> `(B, T)`. Always > 0; 1 where A = 0."""
    return torch.exp(torch.sign(advantages)[:, None] * delta)  # (B, T)


def lam_at(step: int, lam0: float, decay_steps: int, warmup_steps: int = 0) -> float:
    """λ at optimizer step `step`, counted from 1 as the released code counts them (the first update is step 1).

    With warm-up W > 0: λ_0·step/W for steps before W. From step W on (from step 0 when W = 0) a linear decay,
    λ_0·max(1 - (step - W)/D, 0): without warm-up the first update uses λ_0·(1 - 1/D) and λ reaches 0 at step D;
    with it, λ peaks at λ_0 at step W and reaches 0 at step W + D.

    >>> [lam_at(s, 0.5, decay_steps=4) for s in range(1, 6)]
    [0.375, 0.25, 0.125, 0.0, 0.0]
    """
    if step < warmup_steps:
        return lam0 * step / warmup_steps
    t = step - warmup_steps
    return max(0.0, lam0 * (1.0 - t / decay_steps)) if decay_steps > 0 else 0.0


def rlsd_token_advantages(
    advantages: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, lam: float, eps_w: float
) -> torch.Tensor:
    """`Â_t = A·((1-λ) + λ·clip(exp(sign(A)·Δ_t), 1-ε_w, 1+ε_w))`, zero on masked tokens.

    Args:
        advantages: `(B,)` group advantage A of each response.
        delta: `(B, T)` Δ_t = log P_teacher(y_t) - log P_student(y_t); treated as a constant (detached).
        mask: `(B, T)` 1 for response tokens, 0 for padding.
        lam: λ in [0, 1]; 0 gives exactly GRPO (Â_t = A).
        eps_w: ε_w; 0 also gives exactly GRPO.
    Returns:
        `(B, T)` token advantages; sign(Â_t) = sign(A) on every unmasked token.

    >>> import math
    >>> out = rlsd_token_advantages(torch.tensor([1.0, -1.0]), torch.full((2, 1), math.log(2)),
    ...                             torch.ones(2, 1), lam=0.5, eps_w=0.2)
    >>> [round(x, 6) for x in out.flatten().tolist()]
    [1.1, -0.9]
    """
    w = evidence_weights(advantages, delta.detach())  # (B, T)
    w = w.clamp(1.0 - eps_w, 1.0 + eps_w)  # (B, T)
    scale = (1.0 - lam) + lam * w  # (B, T)
    return advantages[:, None] * scale * mask  # (B, T)


def grpo_token_advantages(
    advantages: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, lam: float = 0.0, eps_w: float = 0.0
) -> torch.Tensor:
    """GRPO: `Â_t = A` on every response token (RLSD with λ = 0); `delta` is ignored."""
    return advantages[:, None] * mask.to(advantages.dtype)  # (B, T)


def opsd_token_advantages(
    advantages: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, lam: float = 0.0, eps_w: float = 0.0
) -> torch.Tensor:
    """OPSD, sampled-token reverse KL: `Â_t = Δ_t` (no reward). Its policy gradient is -∇ KL(student || teacher)
    estimated on the sampled tokens."""
    return delta.detach() * mask  # (B, T)


def grpo_opsd_token_advantages(
    advantages: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, coef: float
) -> torch.Tensor:
    """GRPO + OPSD (additive): `Â_t = A + coef·Δ_t`. The sum of the two policy-gradient losses equals one loss
    with the summed advantages."""
    return (advantages[:, None] + coef * delta.detach()) * mask  # (B, T)
