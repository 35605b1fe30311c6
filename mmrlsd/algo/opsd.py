"""OPSD's full-vocabulary distillation loss: the generalised Jensen-Shannon divergence (GKD, Agarwal et al.)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    num_tokens: float,
) -> torch.Tensor:
    """`Σ_t mask_t · JSD_β(P_T,t || P_S,t) / num_tokens` over the full vocabulary, per token:

        M = β·P_T + (1-β)·P_S
        JSD_β = β·KL(P_T || M) + (1-β)·KL(P_S || M)

    β = 0 and β = 1 reduce to forward KL(P_T||P_S) and reverse KL(P_S||P_T) as in GKD/TRL.
    Args: `student_logits`, `teacher_logits`: `(B, T, V)`; `mask`: `(B, T)`. The teacher side is detached.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    t = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # (B, T, V)
    if beta == 0.0:
        per_tok = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # KL(T||S), (B, T)
    elif beta == 1.0:
        per_tok = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)  # KL(S||T), (B, T)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)  # log M
        kl_t = F.kl_div(m, t, log_target=True, reduction="none").sum(-1)  # KL(T||M), (B, T)
        kl_s = F.kl_div(m, s, log_target=True, reduction="none").sum(-1)  # KL(S||M), (B, T)
        per_tok = beta * kl_t + (1 - beta) * kl_s  # (B, T)
    return (per_tok * mask).sum() / num_tokens
