"""`mmrlsd perf`: strict config, a torch-free CLI module, and one tiny end-to-end run whose JSON has the keys the
report needs; the fast and the plain step compute the same Δ on the same rollouts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmrlsd.cli.perf import resolve_config
from mmrlsd.experiments.perf import PHASES, PerfConfig, load_perf_config, table

REPO = Path(__file__).resolve().parents[1]


def test_committed_configs_load():
    for name, extra in (("cpu", {"rlsd_generate"}), ("gpu", {"rlsd_tower_loop"})):
        cfg = load_perf_config(resolve_config(name))
        assert set(cfg.variants) == {"naive", "grpo", "rlsd", "trl"} | extra
    assert load_perf_config(resolve_config("gpu")).shape == "qwen2_5_vl_3b"


def test_config_rejects_unknown_keys_and_variants(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("arch: qwen2_vl\nrepeat: 3\n")
    with pytest.raises(ValueError, match="unknown key.*repeat"):
        load_perf_config(p)
    p.write_text("variants: [naive, vllm]\n")
    with pytest.raises(ValueError, match="vllm"):
        load_perf_config(p)
    p.write_text("arch: qwen2_vl\n")
    cfg = load_perf_config(p, ["repeats=1", "variants=[naive,rlsd]"])
    assert cfg.repeats == 1 and cfg.variants == ["naive", "rlsd"] and cfg.arch == "qwen2_vl"


def test_cli_module_imports_no_torch():
    code = "import sys, argparse, mmrlsd.cli.perf as c; c.add_arguments(argparse.ArgumentParser()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_table_lists_every_variant():
    phases = dict.fromkeys(PHASES, 0.5)
    v = {"step_median_s": 2.0, "phases": phases, "response_tokens_per_s": 10.0}
    res = {"device": "cpu", "load_avg_before": [1.0], "load_avg_after": [2.0], "variants": {"naive": v, "rlsd": v},
           "rlsd_over_grpo_step_time": 1.05, "errors": {"trl": "ImportError: no trl"}}  # fmt: skip
    text = table(res)
    assert (
        "naive" in text
        and "rlsd" in text
        and "rlsd_over_grpo_step_time: 1.050" in text
        and "trl: FAILED" in text
    )


def test_tiny_end_to_end(tmp_path, monkeypatch):
    """Every variant runs one step of a very small model; the JSON carries the required keys (TRL when installed)."""
    from mmrlsd.experiments.perf import run

    monkeypatch.chdir(tmp_path)  # TRL writes into the working directory
    variants = ["naive", "grpo", "rlsd", "rlsd_generate", "rlsd_tower_loop"]
    try:
        import trl  # noqa: F401

        variants.append("trl")
    except ImportError:
        pass
    pc = PerfConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=16, vision_depth=1,
                    vision_heads=1, device="cpu", batch_size=2, group_size=2, max_new_tokens=4, image_px=56,
                    micro_batch_size=2, token_budget=200, logprob_chunk=16, warmup=0, repeats=1, variants=variants)  # fmt: skip
    result, path = run(pc, tmp_path / "out")
    assert result["errors"] == {}, result["errors"]
    saved = json.loads(path.read_text())
    for key in (
        "device",
        "rlsd_over_grpo_step_time",
        "speedup_vs_trl",
        "phases",
        "variants",
        "load_avg_before",
    ):
        assert key in saved
    assert set(saved["phases"]) == set(variants)
    assert (
        saved["phases"]["naive"]["old_logp"] > 0 and saved["phases"]["rlsd"]["old_logp"] == 0
    )  # pass skipped
    assert saved["phases"]["rlsd"]["teacher"] > 0 and saved["phases"]["grpo"]["teacher"] == 0
    assert saved["rlsd_over_grpo_step_time"] > 0
    assert (saved["speedup_vs_trl"] is not None) == ("trl" in variants)
    # the lean decode loop and `generate` sample the same responses: identical work, compared by time
    lean, old = saved["variants"]["rlsd"], saved["variants"]["rlsd_generate"]
    assert lean["response_len_mean"] == old["response_len_mean"] > 0
    assert saved["lean_rollout_speedup"] > 0 and lean["rollout_tokens_per_s"] > 0
    # the vision tower's windows batched or one by one: the same numbers, so the same responses
    assert saved["variants"]["rlsd_tower_loop"]["response_len_mean"] == lean["response_len_mean"]
    assert saved["vision_windows_step_speedup"] > 0


def test_fast_step_forms_the_same_delta(tiny_model, tiny_records):
    """Step 1 of the plain path and of the fast path (no old-log-prob pass: Δ inside the update) on the same
    rollouts: the same Δ_t and Â_t in the dump, to 1e-5."""
    sys.path.insert(0, str(REPO / "tests" / "plugins"))
    from mmrlsd.config import load_config
    from mmrlsd.data.sources import FieldMap, load_dataset_files
    from mmrlsd.train.loop import build
    from mmrlsd.train.step import rlsd_step

    overrides = [f"model.path={tiny_model('qwen2_5_vl')}", f"data.train_files=[{tiny_records}]",
                 "reward.name=charcount", "reward.plugins=[charcount_reward]", "rollout.n=4", "rollout.batch_size=2",
                 "rollout.max_new_tokens=8", "optim.micro_batch_size=3", "trainer.dump_max=8"]  # fmt: skip
    dumps = []
    for fast in (False, True):
        cfg = load_config(None, overrides)
        cfg.model.packing = cfg.model.share_vision = cfg.model.share_prefix = fast
        cfg.model.logprob_chunk = 5 if fast else 0
        ctx = build(cfg)
        data = load_dataset_files(
            cfg.data.train_files, FieldMap(), "train", shuffle=False, seed=0, max_pixels=112 * 112
        )
        result = rlsd_step(ctx, data.next_batch(2), step=1, seed=7)
        assert ("time/old_logp" in result.metrics) == (not fast)
        dumps.append(result.dump)
    for a, b in zip(*dumps):
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(torch.tensor(b["delta"]), torch.tensor(a["delta"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(b["token_adv"]), torch.tensor(a["token_adv"]), rtol=0, atol=1e-5
        )


def test_rollout_ab_tiny(tmp_path, monkeypatch):
    """The rollout-only comparison runs every decode setting on the same batch, refuses settings that sample other
    ids, and breaks the lean call's time down into non-negative parts."""
    from mmrlsd.experiments import perf

    pc = PerfConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=16, vision_depth=1,
                    vision_heads=1, device="cpu", batch_size=2, group_size=2, max_new_tokens=5, image_px=56)  # fmt: skip
    result, path = perf.rollout_ab(pc, 1, tmp_path)
    assert path.name.endswith("-cpu-rollout-ab.json") and json.loads(path.read_text()) == result
    assert set(result["settings"]) == set(perf.ROLLOUT_SETTINGS)
    assert all(len(s["calls_s"]) == 1 and s["median_s"] > 0 for s in result["settings"].values())
    assert set(result["first_call_s"]) == {"compile_cascade"} and result["first_call_s"]["compile_cascade"] > 0
    b = result["lean_breakdown"]
    assert b["decode_forwards"] == len(b["decode_batch_rows"]) >= 1 and b["decode_batch_rows"][0] == 4
    parts = ("decode_linear_s", "decode_attention_s", "decode_layers_other_s", "decode_lm_head_s",
             "decode_model_other_s", "outside_model_s", "prefill_forward_s")  # fmt: skip
    assert all(b[k] > 0 for k in parts), b
    assert b["decode_linear_s"] + b["decode_attention_s"] < b["decode_forwards_s"] < b["total_s"]
    monkeypatch.setitem(perf.ROLLOUT_SETTINGS, "greedy", {"temperature": 0.0})  # other samples: refused
    with pytest.raises(RuntimeError, match="greedy sampled other ids"):
        perf.rollout_ab(pc, 1, tmp_path)
