"""Online filtering with refill, as the authors' release does it (`algorithm.online_filtering`).

A group whose mean score (the reward, or the accuracy: `algo.filter_key`) is not strictly inside
(`algo.filter_low`, `algo.filter_high`) is dropped: all solved or all failed, it gives GRPO no signal. More prompts
are then rolled out, a whole batch at a time from the data stream, until the kept groups fill the batch again;
the first B kept groups (in the order they were rolled out) are trained on.

Departure: the release raises after `max_try_make_batch` rounds. Here, after `algo.max_refill_tries` rounds
(the first included), the missing slots are filled with the most recently dropped groups, masked out of the
update, so the step still runs, every rank keeps the same number of rows (FSDP's collectives need it), and
`filter/padded_groups` says how many. Under torchrun the ranks roll out in step: a rank keeps refilling while
any rank is short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mmrlsd import dist
from mmrlsd.algo.advantage import groups_in_band
from mmrlsd.types import Rollouts

if TYPE_CHECKING:
    from mmrlsd.types import Groups

REFILL_SEED_STRIDE = 10_000_019
"""Refill round r samples with seed + r·stride: no collision with the next steps' seeds (seed + 1, + 2, ...)."""


def group_scores(g: Groups, key: str) -> torch.Tensor:
    """`(B*G,)` what the filter averages: the reward R or the accuracy."""
    if key == "reward":
        return g.rewards.float()
    return torch.tensor([float(r.accuracy) for r in g.results])


def fill_groups(
    first: Groups, more: Callable[[int], Groups], *, key: str, low: float, high: float, max_rounds: int
) -> tuple[list[tuple[Groups, int]], list[tuple[Groups, int]], dict[str, float]]:
    """Roll out until B groups pass the filter (B = the first batch's size) or `max_rounds` rounds ran.

    `more(r)` rolls out round r (1, 2, ...) on the next prompts. Returns `(kept, padding, stats)`: the groups to
    train on as `(Groups, group index)` pairs, `len(kept) + len(padding) == B`, padding being dropped groups
    that fill the slots the filter could not (masked out of the update by the caller)."""
    target = len(first.samples)
    kept: list[tuple[Groups, int]] = []
    dropped: list[tuple[Groups, int]] = []
    g, rounds, rolled = first, 1, 0
    while True:
        keep = groups_in_band(group_scores(g, key), g.group_size, low, high).tolist()  # (B,)
        kept += [(g, b) for b, k in enumerate(keep) if k]
        dropped += [(g, b) for b, k in enumerate(keep) if not k]
        rolled += len(keep)
        if rounds >= max_rounds or not dist.any_rank(len(kept) < target):
            break
        g = more(rounds)
        rounds += 1
    n_pad = max(0, target - len(kept))
    padding = dropped[len(dropped) - n_pad :] if n_pad else []
    stats = {
        "filter/kept_frac": len(kept) / rolled,  # of all groups rolled out this step
        "filter/rounds": float(rounds),
        "filter/extra_rollouts": float((rolled - target) * first.group_size),
        "filter/padded_groups": float(n_pad),
    }
    return kept[:target], padding, stats


def pad_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Concatenate rollouts of different response widths, right-padding ids with `pad_id` and masks with 0."""
    width = max(max(p.response_ids.shape[1] for p in parts), 1)
    ids = torch.cat([torch.nn.functional.pad(p.response_ids, (0, width - p.response_ids.shape[1]), value=pad_id)
                     for p in parts])  # fmt: skip
    mask = torch.cat([torch.nn.functional.pad(p.response_mask, (0, width - p.response_mask.shape[1]), value=0)
                      for p in parts])  # fmt: skip
    texts = [t for p in parts for t in p.texts]
    return Rollouts(response_ids=ids, response_mask=mask, texts=texts, group_size=parts[0].group_size)


def select_rows(r: Rollouts, rows: list[int]) -> Rollouts:
    idx = torch.tensor(rows, dtype=torch.long)
    return Rollouts(r.response_ids[idx], r.response_mask[idx], [r.texts[i] for i in rows], r.group_size)


def gather_groups(chosen: list[tuple[Groups, int]], pad_id: int):
    """`(samples, rollouts, results, rewards)` of the chosen groups, in order (rows b*G .. b*G+G-1 each)."""
    pieces, samples, results, rewards = [], [], [], []
    for g, b in chosen:
        G = g.group_size
        rows = list(range(b * G, (b + 1) * G))
        samples.append(g.samples[b])
        pieces.append(select_rows(g.rollouts, rows))
        results += [g.results[i] for i in rows]
        rewards.append(g.rewards[b * G : (b + 1) * G])
    return samples, pad_rollouts(pieces, pad_id), results, torch.cat(rewards)
