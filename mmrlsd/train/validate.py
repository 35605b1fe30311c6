"""Validation: greedy accuracy (`val/accuracy`) and sampled accuracy under the validation sampling settings
(`val/sample_accuracy`: the mean correctness of samples, the quantity RL optimises; `rollout.val_temperature`,
`val_top_p`, `val_top_k`, `val_presence_penalty`, `val_n`).

Under torchrun every rank scores an equal share (padded with repeats that are not counted), and the counts are
summed: generation under FSDP is collective, so all ranks must run the same number of `generate` calls. Sampling
is seeded per global row, so the numbers do not depend on the number of ranks.
"""

from __future__ import annotations

import math

import torch

from mmrlsd import dist
from mmrlsd.data.encoding import encode
from mmrlsd.reward.rewards import score_responses
from mmrlsd.rollout.generate import generate
from mmrlsd.types import Sample


class ValidationStopped(Exception):
    """A stop signal arrived during validation: its numbers are dropped."""


def score_samples(policy, processor, prompts, samples, n_real, first_index, cfg, temperature, n, seed,
                  stop=None, top_p=1.0, top_k=0, presence_penalty=0.0, texts: list[str] | None = None) -> torch.Tensor:  # fmt: skip
    """(correct, reward, count) summed over the first `n_real` of `samples` (the rest is padding), `n` responses
    each; `texts`, when given, receives those responses' texts in order."""
    per_call = max(1, (cfg.rollout.gen_batch_size or 64) // n)
    out = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(samples), per_call):
        if stop is not None and dist.any_rank(stop()):  # every rank runs the same number of chunks
            raise ValidationStopped
        chunk = samples[start : start + per_call]
        enc = encode(processor, [prompts.student(s) for s in chunk for _ in range(n)],
                     [s.pil_images for s in chunk for _ in range(n)])  # fmt: skip
        r = generate(policy, processor, enc, group_size=n, max_new_tokens=cfg.rollout.max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                     row_offset=(first_index + start) * n, share_prefill=cfg.rollout.share_prefill,
                     presence_penalty=presence_penalty, decode=cfg.rollout.hf_decode,
                     cascade=cfg.rollout.cascade_attention)  # fmt: skip
        res = score_responses(r.texts, [s.answer for s in chunk for _ in range(n)],
                              [s.problem_type for s in chunk for _ in range(n)], name=cfg.reward.name,
                              acc_weight=cfg.reward.acc_weight, format_weight=cfg.reward.format_weight,
                              timeout=cfg.reward.timeout)  # fmt: skip
        for i, x in enumerate(res):
            if start + i // n < n_real:
                out += torch.tensor([x.accuracy, x.reward, 1.0], dtype=torch.float64)
                if texts is not None:
                    texts.append(r.texts[i])
    return out


@torch.no_grad()
def validate(
    policy, processor, prompts, samples: list[Sample], cfg, seed: int, stop=None
) -> dict[str, float]:
    """`stop()`: checked between generation batches; True raises `ValidationStopped`."""
    policy.eval()
    world, rank = dist.world_size(), dist.rank()
    per = math.ceil(len(samples) / world)
    mine = samples[rank * per : (rank + 1) * per]
    n_real = len(mine)
    mine = mine + samples[: per - n_real]  # equal shares; repeats are not counted
    greedy = dist.all_reduce_tensor(
        score_samples(policy, processor, prompts, mine, n_real, rank * per, cfg, 0.0, 1, seed, stop)
    )
    out = {"val/accuracy": float(greedy[0] / greedy[2]), "val/reward": float(greedy[1] / greedy[2]),
           "val/n": float(greedy[2])}  # fmt: skip
    if cfg.rollout.val_n > 0:
        ro = cfg.rollout
        s = dist.all_reduce_tensor(score_samples(policy, processor, prompts, mine, n_real, rank * per, cfg,
                                         ro.val_temperature, ro.val_n, seed + 7919, stop, top_p=ro.val_top_p,
                                         top_k=ro.val_top_k, presence_penalty=ro.val_presence_penalty))  # fmt: skip
        out["val/sample_accuracy"] = float(s[0] / s[2])
    return out
