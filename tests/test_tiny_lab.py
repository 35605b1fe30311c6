"""The tiny lab: its data (deterministic, committed copy up to date), the configs (baselines differ from RLSD only
where the method does), the shipped checkpoint (size, tokenizer, no image resizing), a short RL run from it, the
comparison script on a trivial budget, and the write-up's numbers against results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmrlsd.config import load_config, to_dict
from mmrlsd.data import synth
from mmrlsd.experiments.lab.check import FLOORS, check_default
from mmrlsd.experiments.lab.compare import compare
from mmrlsd.experiments.lab.data import LAB_FAMILIES, LAB_LEVELS, lab_records, write_lab_data
from mmrlsd.experiments.lab.report import table_markdown
from mmrlsd.experiments.lab.runs import METHODS
from mmrlsd.experiments.lab.stats import demo_credit

REPO = Path(__file__).resolve().parents[1]
LAB_DATA = REPO / "data" / "tiny" / "lab"
CKPT = REPO / "data" / "tiny" / "sft-qwen2vl"
RESULTS = REPO / "eval" / "results" / "tiny_lab"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_lab_records_are_deterministic_prefixes_with_interleaved_levels():
    a = lab_records(12, seed=0, split="val")
    b = lab_records(20, seed=0, split="val")
    strip = [{k: v for k, v in r.items() if k != "pil_images"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "pil_images"} for r in b[:12]]
    assert [r["level"] for r in a] == [1, 2] * 6
    # families go round-robin within a level: level-1 records 0, 2, 4, 6 cover the four families
    assert [r["family"] for r in a[0:8:2]] == list(LAB_FAMILIES)
    assert len({r["id"] for r in b}) == 20
    assert {r["level"] for r in b} == set(LAB_LEVELS)
    assert all(r["images"] == [f"images/{r['id']}.png"] for r in b)
    other = lab_records(12, seed=1, split="val")
    assert [r["problem"] for r in other] != [r["problem"] for r in a]


def test_committed_lab_data_matches_the_generator(tmp_path):
    meta = json.loads((LAB_DATA / "meta.json").read_text())
    assert meta["counts"] == {"train": 4000, "val": 512}
    assert meta["families"] == list(LAB_FAMILIES) and meta["levels"] == list(LAB_LEVELS)
    write_lab_data(tmp_path, n_train=10, n_val=10, seed=meta["seed"])
    for split in ("train", "val"):
        committed = (LAB_DATA / f"{split}.jsonl").read_text().splitlines()
        fresh = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert committed[:10] == fresh
        for line in fresh:
            rel = json.loads(line)["images"][0]
            assert (LAB_DATA / rel).read_bytes() == (tmp_path / rel).read_bytes()

    # val never shares an item (question + image) with train: synth splits by content hash
    def items(split: str) -> set:
        rows = map(json.loads, (LAB_DATA / f"{split}.jsonl").read_text().splitlines())
        return {(r["problem"], (LAB_DATA / r["images"][0]).read_bytes()) for r in rows}

    assert not items("train") & items("val")


def test_baseline_configs_differ_only_where_the_method_does():
    rlsd = _flat(to_dict(load_config(REPO / "configs" / "tiny_cpu.yaml")))
    grpo = _flat(to_dict(load_config(REPO / "configs" / "grpo_tiny_cpu.yaml")))
    opsd = _flat(to_dict(load_config(REPO / "configs" / "opsd_tiny_cpu.yaml")))
    assert rlsd["algo.token_adv"] == "rlsd" and rlsd["algo.lam0"] > 0
    assert {k for k in rlsd if rlsd[k] != grpo[k]} == {"algo.lam0"}
    assert grpo["algo.lam0"] == 0.0
    diff = {k for k in rlsd if rlsd[k] != opsd[k]}
    assert diff <= {"algo.token_adv", "algo.teacher_info", "optim.lr"}
    assert opsd["algo.token_adv"] == "opsd" and opsd["algo.teacher_info"] == "solution"
    assert rlsd["data.max_val_items"] == 0 or rlsd["data.max_val_items"] >= 500
    sdpo = _flat(to_dict(load_config(REPO / "configs" / "sdpo_tiny_cpu.yaml")))
    assert {k for k in opsd if opsd[k] != sdpo[k]} == {"algo.teacher_info"} and sdpo[
        "algo.teacher_info"
    ] == "sibling"
    assert set(METHODS) == {"grpo", "rlsd", "opsd", "sdpo"}


def test_shipped_checkpoint_is_small_and_does_not_resize_images():
    from PIL import Image

    from mmrlsd.data.encoding import encode
    from mmrlsd.model.load import load_model

    size = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    policy, processor = load_model(str(CKPT))
    assert policy.config.model_type == "qwen2_vl"
    tok = processor.tokenizer
    for tag in synth.TAGS:
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    enc = encode(processor, ["<|vision_start|><|image_pad|><|vision_end|>x"], [[Image.new("RGB", (56, 56))]])
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches of 14 px -> 2x2 = 4 merged tokens


@pytest.fixture(scope="module")
def tiny_budget():
    """Overrides that shrink a lab run to seconds: 2 prompts x 4 samples, 8 validation items."""
    return ["rollout.batch_size=2", "rollout.n=4", "data.max_val_items=8", "trainer.total_steps=2",
            "trainer.val_every=2", "trainer.save_every=0", "trainer.threads=1", "rollout.max_new_tokens=24"]  # fmt: skip


def test_rl_smoke_from_the_shipped_checkpoint(tmp_path, tiny_budget):
    from mmrlsd.log import read_dump, read_metrics
    from mmrlsd.train.loop import train

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*tiny_budget, "trainer.dump_every=1"])
    run = train(cfg, tmp_path / "run", progress=False)
    m = read_metrics(run)
    assert [r["step"] for r in m] == [0, 1, 2]
    assert m[0]["val/n"] == 8 and "val/sample_accuracy" in m[-1]
    for r in m[1:]:
        assert r["reward/format"] > 0.5  # the SFT model answers in the <thought>/<answer> format
        assert r["rlsd/teacher_pass"] == 1.0
    dump = read_dump(run, 2)
    assert dump and all(len(d["delta"]) == len(d["token_ids"]) for d in dump)


def test_compare_on_a_trivial_budget(tmp_path, tiny_budget):
    res = compare(tmp_path / "out", tmp_path / "runs", list(METHODS), [0], tiny_budget, jobs=3)
    from mmrlsd.log import read_metrics

    for m in METHODS:
        s = res["methods"][m]["summary"]
        vals = [r["val/accuracy"] for r in read_metrics(tmp_path / "runs" / f"{m}-seed0") if "val/accuracy" in r]
        assert len(vals) == 2  # before the first step and after the last
        assert s["accuracy_first"]["mean"] == round(vals[0], 4) and s["accuracy_last"]["mean"] == round(vals[-1], 4)
        assert s["accuracy_gain_per_seed"] == [round(vals[-1] - vals[0], 4)]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["methods"].keys() == set(METHODS)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "table.md").read_text() == table_markdown(saved)


def test_add_puts_one_more_method_beside_the_earlier_ones(tmp_path, tiny_budget):
    out, runs = tmp_path / "out", tmp_path / "runs"
    first = compare(out, runs, ["grpo"], [0], tiny_budget, jobs=1)
    with pytest.raises(ValueError, match="--add must use the earlier seeds"):
        compare(out, runs, ["sdpo"], [0, 1], tiny_budget, jobs=1, add=True)
    res = compare(out, runs, ["sdpo"], [0], tiny_budget, jobs=1, add=True)
    assert list(res["methods"]) == ["grpo", "sdpo"]
    assert res["methods"]["grpo"] == first["methods"]["grpo"]  # re-read from the same run directories
    assert set(res["run_wall_s"]) == {"grpo-seed0", "sdpo-seed0"} and res["wall_s"] == first["wall_s"]
    assert res["added"][0]["methods"] == ["sdpo"] and res["methods_configs"]["sdpo"] == METHODS["sdpo"]
    assert json.loads((out / "results.json").read_text()) == res
    assert "| sdpo |" in (out / "table.md").read_text()
    with pytest.raises(FileNotFoundError, match="--add needs an earlier comparison"):
        compare(tmp_path / "none", runs, ["sdpo"], [0], tiny_budget, jobs=1, add=True)


def test_demo_credit_sorts_sdpo_rows_by_how_they_relate_to_their_demonstration(tmp_path):
    def row(sample, demo, acc, text, delta):
        return {"sample": sample, "demo": demo, "accuracy": acc, "response": text, "delta": delta}

    rows = [row(0, 1, 1.0, "a", [0.5, 0.25]), row(1, 0, 1.0, "a", [0.0, 0.25]), row(2, 0, 1.0, "b", [-3.0, 1.0]),
            row(3, 0, 0.0, "c", [-4.0]), row(4, None, 1.0, "d", [0.0]), row(5, 9, 0.0, "e", [-1.0])]  # fmt: skip
    (tmp_path / "r" / "rollouts").mkdir(parents=True)
    (tmp_path / "r" / "rollouts" / "step_000010.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    out = demo_credit([tmp_path / "r"])
    assert out["rows"] == 6 and out["no_demo_frac"] == pytest.approx(1 / 6, abs=1e-4)
    assert out["correct_same_text"] == {"rows": 2, "delta_sum_mean": 0.5, "negative_frac": 0.0}
    assert out["correct_other_text"] == {"rows": 1, "delta_sum_mean": -2.0, "negative_frac": 1.0}
    assert out["wrong"] == {
        "rows": 1,
        "delta_sum_mean": -4.0,
        "negative_frac": 1.0,
    }  # row 5's demo was not dumped
    (tmp_path / "g" / "rollouts").mkdir(parents=True)
    (tmp_path / "g" / "rollouts" / "step_000010.jsonl").write_text(
        json.dumps({"sample": 0, "delta": [0.0]}) + "\n"
    )
    assert demo_credit([tmp_path / "g"]) == {}  # not an SDPO run


def test_check_judges_the_default_run_against_the_floors(tmp_path, tiny_budget):
    res = check_default(tmp_path / "run", tmp_path / "check.json", overrides=tiny_budget)
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved == res
    from mmrlsd.log import read_metrics

    assert res["val_items"] == 8 and res["val_steps"] == [0, 2] and res["steps"] == 2
    vals = [r for r in read_metrics(tmp_path / "run") if "val/accuracy" in r]  # what the run wrote
    assert res["val_accuracy"] == [round(r["val/accuracy"], 4) for r in vals]
    assert res["val_sample_accuracy"] == [round(r["val/sample_accuracy"], 4) for r in vals]
    assert res["accuracy_gain"] == round(vals[-1]["val/accuracy"] - vals[0]["val/accuracy"], 4)
    assert 0 < res["wall_s"] < FLOORS["wall_s"]
    assert res["passed"] is False  # 8 validation items are below the 500-item floor, whatever the gains


@pytest.mark.skipif(
    not (RESULTS / "results.json").is_file(),
    reason="the GRPO/RLSD/OPSD comparison has not been run yet (mmrlsd lab compare)",
)
def test_write_up_numbers_are_those_in_results_json():
    results = json.loads((RESULTS / "results.json").read_text())
    readme = (RESULTS / "README.md").read_text()
    assert table_markdown(results) in readme  # the results tables, verbatim
    # every 3-decimal number in the prose is in results.json, default_run.json or the probe (as printed)
    numbers = set(re.findall(r"(?<![\d.])\d\.\d{3}(?!\d)", readme))
    in_json: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, float):
            in_json.update({f"{x:.3f}", f"{abs(x):.3f}"})
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for m in results["methods"].values():  # summaries and validation points, not the ~10,000 per-step values
        walk(
            [m["summary"], m["token_credit"], m.get("demo_credit", {})]
            + [[r["val/accuracy"], r["val/sample_accuracy"]] for r in m["runs"].values()]
        )
    for name in ("default_run.json", "probe_opsd_lr1e-3.json"):
        walk(json.loads((RESULTS / name).read_text()))
    missing = sorted(numbers - in_json)
    assert not missing, f"numbers in README.md not in the JSON files: {missing}"
    check = json.loads((RESULTS / "default_run.json").read_text())
    assert check["passed"] and check["val_items"] >= FLOORS["val_items"]
