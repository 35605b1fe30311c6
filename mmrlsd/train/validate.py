"""Validation: greedy accuracy (`val/accuracy`) and sampled accuracy at a validation temperature
(`val/sample_accuracy`: the mean correctness of samples, the quantity RL optimises)."""

from __future__ import annotations

import torch

from mmrlsd.data.prompts import encode
from mmrlsd.reward.rewards import score_responses
from mmrlsd.rollout.generate import generate
from mmrlsd.types import Sample


def _accuracy(policy, processor, prompts, samples, cfg, temperature: float, n: int, seed: int) -> tuple[float, float]:
    bs = cfg.rollout.gen_batch_size or 64
    accs, rewards = [], []
    for start in range(0, len(samples), max(1, bs // n)):
        chunk = samples[start : start + max(1, bs // n)]
        enc = encode(processor, [prompts.student(s) for s in chunk for _ in range(n)],
                     [s.pil_images for s in chunk for _ in range(n)])  # fmt: skip
        r = generate(policy, processor, enc, group_size=n, max_new_tokens=cfg.rollout.max_new_tokens,
                     temperature=temperature, top_p=cfg.rollout.top_p, seed=seed + start)  # fmt: skip
        res = score_responses(r.texts, [s.answer for s in chunk for _ in range(n)],
                              [s.problem_type for s in chunk for _ in range(n)], name=cfg.reward.name,
                              acc_weight=cfg.reward.acc_weight, format_weight=cfg.reward.format_weight,
                              timeout=cfg.reward.timeout)  # fmt: skip
        accs += [x.accuracy for x in res]
        rewards += [x.reward for x in res]
    return sum(accs) / max(len(accs), 1), sum(rewards) / max(len(rewards), 1)


@torch.no_grad()
def validate(policy, processor, prompts, samples: list[Sample], cfg, seed: int) -> dict[str, float]:
    policy.eval()
    acc, reward = _accuracy(policy, processor, prompts, samples, cfg, 0.0, 1, seed)
    out = {"val/accuracy": acc, "val/reward": reward, "val/n": float(len(samples))}
    if cfg.rollout.val_n > 0:
        sacc, _ = _accuracy(policy, processor, prompts, samples, cfg, cfg.rollout.val_temperature,
                            cfg.rollout.val_n, seed + 7919)  # fmt: skip
        out["val/sample_accuracy"] = sacc
    return out
