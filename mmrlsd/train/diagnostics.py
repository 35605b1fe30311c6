"""Per-step diagnostics and the per-token rollout dump that notebooks read, from the numbers the update used."""

from __future__ import annotations

import re

import torch

from mmrlsd.algo.advantage import all_equal_groups
from mmrlsd.algo.sdpo import demonstration_mask
from mmrlsd.types import Groups

# Phrases that refer to privileged information the student was never shown (how the paper shows OPSD leaking).
LEAKAGE = re.compile(
    r"reference (?:solution|answer)|the (?:given|provided) (?:solution|answer)|as given|as provided"
    r"|according to the reference|the reference",
    re.IGNORECASE,
)


def leaks(text: str) -> bool:
    """True when a response mentions a reference solution/answer it could not have seen.

    >>> leaks("As the reference solution says, 3."), leaks("3 red shapes")
    (True, False)
    """
    return LEAKAGE.search(text) is not None


def _quantiles(x: torch.Tensor, name: str) -> dict[str, float]:
    if x.numel() == 0:
        return {f"{name}_mean": 0.0, f"{name}_p10": 0.0, f"{name}_p50": 0.0, f"{name}_p90": 0.0}
    q = torch.quantile(x.double()[:100_000], torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {f"{name}_mean": float(x.double().mean()), f"{name}_p10": q[0], f"{name}_p50": q[1], f"{name}_p90": q[2]}


def step_metrics(
    g: Groups, delta: torch.Tensor, weights: torch.Tensor, token_adv: torch.Tensor, lam: float, eps_w: float,
    teacher=None,
) -> dict[str, float]:  # fmt: skip
    """Scalar diagnostics of one rollout batch from Δ_t, w_t and Â_t `(N, T)`. Token statistics are over response
    tokens of responses with A != 0 where the weight can act (w, clipping), and over all response tokens
    otherwise. `teacher` is the step's `TeacherPass` (None: no teacher pass)."""
    rollouts, rewards, adv, w = g.rollouts, g.rewards, g.adv, weights
    accuracy = torch.tensor([r.accuracy for r in g.results])
    fmt = torch.tensor([r.format for r in g.results])
    all_equal = all_equal_groups(rewards, g.group_size)
    mask = rollouts.response_mask.bool()  # (N, T)
    active = mask & (adv != 0)[:, None]  # (N, T)
    d_tok = delta[mask]
    clipped = ((w < 1 - eps_w) | (w > 1 + eps_w)) & active
    lengths = rollouts.lengths.float()
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/accuracy": float(accuracy.mean()),
        "reward/format": float(fmt.mean()),
        "adv/mean": float(adv.mean()),
        "adv/abs_mean": float(adv.abs().mean()),
        "adv/all_equal_frac": float(all_equal.float().mean()),
        **{f"rlsd/{k}": v for k, v in _quantiles(d_tok, "delta").items()},
        **{f"rlsd/{k}": v for k, v in _quantiles(w[active], "w").items()},
        "rlsd/w_clip_frac": float(clipped.sum()) / max(int(active.sum()), 1),
        "rlsd/lam": lam,
        "rlsd/token_adv_mean": float(token_adv[mask].mean()) if mask.any() else 0.0,
        "rlsd/teacher_kl": float(-d_tok.mean()) if d_tok.numel() else 0.0,
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()) if lengths.numel() else 0.0,
        "response/clip_frac": float((rollouts.response_mask[:, -1] == 1).float().mean()),
        "leakage/rate": sum(leaks(t) for t in rollouts.texts) / max(len(rollouts.texts), 1),
        "rlsd/teacher_pass": float(teacher is not None),
    } | ({"sdpo/demo_frac": float(demonstration_mask(teacher.demos).mean())}  # rows with a demonstration
         if teacher is not None and teacher.demos is not None else {})  # fmt: skip


def dump_rows(
    step: int, g: Groups, processor, delta: torch.Tensor, weights: torch.Tensor, token_adv: torch.Tensor,
    student_logp: torch.Tensor, teacher, lam: float, limit: int,
) -> list[dict]:  # fmt: skip
    """Per-response, per-token records of what the update actually used (read by `mmrlsd.viz`). SDPO rows name
    their `demo`: the row whose response the teacher saw (None: no Δ_t)."""
    tok = processor.tokenizer
    rollouts, results, adv, w, G = g.rollouts, g.results, g.adv, weights, g.group_size
    teacher_logp = teacher.logp if teacher is not None else None
    rows = []
    for i in range(min(limit, len(rollouts.texts))):
        s = g.samples[i // G]
        L = int(rollouts.response_mask[i].sum())
        ids = rollouts.response_ids[i, :L].tolist()
        rows.append({
            "step": step, "sample": i, "group": i // G, "id": s.id, "images": s.images, "problem": s.problem,
            "answer": s.answer, "response": rollouts.texts[i], "token_ids": ids,
            "tokens": [tok.decode([t]) for t in ids], "reward": results[i].reward,
            "accuracy": results[i].accuracy, "format": results[i].format, "extracted": results[i].extracted,
            "adv": float(adv[i]), "lam": lam, "delta": delta[i, :L].tolist(), "w": w[i, :L].tolist(),
            "token_adv": token_adv[i, :L].tolist(), "student_logp": student_logp[i, :L].tolist(),
            "teacher_logp": teacher_logp[i, :L].tolist() if teacher_logp is not None else None,
        })  # fmt: skip
        if teacher is not None and teacher.demos is not None:
            rows[-1]["demo"] = teacher.demos[i]
    return rows
