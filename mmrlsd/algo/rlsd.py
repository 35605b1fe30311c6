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


def reweight_tokens(
    advantages: torch.Tensor, mask: torch.Tensor, thought_mask: torch.Tensor | None = None,
    negative_only: bool = False,
) -> torch.Tensor:  # fmt: skip
    """`(B, T)` the tokens whose Â_t the teacher reweights, the release's `rlsd_negative_only` and
    `rlsd_thought_only` switches: all response tokens (`mask`), only those of responses with A < 0
    (`negative_only`), only those inside `<thought>` spans (`thought_mask`, see `thought_span_mask`), or both.
    The other tokens keep Â_t = A (plain GRPO): multiplying Δ_t by this mask does exactly that, since Δ_t = 0
    gives w_t = 1 and Â_t = A·((1-λ) + λ·1) = A.

    >>> reweight_tokens(torch.tensor([1.0, -1.0]), torch.ones(2, 3), torch.tensor([[0, 1, 1], [1, 1, 0]]),
    ...                 negative_only=True).tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    """
    out = mask.float()  # (B, T)
    if negative_only:
        out = out * (advantages < 0).float()[:, None]  # (B, T)
    if thought_mask is not None:
        out = out * thought_mask.float()  # (B, T)
    return out


def thought_span_mask(
    response_ids: torch.Tensor, mask: torch.Tensor, start_ids: list[int], end_ids: list[int]
) -> torch.Tensor:
    """`(B, T)` 1 on the response tokens strictly inside `<thought> ... </thought>`, as the release marks them:
    a span opens where the token ids `start_ids` (the tokenizer's encoding of "<thought>") occur and closes where
    `end_ids` ("</thought>") occur; the tag tokens themselves are 0, a span left open runs to the end, a
    response may hold several spans. Matching is on token ids, so a tag the model spelt with other tokens
    (merged with a neighbouring character) is not seen.

    >>> thought_span_mask(torch.tensor([[7, 1, 5, 5, 2, 9, 1, 5]]), torch.ones(1, 8), [1], [2]).tolist()
    [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]]
    """
    s, e = list(start_ids), list(end_ids)
    if not s or not e:
        raise ValueError("thought_span_mask: the <thought> and </thought> token ids must be non-empty")
    ids, out = response_ids.tolist(), torch.zeros(response_ids.shape)
    for i, row in enumerate(ids):
        inside, t = False, 0
        while t < len(row):
            tag = e if inside else s
            if row[t : t + len(tag)] == tag:
                inside, t = not inside, t + len(tag)
                continue
            if inside:
                out[i, t] = 1.0
            t += 1
    return out * mask.float().cpu()  # (B, T)


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


def opsd_release_token_advantages(
    advantages: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, coef: float
) -> torch.Tensor:
    """The authors' release's OPSD loss in token-advantage form: `Â_t = coef` on every response token.

    The release minimises `coef · token_mean(log P_T(y_t) - log P_S(y_t))` (its default `kl` estimator, α = 0.5)
    with the teacher's log-probs detached, so its gradient is `-coef · ∇ token_mean log π_θ(y_t)`: the policy
    gradient of this constant Â_t at ratio 1. Δ_t enters the logged loss value, not the gradient: the update
    raises the likelihood of every sampled token alike (self-imitation). `advantages` and `delta` are unused.

    >>> opsd_release_token_advantages(torch.zeros(2), torch.ones(2, 2), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 0.5)
    tensor([[0.5000, 0.5000],
            [0.5000, 0.0000]])
    """
    return coef * mask.float()  # (B, T)
