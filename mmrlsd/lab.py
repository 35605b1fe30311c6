"""The tiny lab (issue #4): its task mix and data, and the GRPO / RLSD / OPSD / SDPO comparison at toy scale.

    python -m mmrlsd.lab data --out data/tiny/lab                          # the committed RL data
    python -m mmrlsd.lab data --out data/synth_sft --n 24000 --n-val 0 --seed 1    # the SFT data
    python -m mmrlsd.lab check                                             # time + judge the default run
    python -m mmrlsd.lab compare trainer.threads=1                         # the comparison (2 runs at a time)
    python -m mmrlsd.lab compare --add --methods sdpo trainer.threads=1    # one more method, same budget

The lab trains a ~1M-parameter Qwen2-VL (`data/tiny/sft-qwen2vl/`, made by `mmrlsd sft configs/tiny_sft.yaml`)
on four synthetic families (`mmrlsd.data.synth`) at difficulty levels 1-2. Three of them are multi-step
(`count_two_colors`: count two colours, add; `add_digits`: read two digits, add; `bar_diff`: read two bars,
subtract), so a reference answer constrains the intermediate steps and gives the teacher something to say.

`compare` runs each method's config (`METHODS`) for every seed with the same budget, each run its own
`mmrlsd train` process, then writes `results.json`, `curves.png` and the results table of the write-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmrlsd.data import synth
from mmrlsd.log import read_metrics

LAB_FAMILIES = ("count_color", "count_two_colors", "add_digits", "bar_diff")
"""The lab's task families (see `mmrlsd.data.synth.FAMILIES`)."""
LAB_LEVELS = (1, 2)
"""Difficulty levels, interleaved: 56x56 px images (4 vision tokens), answers 0-18."""
METHODS = {
    "grpo": "configs/grpo_tiny_cpu.yaml",
    "rlsd": "configs/tiny_cpu.yaml",
    "opsd": "configs/opsd_tiny_cpu.yaml",
    "sdpo": "configs/sdpo_tiny_cpu.yaml",
}
"""Method -> its config; they differ only where the method does (see the configs' headers)."""
CURVE_KEYS = ("reward/mean", "actor/entropy", "response/length_mean", "rlsd/w_clip_frac", "leakage/rate",
              "adv/all_equal_frac", "rlsd/delta_mean")  # fmt: skip
"""Per-step metrics kept for the curves (besides the validation ones)."""
VAL_KEYS = ("val/accuracy", "val/sample_accuracy")


# --- data ---


def lab_records(
    n: int, seed: int, split: str, families: Sequence[str] = LAB_FAMILIES, levels: Sequence[int] = LAB_LEVELS
) -> list[dict]:
    """n records of `split`, levels interleaved (record i has level `levels[i % len(levels)]`), families in
    round-robin within each level; ids are `<split>-L<level>-<index>`. Deterministic in (seed, split); a
    smaller n is a prefix of a larger one."""
    per_level = -(-n // len(levels))
    streams = [synth.generate(per_level, seed, list(families), level=lv, split=split) for lv in levels]
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        rec = dict(streams[i % len(levels)][i // len(levels)])
        rid = f"{split}-L{level}-{i // len(levels):06d}"
        rec["id"], rec["images"] = rid, [f"images/{rid}.png"]
        out.append(rec)
    return out


def write_lab_data(
    out_dir: str | Path, n_train: int = 4000, n_val: int = 512, seed: int = 0,
    families: Sequence[str] = LAB_FAMILIES, levels: Sequence[int] = LAB_LEVELS,
) -> dict:  # fmt: skip
    """Write `train.jsonl`, `val.jsonl`, `images/*.png` and `meta.json` under `out_dir`; returns the meta."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = {"generator": "mmrlsd.lab", "synth_version": synth.GENERATOR_VERSION, "seed": seed,
            "families": list(families), "levels": list(levels), "counts": {}}  # fmt: skip
    for split, n in (("train", n_train), ("val", n_val)):
        records = lab_records(n, seed, split, families, levels) if n else []
        synth.write_split(out, split, records)
        meta["counts"][split] = len(records)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# --- the comparison ---


def run_dir_of(runs: Path, method: str, seed: int) -> Path:
    return runs / f"{method}-seed{seed}"


def train_command(
    method: str, seed: int, runs: Path, overrides: Sequence[str], config: str | None = None
) -> list[str]:
    """The `mmrlsd train` command line of one run."""
    return mmrlsd_train(
        config or METHODS[method], run_dir_of(runs, method, seed), [f"trainer.seed={seed}", *overrides]
    )


def mmrlsd_train(config: str, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """`python -m mmrlsd train CONFIG --output-dir RUN_DIR --no-progress OVERRIDES...` in this interpreter."""
    return [sys.executable, "-m", "mmrlsd", "train", config, "--output-dir", str(run_dir), "--no-progress",
            *overrides]  # fmt: skip


def run_all(
    methods: Sequence[str], seeds: Sequence[int], runs: Path, overrides: Sequence[str], jobs: int = 2,
    configs: dict[str, str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Run every (method, seed), `jobs` processes at a time (interleaved by seed, so each method sees the same
    machine load on average); returns wall seconds per run. A failed run raises after all have finished."""
    runs.mkdir(parents=True, exist_ok=True)
    order = [(m, s) for s in seeds for m in methods]
    walls: dict[str, float] = {}
    failed: list[str] = []

    def one(ms: tuple[str, int]) -> None:
        m, s = ms
        cmd = train_command(m, s, runs, overrides, (configs or {}).get(m))
        log = run_dir_of(runs, m, s).with_suffix(".log")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.call(
                cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}
            )
        walls[f"{m}-seed{s}"] = time.perf_counter() - t0
        print(f"{m} seed {s}: rc={rc} in {walls[f'{m}-seed{s}']:.0f}s ({log})", flush=True)
        if rc != 0:
            failed.append(f"{m}-seed{s} (see {log})")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, order))
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}")
    return walls


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


def budget_text(config: str, overrides: Sequence[str]) -> str:
    """`100 steps x 16 prompts x 8 samples, lr 0.0001, val every 20 steps` from a method's config + overrides."""
    from mmrlsd.config import load_config

    c = load_config(config, list(overrides))
    return (f"{c.trainer.total_steps} steps x {c.rollout.batch_size} prompts x {c.rollout.n} samples, "
            f"lr {c.optim.lr:g}, val every {c.trainer.val_every} steps")  # fmt: skip


def compare(
    out: Path, runs: Path, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], jobs: int,
    configs: dict[str, str] | None = None, skip_runs: bool = False, add: bool = False,
) -> dict:  # fmt: skip
    """Run (unless `skip_runs`) and summarise the comparison; writes results.json, curves.png, table.md.

    `add`: run only `methods` and add them to the existing `out/results.json` (same seeds and overrides, the
    earlier methods' run directories still under `runs`); how each batch of runs was launched and timed is kept."""
    if add:
        return add_methods(out, runs, methods, seeds, overrides, jobs, configs)
    t0 = time.perf_counter()
    walls = {} if skip_runs else run_all(methods, seeds, runs, overrides, jobs, configs)
    previous = (
        json.loads((out / "results.json").read_text())
        if skip_runs and (out / "results.json").is_file()
        else {}
    )
    results = {
        "command": " ".join(["python -m mmrlsd.lab compare", *sys.argv[2:]])
        if sys.argv[1:2] == ["compare"]
        else "",
        "methods_configs": {m: (configs or {}).get(m, METHODS[m]) for m in methods},
        "seeds": list(seeds),
        "overrides": list(overrides),
        "budget_text": budget_text(configs.get(methods[0]) if configs else METHODS[methods[0]], overrides),
        "jobs": jobs,
        "wall_s": round(time.perf_counter() - t0, 1),
        "run_wall_s": {k: round(v, 1) for k, v in walls.items()},
        "load_avg_at_end": list(os.getloadavg()),
        "methods": summarize(runs, methods, seeds),
    }
    if previous:  # re-summarising existing runs: keep how and how long they ran
        keep = ("command", "jobs", "wall_s", "run_wall_s", "load_avg_at_end", "added")
        results.update({k: previous[k] for k in keep if k in previous})
    return write_results(out, results)


def write_results(out: Path, results: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table_markdown(results))
    plot(results, out / "curves.png")
    return results


def add_methods(
    out: Path, runs: Path, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], jobs: int,
    configs: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    """`compare(..., add=True)`: see there."""
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --add needs an earlier comparison to add to")
    prev = json.loads(path.read_text())
    if list(seeds) != prev["seeds"] or list(overrides) != prev["overrides"]:
        raise ValueError(f"{path}: --add must use the earlier seeds {prev['seeds']} and overrides "
                         f"{prev['overrides']} (the same budget), got {list(seeds)} and {list(overrides)}")  # fmt: skip
    t0 = time.perf_counter()
    walls = run_all(methods, seeds, runs, overrides, jobs, configs)
    every = list(prev["methods"]) + [m for m in methods if m not in prev["methods"]]
    added = {"command": " ".join(["python -m mmrlsd.lab compare", *sys.argv[2:]]), "methods": list(methods),
             "jobs": jobs, "wall_s": round(time.perf_counter() - t0, 1), "load_avg_at_end": list(os.getloadavg())}  # fmt: skip
    results = {
        **prev,
        "methods_configs": {
            **prev["methods_configs"],
            **{m: (configs or {}).get(m, METHODS[m]) for m in methods},
        },
        "run_wall_s": {**prev["run_wall_s"], **{k: round(v, 1) for k, v in walls.items()}},
        "added": [*prev.get("added", []), added],
        "methods": summarize(runs, every, seeds),
    }
    return write_results(out, results)


# --- the default run's acceptance check ---

FLOORS = {"wall_s": 600.0, "sample_accuracy_gain": 0.10, "accuracy_gain": 0.05, "val_items": 500}
"""Issue #4's bar for `mmrlsd train configs/tiny_cpu.yaml`: at most 10 minutes, val/sample_accuracy +0.10 and
val/accuracy +0.05 from the first validation to the last, on at least 500 validation items."""


def check_default(run_dir: Path, out: Path | None, config: str = "configs/tiny_cpu.yaml",
                  overrides: Sequence[str] = ()) -> dict:  # fmt: skip
    """Run `mmrlsd train CONFIG --output-dir RUN_DIR` in a fresh process, time it end to end (imports included),
    and judge it against `FLOORS`; writes the verdict as JSON to `out` when given."""
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    subprocess.run(
        mmrlsd_train(config, run_dir, overrides), check=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    wall = time.perf_counter() - t0
    run = read_run(run_dir)
    rows = read_metrics(run_dir)
    n_val = int(next(r["val/n"] for r in rows if "val/n" in r))
    acc, sacc = run["val/accuracy"], run["val/sample_accuracy"]
    res = {
        "command": " ".join(["mmrlsd train", config, "--output-dir", str(run_dir), *overrides]),
        "wall_s": round(wall, 1),
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "step_s_median": round(run["time/step_s_median"], 3),
        "steps": len(run["steps"]),
        "val_items": n_val,
        "val_steps": run["val_steps"],
        "val_accuracy": [round(x, 4) for x in acc],
        "val_sample_accuracy": [round(x, 4) for x in sacc],
        "accuracy_gain": round(acc[-1] - acc[0], 4),
        "sample_accuracy_gain": round(sacc[-1] - sacc[0], 4),
        "floors": FLOORS,
    }
    res["passed"] = (wall <= FLOORS["wall_s"] and res["sample_accuracy_gain"] >= FLOORS["sample_accuracy_gain"]
                     and res["accuracy_gain"] >= FLOORS["accuracy_gain"] and n_val >= FLOORS["val_items"])  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
    return res


# --- CLI ---


def main(argv: list[str] | None = None) -> int:
    examples = "examples:\n" + "\n".join(
        line for line in __doc__.splitlines() if "python -m mmrlsd.lab" in line
    )
    p = argparse.ArgumentParser(prog="python -m mmrlsd.lab", description=__doc__.split("\n\n")[0], epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the lab's data (train + val)")
    d.add_argument("--out", type=Path, default=Path("data/tiny/lab"))
    d.add_argument("--n", type=int, default=4000, help="train records (default 4000)")
    d.add_argument("--n-val", type=int, default=512, help="val records (default 512)")
    d.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="run GRPO, RLSD and OPSD for each seed and write the results")
    c.add_argument("--out", type=Path, default=Path("eval/results/tiny_lab"))
    c.add_argument("--runs", type=Path, default=Path("runs/tiny_lab"), help="run directories go here")
    c.add_argument("--methods", default=",".join(METHODS))
    c.add_argument("--seeds", default="0,1,2")
    c.add_argument(
        "--jobs", type=int, default=2, help="runs at a time (on 2 cores: 2, with trainer.threads=1)"
    )
    c.add_argument("--skip-runs", action="store_true", help="only summarise existing run directories")
    c.add_argument("--add", action="store_true",
                   help="run only --methods and add them to the existing results.json (same seeds and overrides)")  # fmt: skip
    c.add_argument("overrides", nargs="*", help="dotted overrides for every run (the shared budget)")
    k = sub.add_parser("check", help="time the default run and judge it against the issue's bar")
    k.add_argument("--run-dir", type=Path, default=Path("runs/tiny_default"))
    k.add_argument("--out", type=Path, default=Path("eval/results/tiny_lab/default_run.json"))
    k.add_argument("--config", default="configs/tiny_cpu.yaml")
    k.add_argument("overrides", nargs="*", help="dotted overrides passed to mmrlsd train")
    args = p.parse_args(argv)
    if args.command == "check":
        res = check_default(args.run_dir, args.out, args.config, args.overrides)
        print(json.dumps({k: v for k, v in res.items() if k not in ("floors",)}, indent=1))
        return 0 if res["passed"] else 1
    if args.command == "data":
        meta = write_lab_data(args.out, args.n, args.n_val, args.seed)
        print(f"wrote {meta['counts']} records to {args.out}")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    res = compare(args.out, args.runs, methods, seeds, args.overrides, args.jobs, skip_runs=args.skip_runs,
                  add=args.add)  # fmt: skip
    print(table_markdown(res))
    wall = res["added"][-1]["wall_s"] if args.add else res["wall_s"]
    print(f"wrote {args.out}/results.json, curves.png, table.md in {wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
