"""The comparison's figure (`curves.png`) and results tables (`table.md`), drawn from `results.json` only."""

from __future__ import annotations

import statistics
from pathlib import Path

from mmrlsd.experiments.lab.stats import VAL_KEYS


def _avg(curves: list[list]) -> tuple[list[int], list[float]]:
    """Mean over seeds at each index (ignoring None), up to the shortest run."""
    n = min(len(c) for c in curves)
    xs, ys = [], []
    for i in range(n):
        vals = [c[i] for c in curves if c[i] is not None]
        if vals:
            xs.append(i)
            ys.append(statistics.fmean(vals))
    return xs, ys


def _smooth(ys: list[float], k: int) -> list[float]:
    """Trailing moving average over k points."""
    return [statistics.fmean(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]


def plot(results: dict, path: Path, smooth: int = 5) -> None:
    """Validation accuracy (greedy, sampled) and per-step reward, entropy, response length, clipped-w fraction,
    leakage rate and all-equal-group fraction vs step: the mean over seeds per method (thin lines: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val/accuracy", "val/accuracy (greedy)"), ("val/sample_accuracy", "val/sample_accuracy (T=1)"),
              ("reward/mean", "reward/mean"), ("actor/entropy", "actor/entropy"),
              ("response/length_mean", "response/length_mean (tokens)"), ("rlsd/w_clip_frac", "rlsd/w_clip_frac"),
              ("leakage/rate", "leakage/rate"), ("adv/all_equal_frac", "adv/all_equal_frac")]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    colors = {"grpo": "tab:blue", "rlsd": "tab:red", "opsd": "tab:green", "sdpo": "tab:purple"}
    for ax, (key, title) in zip(axes.flat, panels):
        for m, res in results["methods"].items():
            c = colors.get(m)
            runs = list(res["runs"].values())
            if key in VAL_KEYS:
                for r in runs:
                    ax.plot(r["val_steps"], r[key], color=c, alpha=0.25, lw=0.8)
                steps = runs[0]["val_steps"][: min(len(r[key]) for r in runs)]
                _, ys = _avg([r[key] for r in runs])
                ax.plot(steps, ys, color=c, lw=2, marker="o", ms=3, label=m)
            else:
                idx, ys = _avg([r[key] for r in runs])
                steps = [runs[0]["steps"][i] for i in idx]
                ax.plot(steps, _smooth(ys, smooth), color=c, lw=1.6, label=m)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"tiny lab, {results['budget_text']}: mean of seeds {results['seeds']} (thin: each seed; "
                 f"per-step curves smoothed over {smooth} steps; GRPO has no teacher pass, so no w)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_markdown(results: dict) -> str:
    """The write-up's results table: mean ± sd over seeds, straight from `results`."""
    rows = ["| method | val/accuracy first → last (gain) | best | val/sample_accuracy first → last (gain) | best "
            "| reward, last 10 steps | entropy, last 10 steps |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(d: dict) -> str:
        return f"{d['mean']:.3f} ± {d['sd']:.3f}"

    for m, res in results["methods"].items():
        s = res["summary"]
        rows.append(
            f"| {m} | {s['accuracy_first']['mean']:.3f} → {s['accuracy_last']['mean']:.3f} ({f(s['accuracy_gain'])}) "
            f"| {f(s['accuracy_best'])} | {s['sample_accuracy_first']['mean']:.3f} → "
            f"{s['sample_accuracy_last']['mean']:.3f} ({f(s['sample_accuracy_gain'])}) | {f(s['sample_accuracy_best'])} "
            f"| {f(s['reward_last10'])} | {f(s['entropy_last10'])} |"
        )
    rows += ["", "| method | reward, first → last 10 steps | entropy, first → last 10 | all-equal groups, first → "
             "last 10 | clipped w (run mean) | Δ mean (run mean) | leakage (max) | step s (median) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, res in results["methods"].items():
        s = res["summary"]
        rows.append(
            f"| {m} | {s['reward_first10']['mean']:.3f} → {s['reward_last10']['mean']:.3f} "
            f"| {s['entropy_first10']['mean']:.3f} → {s['entropy_last10']['mean']:.3f} "
            f"| {s['all_equal_first10']['mean']:.3f} → {s['all_equal_last10']['mean']:.3f} "
            f"| {s['w_clip_frac_run']['mean']:.3f} | {s['delta_mean_run']['mean']:.3f} | {s['leakage_max']:.3f} "
            f"| {s['step_s_median']['mean']:.2f} |"
        )
    credit = {m: r["token_credit"] for m, r in results["methods"].items() if r.get("token_credit")}
    if any(any(c["delta_mean"] for kinds in tc.values() for c in kinds.values()) for tc in credit.values()):
        rows += ["", "| method | response | token kind | tokens | mean Δ_t | w_t outside [0.8, 1.2] |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for m, tc in credit.items():
            if not any(c["delta_mean"] for kinds in tc.values() for c in kinds.values()):
                continue  # GRPO: no teacher pass, Δ = 0
            for sign in ("A>0", "A<0"):
                for kind in ("number", "answer", "other"):
                    c = tc.get(sign, {}).get(kind)
                    if c:
                        d = f"{c['delta_mean']:.3f}".replace("-0.000", "0.000")
                        rows.append(
                            f"| {m} | {sign} | {kind} | {c['tokens']} | {d} | {c['clipped_frac']:.3f} |"
                        )
    demos = {m: r["demo_credit"] for m, r in results["methods"].items() if r.get("demo_credit")}
    if demos:
        rows += ["", "| method | dumped rows | without a demonstration | row | rows | mean Σ_t Δ_t | Σ_t Δ_t < 0 |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, dc in demos.items():
            for kind in ("correct_same_text", "correct_other_text", "wrong"):
                c = dc[kind]
                rows.append(f"| {m} | {dc['rows']} | {dc['no_demo_frac']:.3f} | {kind.replace('_', ' ')} | "
                            f"{c['rows']} | {c['delta_sum_mean']:.3f} | {c['negative_frac']:.3f} |")  # fmt: skip
    return "\n".join(rows) + "\n"
