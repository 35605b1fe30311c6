"""The credit lab: step alignment of Δ_t, the paired t-interval, the t quantile, step credit over a dump, the
write-up's numbers, configs that differ only in the method lines, and `mmrlsd lab credit` end to end on a toy
budget (results written under tmp, never as the comparison's results)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from mmrlsd.config import load_config, to_dict
from mmrlsd.experiments.lab.credit import (
    CREDIT_METHODS,
    paired_difference,
    step_credit,
    step_errors,
    step_labels,
    t_quantile,
    write_up,
)

REPO = Path(__file__).resolve().parents[2]
TOKENS = ["<thought>", "a", " =", " 3", " ;", " b", " =", " 5", " ;", " 3", " +", " 5", " =", " 9", "</thought>",
          "<answer>", "9", "</answer>", "<|im_end|>"]  # fmt: skip
REF = "a = 3 ; b = 5 ; 3 + 5 = 8"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_step_labels_by_hand():
    labels = step_labels(TOKENS, REF)
    R, W, O = "right", "first_wrong", "other"  # noqa: E741
    assert labels == [O, R, R, R, O, R, R, R, O, W, W, W, W, W, O, O, "answer", O, O]
    # a misread digit: that reading is the first wrong step, the sums built on it come later
    toks = [
        "<thought>",
        "a",
        " =",
        " 4",
        " ;",
        " b",
        " =",
        " 5",
        " ;",
        " 4",
        " +",
        " 5",
        " =",
        " 9",
        "</thought>",
    ]
    assert step_labels(toks, REF)[1:14] == ["first_wrong"] * 3 + [O] + [R] * 3 + [O] + ["later_wrong"] * 5
    # a token glued to its separator belongs to the step after it; an unclosed thought has no steps
    assert step_labels(["<thought>", "a = 3", " ; b", " = 5", "</thought>"], "a = 3 ; b = 6") == [
        O,
        R,
        W,
        W,
        O,
    ]
    assert step_labels(["<thought>", "a", " = 3"], REF) == [O, O, O]
    # a response with more steps than the reference: the extra ones are wrong
    assert step_labels(["<thought>", "a = 3 ;", " b = 5 ;", " 3 + 5 = 8 ;", " 8", "</thought>"], REF)[
        1:5
    ] == [R, R, R, W]


def test_t_quantile_matches_tables():
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)


def test_paired_difference_by_hand():
    p = paired_difference({"0": 0.10, "1": 0.05, "2": 0.20}, {"0": 0.02, "1": 0.07, "2": 0.08})
    # diffs 0.08, -0.02, 0.12: mean 0.06, sd sqrt(0.0052), half = 4.302653 * sd / sqrt(3) = 0.179132
    assert p["n"] == 3 and p["mean"] == 0.06 and p["per_seed"] == {"0": 0.08, "1": -0.02, "2": 0.12}
    assert p["ci95"] == [-0.1191, 0.2391]
    assert paired_difference({"0": 0.1}, {"0": 0.0})["ci95"] is None


def test_step_credit_from_a_dump(tmp_path):
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "x", "solution": f"<thought>{REF}</thought><answer>8</answer>"}) + "\n")
    (run / "config.yaml").write_text(json.dumps({"data": {"train_files": [str(data)]}}))
    delta = [
        0.0,
        -0.1,
        -0.1,
        -0.1,
        0.0,
        0.3,
        0.0,
        0.0,
        0.0,
        -1.0,
        -1.0,
        -2.0,
        -1.0,
        -3.0,
        0.0,
        0.0,
        -0.5,
        0,
        0,
    ]
    # RLSD's Â_t at λ = 0.5, ε_w = 0.2, A = -2: A·(0.5 + 0.5·clip(exp(-Δ_t), 0.8, 1.2))
    token_adv = [-2.0 * (0.5 + 0.5 * min(max(math.exp(-d), 0.8), 1.2)) for d in delta]
    rows = [{"id": "x", "adv": -2.0, "tokens": TOKENS, "delta": delta, "w": [math.exp(-d) for d in delta],
             "token_adv": token_adv},
            {"id": "x", "adv": 0.0, "tokens": TOKENS, "delta": delta, "w": delta}]  # fmt: skip
    (run / "rollouts" / "step_000005.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sc = step_credit([run], eps_w=0.2)
    neg = sc["A<0"]
    # right steps: Δ -0.1 x 3, 0.3, 0, 0 (mean 0); only w = exp(-0.3) = 0.741 lies outside [0.8, 1.2]
    # Â_t / A on the right steps: 0.5 + 0.5·w with w = exp(0.1) x 3, exp(-0.3) -> 0.8 (clipped), 1, 1
    right_scale = statistics.fmean([0.5 + 0.5 * math.exp(0.1)] * 3 + [0.9, 1.0, 1.0])
    assert neg["right"] == {"tokens": 6, "delta_mean": 0.0, "clipped_frac": round(1 / 6, 4),
                            "adv_scale": round(right_scale, 4)}  # fmt: skip
    # the first wrong step: Δ <= -1 on every token, w = exp(-Δ) > 1.2 is clipped: Â_t = 1.1·A
    assert neg["first_wrong"] == {"tokens": 5, "delta_mean": -1.6, "clipped_frac": 1.0, "adv_scale": 1.1}
    assert neg["answer"]["delta_mean"] == -0.5 and "A>0" not in sc  # the A = 0 row is left out
    assert sc["error_localised"] == {"responses": 1, "frac": 1.0}


def test_step_errors_counts_wrong_readings_and_inconsistent_arithmetic():
    ref = "a = 3 ; b = 7 ; c = 2 ; 3 + 7 = 10 ; 10 - 2 = 8"
    assert step_errors(f"<thought>{ref}</thought><answer>8</answer>", ref) == (3, 0, 2, 0)
    # b misread as 1: the next step is consistent with the misreading (3 + 1 = 4), so it is not an arithmetic error
    text = "<thought>a = 3 ; b = 1 ; c = 2 ; 3 + 1 = 4 ; 4 - 2 = 3</thought><answer>3</answer>"
    assert step_errors(text, ref) == (3, 1, 2, 1)  # 4 - 2 = 3 is
    # an answer-shaped fudge: readings right, the result bent; a non-number operand counts as inconsistent
    assert step_errors("<thought>a = 3 ; b = 7 ; c = 2 ; 3 + 7 = 12 ; x - 2 = 8</thought>", ref) == (
        3,
        0,
        2,
        2,
    )
    assert step_errors("no thought here", ref) == (0, 0, 0, 0)


def test_configs_differ_only_in_the_method_lines():
    def flat(name: str) -> dict:
        return _flat(to_dict(load_config(REPO / "configs" / f"credit_{name}.yaml")))

    rlsd, grpo, opsd, sdpo = (flat(n) for n in ("rlsd", "grpo", "opsd", "sdpo"))
    assert {k for k in rlsd if rlsd[k] != grpo[k]} == {"algo.lam0"} and grpo["algo.lam0"] == 0
    assert {k for k in rlsd if rlsd[k] != opsd[k]} == {"algo.token_adv", "algo.teacher_info"}
    assert {k for k in opsd if opsd[k] != sdpo[k]} == {"algo.teacher_info"} and sdpo[
        "algo.teacher_info"
    ] == "sibling"
    assert rlsd["algo.online_filtering"] is True and rlsd["algo.eps_w"] == 0.2 and rlsd["algo.lam0"] == 0.5
    assert rlsd["algo.lam_decay_steps"] == rlsd["trainer.total_steps"]
    for config, extra in CREDIT_METHODS.values():
        load_config(REPO / config, list(extra))  # every sweep point is a valid config
    assert {m for m in CREDIT_METHODS if m.startswith("rlsd")} == {
        "rlsd",
        "rlsd_eps05",
        "rlsd_eps10",
        "rlsd_eps10_lam1",
    }


def _toy_results() -> dict:
    def method(gains: list[float]) -> dict:
        return {"seeds": {str(i): {"greedy_gain": g, "sampled_gain": g / 2} for i, g in enumerate(gains)},
                "greedy_gain": {"mean": round(statistics.fmean(gains), 4), "sd": round(statistics.stdev(gains), 4)},
                "sampled_gain": {"mean": 0.01, "sd": 0.0}, "greedy_first": {"mean": 0.5, "sd": 0.0},
                "all_equal_mean": {"mean": 0.25, "sd": 0.0}, "wall_s": {"mean": 300.0, "sd": 1.0},
                "step_credit": {"A<0": {"right": {"tokens": 10, "delta_mean": -0.1, "clipped_frac": 0.1},
                                        "first_wrong": {"tokens": 4, "delta_mean": -1.25, "clipped_frac": 0.75}},
                                "error_localised": {"responses": 8, "frac": 0.875}}}  # fmt: skip

    methods = {"grpo": method([0.02, 0.07, 0.08]), "rlsd": method([0.10, 0.05, 0.20])}
    paired = {"rlsd": paired_difference({s: v["greedy_gain"] for s, v in methods["rlsd"]["seeds"].items()},
                                        {s: v["greedy_gain"] for s, v in methods["grpo"]["seeds"].items()})}  # fmt: skip
    return {"task": "digit_chain", "mean_response_tokens": 54.11, "budget_text": "40 steps", "seeds": [0, 1, 2],
            "jobs": 2, "wall_s": 1234.0, "command": "mmrlsd lab credit", "methods": methods,
            "methods_configs": {"grpo": {"overrides": []}, "rlsd": {"overrides": []}},
            "paired_minus_grpo": paired, "paired_rlsd_minus_grpo": paired["rlsd"]}  # fmt: skip


def test_write_up_numbers_come_from_the_results():
    text = write_up(_toy_results())
    assert "54.1 tokens" in text and "1234 s" in text
    assert "| rlsd − grpo | +0.060 | [-0.119, +0.239] | +0.080, -0.020, +0.120 |" in text
    assert "**Not resolved.**" in text and "-1.250 on the first wrong step against -0.100" in text
    assert "0.875 of 8 responses" in text
    res = _toy_results()
    res["paired_rlsd_minus_grpo"] = {**res["paired_rlsd_minus_grpo"], "mean": 0.1, "ci95": [0.02, 0.18]}
    assert "**Yes.** RLSD's greedy gain exceeds GRPO's by +0.100" in write_up(res)
    assert "0.875 of 8 | - |" in text and "What reaches the update" not in text  # no token advantages dumped
    neg = res["methods"]["rlsd"]["step_credit"]["A<0"]
    neg["right"]["adv_scale"], neg["first_wrong"]["adv_scale"] = 0.998, 1.041
    text = write_up(res)
    assert "0.875 of 8 | 0.998, 1.041 |" in text
    assert "Â_t is on average 1.041·A on the first wrong step and 0.998·A on the right steps" in text
    mean = {"accuracy": 0.061, "reading_wrong": 0.2, "arithmetic_wrong": 0.29}
    res["census"] = {"items": 256, "start": {"accuracy": 0.48, "reading_wrong": 0.007, "arithmetic_wrong": 0.064},
                     "methods": {"opsd": {"mean": mean}}}  # fmt: skip
    text = write_up(res)
    assert "| start | 0.480 | 0.0070 | 0.0640 |" in text and "| opsd | 0.061 | 0.2000 | 0.2900 |" in text
    assert "`opsd` ends at 0.061 greedy accuracy (start 0.480) with 0.290 of its arithmetic steps" in text


def test_what_would_change_is_computed_from_the_results():
    res = _toy_results()  # paired +0.080, -0.020, +0.120: mean +0.060, sd 0.0721, interval contains 0
    neg = res["methods"]["rlsd"]["step_credit"]["A<0"]
    neg["right"]["adv_scale"], neg["first_wrong"]["adv_scale"] = 0.998, 1.041
    for m, (g0, g1) in {"grpo": (0.5, 0.52), "rlsd": (0.5, 0.6)}.items():
        for s in res["methods"][m]["seeds"].values():
            s.update(greedy_first=g0, greedy_last=g1, sampled_first=0.25, sampled_last=0.375)
    text = write_up(res)
    assert "**What would have to change.**" in text
    assert (
        "spread with sd 0.072, so a difference of +0.060 would need about 6 seeds" in text
    )  # (1.96·0.0721/0.06)² = 5.5
    assert "`rlsd`, raises the first wrong step's Â_t/A only to 1.041 and ends +0.060 against GRPO" in text
    assert (
        "averages -1.250 nats (exp(|Δ|) ≈ 3.49), and it is lower there than on the right steps in 0.875"
        in text
    )
    assert (
        "grpo: sampled 0.250 → 0.375, greedy 0.500 → 0.520; rlsd: sampled 0.250 → 0.375, greedy 0.500 → 0.600"
        in text
    )
    res["paired_rlsd_minus_grpo"] = {**res["paired_rlsd_minus_grpo"], "ci95": [0.02, 0.18]}
    assert "What would have to change" not in write_up(res)  # RLSD above GRPO: nothing to explain


@pytest.mark.skipif(not (REPO / "data" / "tiny" / "sft-credit" / "model.safetensors").is_file(),
                    reason="the credit lab's SFT model is not there")  # fmt: skip
def test_lab_credit_end_to_end_on_a_toy_budget(tmp_path, monkeypatch):
    """`mmrlsd lab credit` with two methods, one seed, 2 steps: runs, results.json schema, plot, README."""
    from mmrlsd.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    budget = ["rollout.batch_size=2", "rollout.n=4", "data.max_val_items=4", "trainer.total_steps=2",
              "trainer.val_every=2", "trainer.dump_every=1", "rollout.max_new_tokens=72", "algo.max_refill_tries=1"]  # fmt: skip
    argv = ["lab", "credit", "--out", str(out), "--runs", str(tmp_path / "runs"), "--methods", "grpo,rlsd",
            "--seeds", "0,1", "--jobs", "2", "--census-items", "4", *budget]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mean_response_tokens"] == pytest.approx(66.7, abs=0.1)
    for m in ("grpo", "rlsd"):
        seeds = res["methods"][m]["seeds"]
        assert set(seeds) == {"0", "1"}
        for s in seeds.values():
            assert s["greedy_gain"] == pytest.approx(s["greedy_last"] - s["greedy_first"], abs=1e-4)
            assert s["wall_s"] > 0
        assert res["methods"][m]["greedy_gain"]["mean"] == pytest.approx(
            statistics.fmean(s["greedy_gain"] for s in seeds.values()), abs=1e-4
        )
    p = res["paired_rlsd_minus_grpo"]
    again = paired_difference({s: v["greedy_gain"] for s, v in res["methods"]["rlsd"]["seeds"].items()},
                              {s: v["greedy_gain"] for s, v in res["methods"]["grpo"]["seeds"].items()})  # fmt: skip
    assert p == again and p["n"] == 2
    assert set(res["methods"]["rlsd"]["step_credit"]) >= {"error_localised"}
    assert (out / "credit.png").stat().st_size > 10_000
    assert (out / "README.md").read_text() == write_up(res)
    census = res["census"]
    assert census["items"] == 4 and set(census["methods"]) == {"grpo", "rlsd"}
    for m in ("grpo", "rlsd"):
        per = census["methods"][m]["seeds"]
        assert set(per) == {"0", "1"} and all(v["items"] == 4 for v in per.values())
        assert census["methods"][m]["mean"]["accuracy"] == pytest.approx(
            statistics.fmean(v["accuracy"] for v in per.values()), abs=1e-4
        )
    # the start census scores the shipped model: its greedy accuracy on the first 4 items equals a run's step-0
    # validation on the same items
    start = res["methods"]["grpo"]["curves"]["0"]["val/accuracy"][0]
    assert census["start"]["accuracy"] == pytest.approx(start, abs=1e-4)


def test_committed_results_write_up_and_interval_are_recomputable():
    """The shipped comparison: README is exactly write_up(results.json), and the paired interval and each method's
    mean gain follow from the per-seed numbers."""
    out = REPO / "eval" / "results" / "credit_lab"
    res = json.loads((out / "results.json").read_text())
    assert (out / "README.md").read_text() == write_up(res)
    assert (out / "credit.png").stat().st_size > 10_000
    gains = {m: {s: v["greedy_gain"] for s, v in r["seeds"].items()} for m, r in res["methods"].items()}
    assert len(gains["rlsd"]) >= 5 and gains["rlsd"].keys() == gains["grpo"].keys()
    assert res["paired_rlsd_minus_grpo"] == paired_difference(gains["rlsd"], gains["grpo"])
    for m, g in gains.items():
        assert res["methods"][m]["greedy_gain"]["mean"] == pytest.approx(
            statistics.fmean(g.values()), abs=1e-4
        )
        for s in res["methods"][m]["seeds"].values():
            assert s["greedy_gain"] == pytest.approx(s["greedy_last"] - s["greedy_first"], abs=1e-4)
    assert 40 <= res["mean_response_tokens"] <= 120
