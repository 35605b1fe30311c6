"""The credit lab: GRPO, RLSD (and a small ε_w / λ sweep), OPSD and SDPO on `digit_chain`, a task with long,
checkable reasoning, where a response can be right in most steps and wrong in one.

    mmrlsd lab data --task credit --out data/tiny/credit     # the committed RL data
    mmrlsd lab credit                                         # the comparison: 7 methods x 5 seeds
    mmrlsd lab credit --skip-runs                             # re-summarise existing run directories

Each response of `digit_chain` is a chain of steps (`a = 3 ; b = 7 ; ... ; 3 + 7 = 10 ; 10 - 2 = 8`), so the
teacher's per-token evidence Δ_t can be read per step: on the steps that match the reference, on the first
step that does not (the error), and on the steps after it. `step_labels` aligns a response's tokens to its steps,
`step_credit` aggregates Δ_t over the rollout dumps, `paired_difference` gives the per-seed paired gain
difference with its t-interval, `write_up` turns `results.json` into the README.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from mmrlsd.experiments.lab.runs import run_all, run_dir_of
from mmrlsd.experiments.lab.stats import read_run

CREDIT_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("configs/credit_grpo.yaml", ()),
    "rlsd": ("configs/credit_rlsd.yaml", ()),
    "rlsd_eps05": ("configs/credit_rlsd.yaml", ("algo.eps_w=0.5",)),
    "rlsd_eps10": ("configs/credit_rlsd.yaml", ("algo.eps_w=1.0",)),
    "rlsd_eps10_lam1": (
        "configs/credit_rlsd.yaml",
        ("algo.eps_w=1.0", "algo.lam0=1.0", "algo.lam_decay_steps=1000000"),
    ),
    "opsd": ("configs/credit_opsd.yaml", ()),
    "sdpo": ("configs/credit_sdpo.yaml", ()),
}
"""Method -> (config, overrides of that method). `rlsd` is the paper's setting (ε_w 0.2, λ 0.5 decaying to 0 over
the run); the sweep widens the clip (ε_w 0.5, 1.0: at 1.0 the clip floor is 0, so a token can lose its share
of A entirely) and, in `rlsd_eps10_lam1`, keeps λ at 1 for the whole run (Â_t = A·clip(w_t, 0, 2): the teacher
alone sets each token's share of A)."""
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
STEP_LABELS = ("right", "first_wrong", "later_wrong", "answer", "other")
"""Token labels of `step_labels`."""


# --- statistics ---


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with `df` degrees of freedom: bisection on the CDF, which is
    1/2 plus Simpson's rule over the density from 0 (accurate to ~1e-6 here)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        f = lambda u: c * (1 + u * u / df) ** (-(df + 1) / 2)  # noqa: E731
        h = x / n
        s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict:
    """Per-seed paired differences a - b over the seeds both have, their mean and the two-sided 95% t-interval
    mean ± t_{0.975, n-1} · sd / √n (no interval for fewer than 2 seeds)."""
    seeds = [s for s in a if s in b]
    diffs = [a[s] - b[s] for s in seeds]
    out: dict = {"n": len(diffs), "per_seed": {s: round(d, 4) for s, d in zip(seeds, diffs)}}
    if not diffs:
        return out | {"mean": None, "ci95": None}
    mean = statistics.fmean(diffs)
    out["mean"] = round(mean, 4)
    if len(diffs) < 2:
        return out | {"ci95": None}
    half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return out | {"ci95": [round(mean - half, 4), round(mean + half, 4)]}


# --- where Δ_t lands, per step of reasoning ---


def _norm(step: str) -> str:
    return " ".join(step.split())


def _thought(text: str) -> str | None:
    """The text between `<thought>` and the first `</thought>` after it (None without a closed thought)."""
    t0, t1 = text.find("<thought>"), text.find("</thought>")
    return text[t0 + len("<thought>") : t1] if 0 <= t0 < t1 else None


def _error_shares(tot: list[int]) -> dict:
    """`step_errors` counts summed -> the shares of wrong readings and of inconsistent arithmetic steps."""
    return {"reading_wrong": round(tot[1] / tot[0], 4) if tot[0] else None,
            "arithmetic_wrong": round(tot[3] / tot[2], 4) if tot[2] else None}  # fmt: skip


def step_labels(tokens: Sequence[str], reference_thought: str) -> list[str]:
    """Label each response token by the reasoning step it belongs to (`STEP_LABELS`).

    The response text is the concatenation of `tokens`; its thought (between `<thought>` and `</thought>`) is
    split into steps at `;`. A step is `right` when its text equals the reference step at the same position
    (whitespace-normalised), otherwise `first_wrong` for the first such step and `later_wrong` after it. A token
    belongs to the step holding its first character other than whitespace and `;`; tokens made only of those
    (the separators), the tags and the end of turn are `other`; tokens between `<answer>` and `</answer>` are
    `answer`. A response without a closed thought has every token `other` (or `answer`)."""
    ref = [_norm(s) for s in reference_thought.split(";")]
    text = "".join(tokens)
    t0, t1 = text.find("<thought>"), text.find("</thought>")
    steps: list[tuple[int, int, str]] = []
    if 0 <= t0 < t1:
        pos = t0 + len("<thought>")
        for part in text[pos:t1].split(";"):
            steps.append((pos, pos + len(part), part))
            pos += len(part) + 1
    status, first_wrong = [], None
    for i, (_, _, part) in enumerate(steps):
        if i < len(ref) and _norm(part) == ref[i]:
            status.append("right")
        elif first_wrong is None:
            first_wrong = i
            status.append("first_wrong")
        else:
            status.append("later_wrong")
    a0, a1 = text.find("<answer>"), text.find("</answer>")
    labels, pos = [], 0
    for tok in tokens:
        start, pos = pos, pos + len(tok)
        core = [start + k for k, ch in enumerate(tok) if not ch.isspace() and ch != ";"]
        label = "other"
        if core and 0 <= a0 < core[0] and (a1 < 0 or core[0] < a1) and not tok.startswith("<answer>"):
            label = "answer"
        elif core and steps and steps[0][0] <= core[0] < steps[-1][1]:
            for (s0, s1, _), st in zip(steps, status):
                if s0 <= core[0] < s1:
                    label = st
                    break
        labels.append(label)
    return labels


def reference_thoughts(run_dir: Path) -> dict[str, str]:
    """id -> reference thought of the run's training records (from the `data.train_files` of its config)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    out = {}
    for f in cfg["data"]["train_files"]:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            thought = _thought(rec.get("solution") or "")
            if thought is not None:
                out[rec["id"]] = thought
    return out


def step_credit(run_dirs: Sequence[Path], eps_w: float = 0.2) -> dict:
    """Where Δ_t lands per step of reasoning, from the rollout dumps of `run_dirs`: for responses with A > 0 and
    A < 0, per `step_labels` label, the token count, the mean Δ_t, the share of tokens whose w_t falls outside
    [1-ε_w, 1+ε_w] and, where the dump has the token advantages, `adv_scale`: the mean of Â_t / A (1 for GRPO on
    every token: how much of A the method actually moved onto or off those tokens); and, over responses with
    A < 0 that have both right steps and a first wrong step,
    `error_localised`: the share whose mean Δ_t on the first wrong step is below their mean on the right steps
    (the teacher blames the step that went wrong more than the ones that did not)."""
    acc: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    scale: dict[tuple[str, str], list[float]] = {}
    localised = compared = 0
    for run_dir in run_dirs:
        refs = reference_thoughts(run_dir)
        for path in sorted((run_dir / "rollouts").glob("step_*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["adv"] == 0 or row["id"] not in refs:
                    continue
                sign = "A>0" if row["adv"] > 0 else "A<0"
                labels = step_labels(row["tokens"], refs[row["id"]])
                by: dict[str, list[float]] = {}
                for lab, d, w in zip(labels, row["delta"], row["w"]):
                    acc.setdefault((sign, lab), []).append((d, not 1 - eps_w <= w <= 1 + eps_w))
                    by.setdefault(lab, []).append(d)
                for lab, a in zip(labels, row.get("token_adv") or []):
                    scale.setdefault((sign, lab), []).append(a / row["adv"])
                if sign == "A<0" and by.get("right") and by.get("first_wrong"):
                    compared += 1
                    localised += statistics.fmean(by["first_wrong"]) < statistics.fmean(by["right"])
    out: dict = {}
    for (sign, lab), vals in sorted(acc.items()):
        out.setdefault(sign, {})[lab] = {
            "tokens": len(vals),
            "delta_mean": round(statistics.fmean(d for d, _ in vals), 4),
            "clipped_frac": round(sum(c for _, c in vals) / len(vals), 4),
        }
        if scale.get((sign, lab)):
            out[sign][lab]["adv_scale"] = round(statistics.fmean(scale[(sign, lab)]), 4)
    out["error_localised"] = {
        "responses": compared,
        "frac": round(localised / compared, 4) if compared else None,
    }
    return out


def step_errors(tokens_text: str, reference_thought: str) -> tuple[int, int, int, int]:
    """(readings, wrong readings, arithmetic steps, inconsistent arithmetic steps) of one response's thought.

    A reading is a step `name = value`, wrong when it differs from the reference step at the same position; an
    arithmetic step `x + y = z` / `x - y = z` is inconsistent when z is not x ± y, whatever the reference says (the
    response's own operands: an error of calculation, not one carried over from a wrong reading)."""
    ref = [_norm(x) for x in reference_thought.split(";")]
    thought = _thought(tokens_text)
    if thought is None:
        return 0, 0, 0, 0
    reads = bad_reads = ariths = bad_ariths = 0
    for i, part in enumerate(thought.split(";")):
        words = part.split()
        if len(words) == 3 and words[1] == "=":
            reads += 1
            bad_reads += i >= len(ref) or _norm(part) != ref[i]
        elif len(words) == 5 and words[1] in "+-" and words[3] == "=":
            ariths += 1
            try:
                x, y, z = int(words[0]), int(words[2]), int(words[4])
                bad_ariths += z != (x + y if words[1] == "+" else x - y)
            except ValueError:
                bad_ariths += 1
    return reads, bad_reads, ariths, bad_ariths


def error_census(run_dirs: Sequence[Path]) -> dict:
    """Share of wrong readings and of inconsistent arithmetic steps (`step_errors`) over all sampled responses of
    the first and of the last rollout dump of `run_dirs`: what the method changed in the policy's reasoning."""
    out = {}
    for which in ("first", "last"):
        tot = [0, 0, 0, 0]
        for run_dir in run_dirs:
            dumps = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
            if not dumps:
                continue
            refs = reference_thoughts(run_dir)
            path = dumps[0] if which == "first" else dumps[-1]
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["id"] in refs:
                    tot = [a + b for a, b in zip(tot, step_errors("".join(row["tokens"]), refs[row["id"]]))]
        out[which] = {**_error_shares(tot), "readings": tot[0], "arithmetic_steps": tot[2]}
    return out


def val_census(run_dir: Path, model: str | Path | None = None, items: int = 256) -> dict:
    """Greedy answers of `model` (default: the run's last checkpoint) on the run's first `items` validation items, through
    `step_errors`: accuracy and the shares of wrong readings and inconsistent arithmetic steps. Unlike the rollout
    dumps (groups kept by online filtering, biased towards what the policy still gets wrong), this is the whole
    validation set, so start and end are comparable. The answers come from the trainer's validation pass."""
    import torch

    from mmrlsd.config import load_config
    from mmrlsd.data.prompts import PromptBuilder
    from mmrlsd.data.sources import FieldMap, load_dataset_files
    from mmrlsd.model.load import load_model
    from mmrlsd.train.validate import score_samples

    cfg = load_config(run_dir / "config.yaml")
    policy, processor = load_model(str(model or run_dir), max_pixels=cfg.model.max_pixels,
                                   min_pixels=cfg.model.min_pixels)  # fmt: skip
    prompts = PromptBuilder(
        processor, cfg.data.student_template, cfg.data.teacher_template, cfg.algo.teacher_info
    )
    samples = load_dataset_files(cfg.data.val_files, FieldMap.from_config(cfg.data), cfg.data.val_split,
                                 shuffle=False, max_items=items).load_all()  # fmt: skip
    texts: list[str] = []
    with torch.no_grad():
        correct, _, n = score_samples(policy, processor, prompts, samples, len(samples), 0, cfg, 0.0, 1, 0,
                                      texts=texts).tolist()  # fmt: skip
    tot = [0, 0, 0, 0]
    for x, text in zip(samples, texts):
        tot = [a + b for a, b in zip(tot, step_errors(text, _thought(x.solution or "") or ""))]
    return {"accuracy": round(correct / n, 4), "items": len(samples), **_error_shares(tot)}


def mean_response_tokens(data_file: str | Path, model_path: str | Path) -> float:
    """Mean token count of the reference solutions of `data_file` (plus the end-of-turn token SFT trains), with
    the tokenizer of `model_path`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    sols = [json.loads(line)["solution"] for line in Path(data_file).read_text(encoding="utf-8").splitlines()]
    return statistics.fmean(len(tok(s, add_special_tokens=False)["input_ids"]) + 1 for s in sols)


# --- the comparison ---


def _ms(xs: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(xs), 4),
        "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
    }


def summarize_credit(runs: Path, methods: Sequence[str], seeds: Sequence[int], walls: dict[str, float],
                     eps: dict[str, float]) -> dict:  # fmt: skip
    """Per method: per-seed greedy / sampled gains (last minus first validation) and wall time, their mean ± sd,
    the per-step curves and the step credit; plus each method's paired difference to GRPO."""
    out: dict = {}
    for m in methods:
        per = {str(s): read_run(run_dir_of(runs, m, s)) for s in seeds}
        seeds_out = {}
        for s, r in per.items():
            acc, sacc = r["val/accuracy"], r["val/sample_accuracy"]
            seeds_out[s] = {"greedy_first": acc[0], "greedy_last": acc[-1], "greedy_gain": round(acc[-1] - acc[0], 4),
                            "sampled_first": sacc[0], "sampled_last": sacc[-1],
                            "sampled_gain": round(sacc[-1] - sacc[0], 4),
                            "wall_s": round(walls[f"{m}-seed{s}"], 1) if f"{m}-seed{s}" in walls else None,
                            "step_s_median": r["time/step_s_median"],
                            "all_equal_mean": round(statistics.fmean(v for v in r["adv/all_equal_frac"] if v is not None), 4),
                            "response_tokens_mean": round(statistics.fmean(v for v in r["response/length_mean"] if v is not None), 2)}  # fmt: skip
        ss = list(seeds_out.values())
        out[m] = {
            "seeds": seeds_out,
            "greedy_gain": _ms([x["greedy_gain"] for x in ss]),
            "sampled_gain": _ms([x["sampled_gain"] for x in ss]),
            "greedy_first": _ms([x["greedy_first"] for x in ss]),
            "wall_s": _ms([x["wall_s"] for x in ss]) if all(x["wall_s"] is not None for x in ss) else None,
            "step_s_median": _ms([x["step_s_median"] for x in ss]),
            "all_equal_mean": _ms([x["all_equal_mean"] for x in ss]),
            "step_credit": step_credit([run_dir_of(runs, m, s) for s in seeds], eps.get(m, 0.2)),
            "errors": error_census([run_dir_of(runs, m, s) for s in seeds]),
            "curves": per,
        }
    return out


def paired_to(methods_out: dict, base: str, key: str = "greedy_gain") -> dict:
    """`paired_difference` of every other method's per-seed `key` minus `base`'s."""
    b = {s: v[key] for s, v in methods_out[base]["seeds"].items()}
    return {m: paired_difference({s: v[key] for s, v in res["seeds"].items()}, b)
            for m, res in methods_out.items() if m != base}  # fmt: skip


def credit_compare(out: Path, runs: Path, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
                   jobs: int, skip_runs: bool = False, command: str = "",
                   sft_data: str = "data/tiny/credit/train.jsonl", model: str = "data/tiny/sft-credit",
                   census_items: int = 256, recensus: bool = False) -> dict:  # fmt: skip
    """Run (unless `skip_runs`) and summarise the credit comparison; writes results.json, credit.png, README.md.
    `census_items`: validation items of `val_census` for the start model and every run's last checkpoint (0: no
    census; with `skip_runs` an earlier census is reused unless `recensus`)."""
    from mmrlsd.config import load_config
    from mmrlsd.experiments.lab.compare import budget_text

    unknown = [m for m in methods if m not in CREDIT_METHODS]
    if unknown:
        raise ValueError(f"unknown credit method(s) {unknown}; known: {', '.join(CREDIT_METHODS)}")
    configs = {m: CREDIT_METHODS[m][0] for m in methods}
    extra = {m: list(CREDIT_METHODS[m][1]) for m in methods}
    t0 = time.perf_counter()
    walls: dict[str, float] = {}
    prev = (
        json.loads((out / "results.json").read_text())
        if skip_runs and (out / "results.json").is_file()
        else {}
    )
    if not skip_runs:
        walls = run_all(methods, seeds, runs, overrides, jobs, configs, extra)
    elif prev:
        walls = prev.get("run_wall_s", {})
    eps = {m: load_config(configs[m], [*overrides, *extra[m]]).algo.eps_w for m in methods}
    methods_out = summarize_credit(runs, methods, seeds, walls, eps)
    census = prev.get("census") if prev and not recensus else None
    if census is None and census_items:
        first = run_dir_of(runs, methods[0], seeds[0])
        census = {"items": census_items,
                  "start": val_census(first, load_config(first / "config.yaml").model.path, census_items),
                  "methods": {}}  # fmt: skip
        for m in methods:
            per = {str(s): val_census(run_dir_of(runs, m, s), None, census_items) for s in seeds}
            census["methods"][m] = {"seeds": per, "mean": {k: round(statistics.fmean(v[k] for v in per.values()), 4)
                                                           for k in ("accuracy", "reading_wrong", "arithmetic_wrong")}}  # fmt: skip
    results = {
        "command": command,
        "task": "digit_chain (mmrlsd lab data --task credit)",
        "methods_configs": {m: {"config": configs[m], "overrides": extra[m]} for m in methods},
        "seeds": list(seeds),
        "overrides": list(overrides),
        "budget_text": budget_text(configs[methods[0]], overrides),
        "jobs": jobs,
        "wall_s": round(time.perf_counter() - t0, 1),
        "run_wall_s": {k: round(v, 1) for k, v in walls.items()},
        "load_avg_at_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "mean_response_tokens": round(mean_response_tokens(sft_data, model), 2),
        "methods": methods_out,
    }
    if census:
        results["census"] = census
    if prev:
        results.update({k: prev[k] for k in ("command", "jobs", "wall_s", "load_avg_at_end") if k in prev})
    if "grpo" in methods:
        paired = paired_to(methods_out, "grpo")
        results["paired_minus_grpo"] = paired
        results["paired_minus_grpo_sampled"] = paired_to(methods_out, "grpo", "sampled_gain")
        if "rlsd" in paired:
            results["paired_rlsd_minus_grpo"] = paired["rlsd"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_credit(results, out / "credit.png")
    (out / "README.md").write_text(write_up(results))
    return results


# --- figure and write-up (from results.json only) ---


def plot_credit(results: dict, path: Path) -> None:
    """Greedy and sampled gain per method (bars: mean; dots: seeds), greedy validation accuracy vs step (mean over
    seeds), and mean Δ_t per step label on responses with A < 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = list(results["methods"])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, key in zip(axes[:2], ("greedy_gain", "sampled_gain")):
        for i, m in enumerate(ms):
            res = results["methods"][m]
            ax.bar(i, res[key]["mean"], color="tab:red" if m.startswith("rlsd") else "tab:blue", alpha=0.6)
            ax.plot([i] * len(res["seeds"]), [v[key] for v in res["seeds"].values()], "k.", ms=5)
        ax.set_xticks(range(len(ms)), ms, rotation=30, ha="right")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(key.replace("_", " ") + " (last - first validation)", fontsize=10)
    for m in ms:
        runs = list(results["methods"][m]["curves"].values())
        n = min(len(r["val/accuracy"]) for r in runs)
        ys = [statistics.fmean(r["val/accuracy"][i] for r in runs) for i in range(n)]
        axes[2].plot(runs[0]["val_steps"][:n], ys, marker="o", ms=3, label=m)
    axes[2].set_title("val/accuracy (greedy), mean over seeds", fontsize=10)
    axes[2].legend(fontsize=7)
    labs = ("right", "first_wrong", "later_wrong", "answer", "other")
    width = 0.8 / max(len(ms), 1)
    for i, m in enumerate(ms):
        sc = results["methods"][m]["step_credit"].get("A<0", {})
        axes[3].bar([j + i * width for j in range(len(labs))], [sc.get(lab, {}).get("delta_mean", 0.0) for lab in labs],
                    width, label=m)  # fmt: skip
    axes[3].set_xticks([j + 0.4 for j in range(len(labs))], labs, rotation=20, ha="right")
    axes[3].set_title("mean Δ_t per step label, responses with A < 0", fontsize=10)
    axes[3].legend(fontsize=7)
    fig.suptitle(f"credit lab, {results['budget_text']}, seeds {results['seeds']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pm(d: dict) -> str:
    return f"{d['mean']:+.3f} ± {d['sd']:.3f}"


def write_up(results: dict) -> str:
    """The README of a credit comparison, every number taken from `results`."""
    ms = results["methods"]
    lines = [
        "# Credit lab: does RLSD beat GRPO where per-token credit matters?",
        "",
        f"Task: {results['task']}; mean response length of the reference solutions: "
        f"{results['mean_response_tokens']:.1f} tokens. Budget: {results['budget_text']}; seeds {results['seeds']}; "
        f"{results['jobs']} runs at a time; {results['wall_s']:.0f} s of wall time in all.",
        "",
        f"Command: `{results['command']}`",
        "",
        "| method | overrides | greedy gain (mean ± sd) | sampled gain | greedy at step 0 | all-equal groups | "
        "wall s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in ms.items():
        ov = " ".join(results["methods_configs"][m]["overrides"]) or "-"
        wall = f"{r['wall_s']['mean']:.0f}" if r["wall_s"] else "-"
        lines.append(f"| {m} | {ov} | {_pm(r['greedy_gain'])} | {_pm(r['sampled_gain'])} | "
                     f"{r['greedy_first']['mean']:.3f} | {r['all_equal_mean']['mean']:.3f} | {wall} |")  # fmt: skip
    paired = results.get("paired_minus_grpo", {})
    if paired:
        lines += ["", "Paired difference to GRPO, greedy gain, per seed (95% t-interval over seeds):", "",
                  "| method | mean | 95% interval | per seed |", "|---|---|---|---|"]  # fmt: skip
        for m, p in paired.items():
            ci = f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p.get("ci95") else "-"
            per = ", ".join(f"{v:+.3f}" for v in p["per_seed"].values())
            lines.append(f"| {m} − grpo | {p['mean']:+.3f} | {ci} | {per} |")
    lines += ["", "Where Δ_t lands (rollout dumps; responses with A < 0; steps labelled against the reference):", "",
              "| method | right steps | first wrong step | later wrong steps | answer | other | error localised | "
              "Â_t/A: right, first wrong |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, r in ms.items():
        sc = r["step_credit"]
        neg = sc.get("A<0", {})
        if not any(v["delta_mean"] for v in neg.values()):
            continue
        cells = [
            f"{neg[lab]['delta_mean']:+.3f} ({neg[lab]['tokens']})" if lab in neg else "-"
            for lab in STEP_LABELS
        ]
        loc = sc["error_localised"]
        scales = [neg.get(lab, {}).get("adv_scale") for lab in ("right", "first_wrong")]
        scale = ", ".join(f"{x:.3f}" for x in scales) if None not in scales else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {loc['frac']} of {loc['responses']} | {scale} |")
    census = results.get("census")
    if census:
        st = census["start"]
        lines += ["", f"Greedy answers on the first {census['items']} validation items, at the start and after each run "
                  "(mean over seeds): accuracy, share of wrong digit readings, share of arithmetic steps whose result "
                  "does not follow from their own operands:", "",
                  "| model | accuracy | wrong readings | inconsistent arithmetic |", "|---|---|---|---|",
                  f"| start | {st['accuracy']:.3f} | {st['reading_wrong']:.4f} | {st['arithmetic_wrong']:.4f} |"]  # fmt: skip
        for m, c in census["methods"].items():
            mc = c["mean"]
            lines.append(
                f"| {m} | {mc['accuracy']:.3f} | {mc['reading_wrong']:.4f} | {mc['arithmetic_wrong']:.4f} |"
            )
    lines += [
        "",
        "![credit](credit.png)",
        "",
        "## Does the paper's ordering appear?",
        "",
        verdict(results),
        "",
    ]
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """One paragraph: RLSD above GRPO or not, by how much, and what the logs say."""
    p = results.get("paired_rlsd_minus_grpo")
    if not p or not p.get("ci95"):
        return "No paired RLSD − GRPO interval (needs both methods and at least two seeds)."
    lo, hi = p["ci95"]
    if lo > 0:
        head = f"**Yes.** RLSD's greedy gain exceeds GRPO's by {p['mean']:+.3f} on average over {p['n']} paired seeds"
    elif hi < 0:
        head = f"**No: GRPO is above RLSD**, by {-p['mean']:.3f} on average over {p['n']} paired seeds"
    else:
        head = (f"**Not resolved.** The paired difference RLSD − GRPO is {p['mean']:+.3f} over {p['n']} seeds, and "
                f"its interval contains 0")  # fmt: skip
    text = f"{head} (95% interval [{lo:+.3f}, {hi:+.3f}])."
    sc = results["methods"].get("rlsd", {}).get("step_credit", {}).get("A<0", {})
    if "right" in sc and "first_wrong" in sc:
        loc = results["methods"]["rlsd"]["step_credit"]["error_localised"]
        text += (f" On responses with A < 0 the teacher's Δ_t averages {sc['first_wrong']['delta_mean']:+.3f} on the "
                 f"first wrong step against {sc['right']['delta_mean']:+.3f} on the right ones (lower on the wrong "
                 f"step in {loc['frac']} of {loc['responses']} responses), and {sc['first_wrong']['clipped_frac']:.3f} "
                 f"of the wrong step's tokens have w_t outside the clip.")  # fmt: skip
        if "adv_scale" in sc["first_wrong"] and "adv_scale" in sc["right"]:
            text += (f" What reaches the update is small, though: on those responses Â_t is on average "
                     f"{sc['first_wrong']['adv_scale']:.3f}·A on the first wrong step and {sc['right']['adv_scale']:.3f}·A "
                     f"on the right steps (GRPO: 1·A everywhere), because Â_t/A = (1-λ) + λ·clip(w_t, 1-ε_w, 1+ε_w) "
                     f"stays within 1 ± λ·ε_w.")  # fmt: skip
    ps = results.get("paired_minus_grpo_sampled", {}).get("rlsd")
    if ps and ps.get("ci95"):
        text += (f" On sampled accuracy (T = 1, the quantity RL optimises) the paired difference is {ps['mean']:+.3f} "
                 f"(95% interval [{ps['ci95'][0]:+.3f}, {ps['ci95'][1]:+.3f}]).")  # fmt: skip
    census = results.get("census")
    if census:
        st = census["start"]
        for m in ("opsd", "sdpo"):
            c = census["methods"].get(m, {}).get("mean")
            if c and c["arithmetic_wrong"] > st["arithmetic_wrong"]:
                text += (f" `{m}` ends at {c['accuracy']:.3f} greedy accuracy (start {st['accuracy']:.3f}) with "
                         f"{c['arithmetic_wrong']:.3f} of its arithmetic steps inconsistent with their own operands "
                         f"(start {st['arithmetic_wrong']:.3f}) and {c['reading_wrong']:.3f} of its readings wrong "
                         f"(start {st['reading_wrong']:.3f}).")  # fmt: skip
    best = max((m for m in results.get("paired_minus_grpo", {}) if m.startswith("rlsd")),
               key=lambda m: results["paired_minus_grpo"][m]["mean"], default=None)  # fmt: skip
    if best:
        bp = results["paired_minus_grpo"][best]
        text += f" The best RLSD setting against GRPO is `{best}` ({bp['mean']:+.3f} paired)."
    if lo <= 0:
        text += "\n\n" + what_would_change(results)
    return text


def what_would_change(results: dict) -> str:
    """Where RLSD does not beat GRPO: how many seeds would resolve a difference of the measured size, what the
    sweep says about the clip and λ, and whether RL moved greedy or sampled accuracy."""
    p = results["paired_rlsd_minus_grpo"]
    diffs = list(p["per_seed"].values())
    parts = ["**What would have to change.**"]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    if p["mean"] and sd > 0:
        need = math.ceil((1.96 * sd / abs(p["mean"])) ** 2)
        parts.append(f"Per-seed paired differences spread with sd {sd:.3f}, so a difference of {p['mean']:+.3f} "
                     f"would need about {need} seeds to exclude 0 at 95% (mean ± 1.96·sd/√n).")  # fmt: skip
    scales = {m: r["step_credit"].get("A<0", {}).get("first_wrong", {}) for m, r in results["methods"].items()
              if m.startswith("rlsd")}  # fmt: skip
    scales = {
        m: s for m, s in scales.items() if "adv_scale" in s and m in results.get("paired_minus_grpo", {})
    }
    if scales:
        top = max(scales, key=lambda m: scales[m]["adv_scale"])
        ref = "rlsd" if "rlsd" in scales else top
        d = scales[ref]["delta_mean"]
        loc = results["methods"][ref]["step_credit"].get("error_localised", {})
        parts.append(f"Letting more of the teacher through does not help: the widest setting, `{top}`, raises the "
                     f"first wrong step's Â_t/A only to {scales[top]['adv_scale']:.3f} and ends "
                     f"{results['paired_minus_grpo'][top]['mean']:+.3f} against GRPO. The teacher's signal is weak "
                     f"and noisy: in `{ref}` its Δ_t on the first wrong step averages {d:+.3f} nats "
                     f"(exp(|Δ|) ≈ {math.exp(abs(d)):.2f}), and it is lower there than on the right steps in "
                     f"{loc.get('frac', float('nan'))} of responses (0.5 would be chance). The knob that would have "
                     f"to change is the teacher's confidence where the student errs (a larger model, or a start "
                     f"trained to use the reference in its prompt), not ε_w or λ.")  # fmt: skip
    moves = []
    for m in ("grpo", "rlsd"):
        seeds = results["methods"].get(m, {}).get("seeds", {})
        if not seeds or not all("sampled_first" in s for s in seeds.values()):
            continue
        mean = {k: statistics.fmean(s[k] for s in seeds.values())
                for k in ("sampled_first", "sampled_last", "greedy_first", "greedy_last")}  # fmt: skip
        moves.append(f"{m}: sampled {mean['sampled_first']:.3f} → {mean['sampled_last']:.3f}, greedy "
                     f"{mean['greedy_first']:.3f} → {mean['greedy_last']:.3f}")  # fmt: skip
    if moves:
        parts.append(f"Within this budget RL mostly moves sampled accuracy toward the greedy one ({'; '.join(moves)}); "
                     "a longer run that moves the greedy answer is where per-token credit would have to show.")  # fmt: skip
    return " ".join(parts)
