"""The methods compared here differ only in how the group advantage A and the teacher's Δ_t become the update's
token advantages Â_t, and in whether the teacher pass can matter:

    method      Â_t (algo.distill: sampled)                 teacher pass            `algo.token_adv`
    grpo        A                                          never                   grpo
    rlsd        A·((1-λ) + λ·clip(w_t, 1-ε_w, 1+ε_w))      when λ > 0              rlsd
    opsd        Δ_t                                        always                  opsd
    grpo_opsd   A + coef·Δ_t                               always                  grpo_opsd
    (release)   coef (the released OPSD loss's gradient)   always (logs only)      opsd_release
    (release)   A + coef (with `algo.adv: reinforce_pp`)   always (logs only)      grpo_opsd_release

SDPO is opsd (or grpo_opsd) with the sibling teacher prompt (`algo.teacher_info: sibling`): the teacher sees a
correct response of the same group instead of the reference answer, so it is a teacher prompt, not a method.

With `algo.distill: jsd`, opsd and grpo_opsd move the distillation out of Â_t into a full-vocabulary JSD loss term:
Â_t keeps only the reward part (A for grpo_opsd, 0 for opsd) and the term is weighted by `distill_coef`.

`TokenRule` is Â_t's formula as data (the method's name and its scalars), so a stage that must form Â_t itself
(the fused update, which sees the student's log-probs only inside its forward) needs no function handed to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmrlsd.algo.rlsd import (
    grpo_opsd_token_advantages,
    grpo_token_advantages,
    opsd_release_token_advantages,
    opsd_token_advantages,
    rlsd_token_advantages,
)


@dataclass(frozen=True)
class TokenRule:
    """Which Â_t formula, with its scalars."""

    method: str
    """A key of `METHODS` (`algo.token_adv`)."""
    lam: float = 0.0
    """λ at this step (rlsd)."""
    eps_w: float = 0.0
    """ε_w (rlsd)."""
    coef: float = 1.0
    """Weight of the distillation part (grpo_opsd: Â_t = A + coef·Δ_t; with jsd, the JSD term's weight)."""
    distill: str = "sampled"
    """sampled (Δ_t inside Â_t) | jsd (a full-vocabulary loss term instead; opsd and grpo_opsd only)."""


@dataclass(frozen=True)
class Method:
    """One row of the table: Â_t from A `(N,)`, Δ_t `(N, T)` and the response mask `(N, T)`, and when the
    teacher pass is needed."""

    token_advantages: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenRule], torch.Tensor]
    needs_teacher: Callable[[float, bool], bool]
    """`(λ, teacher_diagnostics) -> bool`: whether Δ_t can change Â_t (or is wanted for the logs)."""
    distills: bool = False
    """Δ_t is a distillation signal that `algo.distill: jsd` can replace by the full-vocabulary JSD."""
    uses_reward: bool = True
    """Â_t depends on the reward (through A): the method needs groups of G >= 2 responses."""


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> Method:
    METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


register_method("rlsd", Method(
    lambda adv, delta, mask, r: rlsd_token_advantages(adv, delta, mask, lam=r.lam, eps_w=r.eps_w),
    needs_teacher=lambda lam, diagnostics: lam > 0 or diagnostics,
))  # fmt: skip
register_method("grpo", Method(
    lambda adv, delta, mask, r: grpo_token_advantages(adv, delta, mask),
    needs_teacher=lambda lam, diagnostics: False,
))  # fmt: skip
register_method("opsd", Method(
    lambda adv, delta, mask, r: opsd_token_advantages(adv, delta, mask),
    needs_teacher=lambda lam, diagnostics: True, distills=True, uses_reward=False,
))  # fmt: skip
register_method("grpo_opsd", Method(
    lambda adv, delta, mask, r: grpo_opsd_token_advantages(adv, delta, mask, coef=r.coef),
    needs_teacher=lambda lam, diagnostics: True, distills=True,
))  # fmt: skip
# The authors' release's OPSD and GRPO+OPSD losses (see `opsd_release_token_advantages`): the teacher pass only
# feeds the logged Δ_t, as there.
register_method("opsd_release", Method(
    lambda adv, delta, mask, r: opsd_release_token_advantages(adv, delta, mask, coef=r.coef),
    needs_teacher=lambda lam, diagnostics: True, uses_reward=False,
))  # fmt: skip
register_method("grpo_opsd_release", Method(
    lambda adv, delta, mask, r: grpo_token_advantages(adv, delta, mask)
    + opsd_release_token_advantages(adv, delta, mask, coef=r.coef),
    needs_teacher=lambda lam, diagnostics: True,
))  # fmt: skip


def token_advantages(
    rule: TokenRule, adv: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Â_t `(N, T)` by `rule` from A `(N,)`, Δ_t `(N, T)` and the response mask `(N, T)`; 0 on masked tokens."""
    method = get_method(rule.method)
    if rule.distill == "jsd":  # the distillation is a loss term (`distill_coef`), not part of Â_t
        return grpo_token_advantages(adv, delta, mask) * float(method.uses_reward)  # (N, T)
    return method.token_advantages(adv, delta, mask, rule)  # (N, T)


def distill_coef(rule: TokenRule) -> float:
    """Weight of the JSD loss term (`algo.distill: jsd`): `coef` beside the reward (grpo_opsd), else 1."""
    return rule.coef if get_method(rule.method).uses_reward else 1.0


def privileged_gain(
    teacher_logp: torch.Tensor | None, student_logp: torch.Tensor, teacher_mask: torch.Tensor
) -> torch.Tensor:
    """Δ_t = log P_T(y_t) - log P_S(y_t) where `teacher_mask` is 1, else 0: `(N, T)` (all 0 without a teacher pass).

    `teacher_mask` is the response mask, less the rows whose teacher prompt carries nothing (SDPO rows without a
    demonstration)."""
    if teacher_logp is None:
        return torch.zeros_like(student_logp)
    return (teacher_logp - student_logp) * teacher_mask  # (N, T)
