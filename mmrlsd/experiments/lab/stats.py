"""Statistics of finished runs: per-step curves, where the teacher's evidence lands, summaries over seeds."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from mmrlsd.experiments.lab.runs import run_dir_of
from mmrlsd.log import read_metrics

CURVE_KEYS = ("reward/mean", "actor/entropy", "response/length_mean", "rlsd/w_clip_frac", "leakage/rate",
              "adv/all_equal_frac", "rlsd/delta_mean")  # fmt: skip
"""Per-step metrics kept for the curves (besides the validation ones)."""
VAL_KEYS = ("val/accuracy", "val/sample_accuracy")


def read_run(run_dir: Path) -> dict:
    """Per-step curves and validation points of one run directory."""
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r.get("step", 0) > 0 and "reward/mean" in r]
    vals = [r for r in rows if "val/accuracy" in r]
    out = {"steps": [r["step"] for r in steps], "val_steps": [r["step"] for r in vals]}
    for k in CURVE_KEYS:
        out[k] = [r.get(k) for r in steps]
    for k in VAL_KEYS:
        out[k] = [r.get(k) for r in vals]
    times = [r["time/step_s"] for r in steps if "time/step_s" in r]
    out["time/step_s_median"] = statistics.median(times) if times else None
    return out


def token_kind(token: str, in_answer: bool) -> str:
    """`answer` inside <answer>...</answer>, `number` for other tokens with a digit (the readings and results in
    the thought), `other` for the rest (tags, words, punctuation, end of turn)."""
    if in_answer:
        return "answer"
    return "number" if any(c.isdigit() for c in token) else "other"


def token_credit(run_dirs: Sequence[Path], eps_w: float = 0.2) -> dict:
    """Where the teacher's evidence lands, from the rollout dumps (the Δ_t and w_t the update used): for responses
    with A > 0 and A < 0, per token kind (`token_kind`), the token count, the mean Δ_t and the share of tokens
    whose w_t = exp(sign(A)·Δ_t) falls outside [1-ε_w, 1+ε_w] (clipped in RLSD's Â_t)."""
    acc: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for run_dir in run_dirs:
        for path in sorted((run_dir / "rollouts").glob("step_*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["adv"] == 0:
                    continue
                sign = "A>0" if row["adv"] > 0 else "A<0"
                in_answer = False
                for tok, d, w in zip(row["tokens"], row["delta"], row["w"]):
                    if tok == "</answer>":
                        in_answer = False
                    kind = token_kind(tok, in_answer)
                    acc.setdefault((sign, kind), []).append((d, not 1 - eps_w <= w <= 1 + eps_w))
                    if tok == "<answer>":
                        in_answer = True
    out: dict = {}
    for (sign, kind), vals in sorted(acc.items()):
        out.setdefault(sign, {})[kind] = {
            "tokens": len(vals),
            "delta_mean": round(statistics.fmean(d for d, _ in vals), 4),
            "clipped_frac": round(sum(c for _, c in vals) / len(vals), 4),
        }
    return out


def demo_credit(run_dirs: Sequence[Path]) -> dict:
    """SDPO (`teacher_info: sibling`) only, from the rollout dumps: how the teacher, shown a correct sibling,
    judges a whole response (Δ_t summed over it), by kind of row: correct with the same text as its
    demonstration, correct with another text, wrong. Rows whose demonstration is not among the dumped rows are
    left out; `no_demo_frac` is the share of dumped rows without a demonstration (no signal). Empty for runs
    without demonstrations."""
    acc: dict[str, list[float]] = {"correct_same_text": [], "correct_other_text": [], "wrong": []}
    rows_seen = no_demo = 0
    for run_dir in run_dirs:
        for path in sorted((run_dir / "rollouts").glob("step_*.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if not rows or "demo" not in rows[0]:
                continue
            by_sample = {r["sample"]: r for r in rows}
            for r in rows:
                rows_seen += 1
                demo = by_sample.get(r["demo"]) if r["demo"] is not None else None
                no_demo += r["demo"] is None
                if demo is None:
                    continue
                kind = "wrong" if r["accuracy"] < 1 else (
                    "correct_same_text" if r["response"] == demo["response"] else "correct_other_text")  # fmt: skip
                acc[kind].append(sum(r["delta"]))
    if not rows_seen:
        return {}
    out: dict = {"rows": rows_seen, "no_demo_frac": round(no_demo / rows_seen, 4)}
    for kind, sums in acc.items():
        out[kind] = {"rows": len(sums), "delta_sum_mean": round(statistics.fmean(sums), 4) if sums else 0.0,
                     "negative_frac": round(sum(x < -0.01 for x in sums) / len(sums), 4) if sums else 0.0}  # fmt: skip
    return out


def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(xs), 4),
        "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
    }


def summarize_method(runs: dict[int, dict]) -> dict:
    """Across seeds: first, last, best and last-minus-first validation accuracy (greedy and sampled, with each
    seed's gain), and per-step diagnostics over the first and last 10 steps or the whole run. Each entry gives
    the mean and sample standard deviation over seeds."""
    out: dict = {}
    rs = list(runs.values())
    for k in VAL_KEYS:
        name = k.split("/")[1]
        firsts = [r[k][0] for r in rs]
        lasts = [r[k][-1] for r in rs]
        out[f"{name}_first"] = _mean_sd(firsts)
        out[f"{name}_last"] = _mean_sd(lasts)
        out[f"{name}_best"] = _mean_sd([max(r[k]) for r in rs])
        out[f"{name}_gain"] = _mean_sd([b - a for a, b in zip(firsts, lasts)])
        out[f"{name}_gain_per_seed"] = [round(b - a, 4) for a, b in zip(firsts, lasts)]

    def window(key: str, sl: slice) -> dict[str, float]:
        return _mean_sd([statistics.fmean(v for v in r[key][sl] if v is not None) for r in rs])

    for key, name in (
        ("reward/mean", "reward"),
        ("actor/entropy", "entropy"),
        ("adv/all_equal_frac", "all_equal"),
    ):
        out[f"{name}_first10"] = window(key, slice(0, 10))
        out[f"{name}_last10"] = window(key, slice(-10, None))
    out["w_clip_frac_run"] = window("rlsd/w_clip_frac", slice(None))
    out["delta_mean_run"] = window("rlsd/delta_mean", slice(None))
    out["leakage_max"] = max(max(v or 0.0 for v in r["leakage/rate"]) for r in rs)
    out["step_s_median"] = _mean_sd([r["time/step_s_median"] for r in rs])
    return out


def summarize(runs_dir: Path, methods: Sequence[str], seeds: Sequence[int]) -> dict:
    methods_out = {}
    for m in methods:
        per_seed = {s: read_run(run_dir_of(runs_dir, m, s)) for s in seeds}
        dirs = [run_dir_of(runs_dir, m, s) for s in seeds]
        methods_out[m] = {
            "summary": summarize_method(per_seed),
            "token_credit": token_credit(dirs),
            "runs": {str(s): r for s, r in per_seed.items()},
        }
        if credit := demo_credit(dirs):
            methods_out[m]["demo_credit"] = credit
    return methods_out
