"""Group advantages: one scalar A per response from the verifier rewards of its group of G samples.

An estimator is called as `fn(rewards, group_size, norm_std=..., lengths=..., reduce=...)`: `lengths` `(B*G,)`
response tokens per row and `reduce` (a sum over ranks, identity in one process) serve the estimators that
normalise over the whole batch's tokens (REINFORCE++); the group estimators ignore them."""

from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}


def register_advantage(name: str):
    def wrap(fn):
        ADVANTAGES[name] = fn
        return fn

    return wrap


def get_advantage(name: str) -> Callable[..., torch.Tensor]:
    if name not in ADVANTAGES:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADVANTAGES))}")
    return ADVANTAGES[name]


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    norm_std: bool = True,
    eps: float = 1e-6,
    lengths=None,
    reduce=None,
) -> torch.Tensor:
    """GRPO: `A_i = (R_i - mean_G(R)) / (std_G(R) + eps)` (or `R_i - mean_G(R)` with `norm_std=False`).

    Args:
        rewards: `(B*G,)`, responses of one prompt contiguous (prompt b owns rows b*G .. b*G+G-1).
        group_size: G.
    Returns:
        `(B*G,)` advantages; exactly 0 for a group whose rewards are all equal. `std` is the unbiased sample
        standard deviation (torch's default, as in verl/EasyR1).

    >>> [round(a, 4) for a in grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4).tolist()]
    [1.5, -0.5, -0.5, -0.5]
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}, got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if norm_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)  # (B, G)
    return centred.reshape(-1)  # (B*G,)


@register_advantage("reinforce_pp")
def reinforce_pp_registered(rewards, group_size, norm_std=True, lengths=None, reduce=None) -> torch.Tensor:
    """`algo.adv: reinforce_pp`: `reinforce_pp_advantages` (needs the response lengths; no group baseline)."""
    if lengths is None:
        raise ValueError("reinforce_pp needs the response lengths")
    return reinforce_pp_advantages(rewards, lengths, reduce=reduce)


def reinforce_pp_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-8, reduce=None
) -> torch.Tensor:
    """REINFORCE++ with an outcome reward (γ = 1), as the release's GRPO+OPSD outcome term computes it: every
    token of response i has return R_i, and the returns are whitened over all response tokens of the batch (no
    group baseline): `A_i = (R_i - μ) / sqrt(σ² + eps)` with the token-weighted mean μ = Σ L_i R_i / Σ L_i and
    unbiased variance σ² = Σ L_i (R_i - μ)² / (Σ L_i - 1), `L_i` the response lengths.

    Args: `rewards` `(N,)`, `lengths` `(N,)` response tokens per row; `reduce(t)` sums a tensor over ranks
    (under torchrun, so that μ and σ are the whole batch's, as the release computes them; None: this batch).
    Returns `(N,)`, one value for all of a response's tokens (0-length rows get a value that no token uses).

    >>> [round(a, 6) for a in reinforce_pp_advantages(torch.tensor([1.0, 0.0]), torch.tensor([1, 3])).tolist()]
    [1.5, -0.5]
    """
    r, w = rewards.double(), lengths.double()  # (N,)
    reduce = reduce or (lambda t: t)
    n, s, sq = reduce(torch.stack([w.sum(), (w * r).sum(), (w * r * r).sum()]))  # Σ L, Σ L R, Σ L R²
    mean = s / n.clamp_min(1.0)
    var = (sq / n.clamp_min(1.0) - mean**2).clamp_min(0.0)
    if n > 1:
        var = var * n / (n - 1)  # Bessel's correction over tokens
    return ((r - mean) / torch.sqrt(var + eps)).float()  # (N,)


def groups_in_band(scores: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """`(B,)` bool: groups whose mean score lies strictly inside (low, high), the release's online filter (a
    group every response solves, or none does, carries no GRPO signal).

    >>> groups_in_band(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2, low=0.01, high=0.99).tolist()
    [False, True, False]
    """
    mean = scores.float().view(-1, group_size).mean(dim=1)  # (B,)
    return (mean > low) & (mean < high)


def all_equal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(B,)` bool: groups whose G rewards are all equal (their advantages are all 0)."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    return (grouped == grouped[:, :1]).all(dim=1)
