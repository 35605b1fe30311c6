"""SDPO's privileged information (Hübotter et al., 2026, "Reinforcement Learning via Self-Distillation"): in
RLVR with only a scalar reward, a *successful sibling* (another response of the same group that the verifier
accepted) is the feedback the self-teacher conditions on.

mmrlsd runs SDPO as OPSD with `algo.teacher_info: sibling`: the teacher prompt carries the demonstration, and
Δ_t = log P_T(y_t) - log P_S(y_t) is the token advantage (sampled-token reverse KL; `algo.distill: jsd` for
the full-vocabulary form). As in the reference implementation (`dont_reprompt_on_self_success`), a response
is never its own demonstration; a row whose group has no other correct response gets no teacher signal
(Δ_t = 0). With `token_adv: grpo_opsd` the same teacher gives GRPO + SDPO.

`algo.sdpo_pick: shortest` is the authors' RLSD release's form: the shortest other correct response, and the
shortest other incorrect one as `feedback` for the teacher prompt (`mmrlsd/prompts/sdpo_release_teacher.jinja`).
The release draws these from a separate candidate rollout and calls a response correct when its total reward
is > 0 (a wrong but well-formatted math answer scores 0.1); here they are siblings of the same group and correct
means accuracy 1.
"""

from __future__ import annotations

import torch


def pick_demonstrations(
    correct: list[bool], group_size: int, lengths: list[int] | None = None
) -> list[int | None]:
    """For each row, a correct row of its group other than itself (None if there is none): the first one, or with
    `lengths` (response tokens per row) the shortest one, the first of equally short ones (the release's SDPO
    picks the shortest correct candidate).

    Rows `b*G .. b*G+G-1` form group b.

    >>> pick_demonstrations([False, True, True, False, False, False], 3)
    [1, 2, 1, None, None, None]
    >>> pick_demonstrations([True, True, True], 3, lengths=[9, 5, 7])
    [1, 2, 1]
    """
    return _pick_others(correct, group_size, lengths)


def pick_feedback(correct: list[bool], group_size: int, lengths: list[int]) -> list[int | None]:
    """For each row, the shortest *incorrect* row of its group other than itself (None if there is none): the
    failed attempt the release's SDPO teacher is shown beside the correct one.

    >>> pick_feedback([False, True, False, True], 4, lengths=[6, 2, 3, 1])
    [2, 2, 0, 2]
    """
    return _pick_others([not c for c in correct], group_size, lengths)


def _pick_others(ok: list[bool], group_size: int, lengths: list[int] | None) -> list[int | None]:
    if len(ok) % group_size:
        raise ValueError(f"{len(ok)} rows is not a whole number of groups of {group_size}")
    out: list[int | None] = []
    for i in range(len(ok)):
        lo = i - i % group_size
        cands = [j for j in range(lo, lo + group_size) if j != i and ok[j]]
        if lengths is not None:
            cands.sort(key=lambda j: lengths[j])  # stable: the first of equally short rows
        out.append(cands[0] if cands else None)
    return out


def demonstration_mask(demos: list[int | None]) -> torch.Tensor:
    """`(N,)` float: 1 where a row has a demonstration (its Δ_t counts), 0 where it has none."""
    return torch.tensor([d is not None for d in demos], dtype=torch.float32)
