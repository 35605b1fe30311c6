"""SDPO's privileged information (Hübotter et al., 2026, "Reinforcement Learning via Self-Distillation"): in
RLVR with only a scalar reward, a *successful sibling* (another response of the same group that the verifier
accepted) is the feedback the self-teacher conditions on.

mmrlsd runs SDPO as OPSD with `algo.teacher_info: sibling`: the teacher prompt carries the demonstration, and
Δ_t = log P_T(y_t) - log P_S(y_t) is the token advantage (sampled-token reverse KL; `algo.distill: jsd` for
the full-vocabulary form). As in the reference implementation (`dont_reprompt_on_self_success`), a response
is never its own demonstration; a row whose group has no other correct response gets no teacher signal
(Δ_t = 0). With `token_adv: grpo_opsd` the same teacher gives GRPO + SDPO.
"""

from __future__ import annotations

import torch


def pick_demonstrations(correct: list[bool], group_size: int) -> list[int | None]:
    """For each row, the index of the first correct row of its group other than itself (None if there is none).

    Rows `b*G .. b*G+G-1` form group b.

    >>> pick_demonstrations([False, True, True, False, False, False], 3)
    [1, 2, 1, None, None, None]
    """
    if len(correct) % group_size:
        raise ValueError(f"{len(correct)} rows is not a whole number of groups of {group_size}")
    demos: list[int | None] = []
    for i in range(len(correct)):
        lo = i - i % group_size
        demos.append(next((j for j in range(lo, lo + group_size) if j != i and correct[j]), None))
    return demos


def demonstration_mask(demos: list[int | None]) -> torch.Tensor:
    """`(N,)` float: 1 where a row has a demonstration (its Δ_t counts), 0 where it has none."""
    return torch.tensor([d is not None for d in demos], dtype=torch.float32)
