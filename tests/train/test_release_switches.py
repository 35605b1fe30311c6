"""The release's training switches through a real step: `algo.rlsd_thought_only` / `rlsd_negative_only` (the
teacher reweights only the tokens they name; elsewhere Δ_t = 0 and Â_t = A exactly), online filtering with refill
(data drawn, metrics, padding when no group passes; a band every group passes changes nothing), the release's
OPSD loss (Â_t = coef whatever Δ_t) and SDPO's shortest pick with feedback."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mmrlsd.config import load_config
from mmrlsd.log import read_dump, read_metrics
from mmrlsd.train.loop import train

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
sys.path.insert(0, str(REPO / "tests" / "plugins"))
from test_train_smoke import tiny_overrides  # noqa: E402

LAB = [f"model.path={REPO / 'data' / 'tiny' / 'sft-qwen2vl'}", f"data.train_files=[{REPO / 'data/tiny/lab/train.jsonl'}]",
       "data.val_files=[]", "trainer.val_every=0", "rollout.batch_size=4", "rollout.n=4", "trainer.total_steps=1",
       "optim.mini_batches=1", "optim.warmup_steps=0", "trainer.dump_every=1", "trainer.dump_max=16",
       "trainer.save_every=0", "trainer.keep_last=0", "trainer.threads=1", "algo.lam_decay_steps=10"]  # fmt: skip


def lab_run(tmp_path: Path, name: str, *extra: str) -> tuple[dict, list[dict]]:
    """One step of the tiny lab model (its answers have the <thought>...</thought><answer>...</answer> format)."""
    run = train(
        load_config(REPO / "configs" / "tiny_cpu.yaml", [*LAB, *extra]), tmp_path / name, progress=False
    )
    return read_metrics(run)[-1], read_dump(run, 1)


def reweighted(row: dict, t: int, lam: float, eps_w: float = 0.2) -> float:
    """Â_t by hand from the dumped log-probs: A·((1-λ) + λ·clip(exp(sign(A)·Δ_t), 1-ε_w, 1+ε_w))."""
    a, d = row["adv"], row["teacher_logp"][t] - row["student_logp"][t]
    w = min(max(math.exp(math.copysign(1.0, a) * d if a else 0.0), 1 - eps_w), 1 + eps_w)
    return a * ((1 - lam) + lam * w)


def thought_positions(row: dict, start: int, end: int) -> set[int]:
    inside, out = False, set()
    for t, tok in enumerate(row["token_ids"]):
        if tok in (start, end):
            inside = tok == start
        elif inside:
            out.add(t)
    return out


def test_thought_only_and_negative_only(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "data" / "tiny" / "sft-qwen2vl")
    (start,), (end,) = (tok.encode(x, add_special_tokens=False) for x in ("<thought>", "</thought>"))
    for name, extra in {"thought": ["algo.rlsd_thought_only=true"], "negative": ["algo.rlsd_negative_only=true"],
                        "both": ["algo.rlsd_thought_only=true", "algo.rlsd_negative_only=true"]}.items():  # fmt: skip
        m, rows = lab_run(tmp_path, name, *extra)
        lam = m["rlsd/lam"]
        assert lam == pytest.approx(0.5 * 0.9, abs=1e-12)
        n_in = n_changed = 0
        for row in rows:
            inside = thought_positions(row, start, end) if "thought" in name or name == "both" else None
            for t in range(len(row["token_ids"])):
                named = (inside is None or t in inside) and (name == "thought" or row["adv"] < 0)
                if named:  # the teacher's reweighting, from the dumped log-probs
                    n_in += 1
                    assert row["token_adv"][t] == pytest.approx(reweighted(row, t, lam), abs=1e-5)
                    n_changed += abs(row["token_adv"][t] - row["adv"]) > 1e-6
                else:  # plain GRPO there: Δ_t = 0, Â_t = A
                    assert row["delta"][t] == 0.0, (name, t)
                    assert row["token_adv"][t] == pytest.approx(row["adv"], abs=1e-6)
        assert n_in > 0 and n_changed > 0, (name, n_in, n_changed)  # the switch left something to reweight


def test_online_filtering_with_no_group_passing_pads_and_draws_every_round(
    tiny_model, tiny_records, tmp_path
):
    """A band no group can reach: every round draws B more prompts, the tries run out, and the update trains on
    nothing (every row is padding)."""
    args = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **{
        "trainer.total_steps": 1, "trainer.threads": 1, "trainer.save_every": 1, "algo.online_filtering": "true",
        "algo.filter_low": 5.0, "algo.filter_high": 6.0, "algo.max_refill_tries": 3,
    })  # fmt: skip
    run = train(load_config(None, args), tmp_path / "run", progress=False)
    (m,) = read_metrics(run)
    assert m["filter/rounds"] == 3.0 and m["filter/padded_groups"] == 2.0 and m["filter/kept_frac"] == 0.0
    assert m["filter/extra_rollouts"] == 2 * 2 * 4  # 2 extra rounds x B = 2 prompts x G = 4
    assert m["adv/abs_mean"] == 0.0 and m["loss"] == 0.0  # padding is masked out and has A = 0
    state = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["data_pos"] == 3 * 2  # three rounds of B = 2 prompts drawn from the stream


def test_online_filtering_band_every_group_passes_changes_nothing(tiny_model, tiny_records, tmp_path):
    base = {"trainer.total_steps": 2, "trainer.threads": 1}
    plain = train(load_config(None, tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **base)),
                  tmp_path / "plain", progress=False)  # fmt: skip
    wide = {**base, "algo.online_filtering": "true", "algo.filter_low": -1.0, "algo.filter_high": 2.0}
    filtered = train(load_config(None, tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **wide)),
                     tmp_path / "wide", progress=False)  # fmt: skip
    for a, b in zip(read_metrics(plain), read_metrics(filtered), strict=True):
        assert (
            b["filter/rounds"] == 1.0 and b["filter/kept_frac"] == 1.0 and b["filter/extra_rollouts"] == 0.0
        )
        for k in ("loss", "reward/mean", "adv/abs_mean", "rlsd/token_adv_mean", "actor/grad_norm"):
            assert a[k] == b[k], (k, a[k], b[k])


def test_release_opsd_token_advantage_is_constant(tiny_model, tiny_records, tmp_path):
    args = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **{
        "trainer.total_steps": 1, "trainer.threads": 1, "algo.token_adv": "opsd_release", "algo.opsd_coef": 0.5,
    })  # fmt: skip
    run = train(load_config(None, args), tmp_path / "run", progress=False)
    rows = read_dump(run, 1)
    assert rows and all(x == 0.5 for r in rows for x in r["token_adv"])
    assert any(d != 0.0 for r in rows for d in r["delta"])  # the teacher pass ran: Δ_t is logged


def test_sdpo_shortest_pick_shows_the_feedback(tiny_model, tiny_records, tmp_path, monkeypatch):
    """`algo.sdpo_pick: shortest`: each row's teacher prompt carries the shortest other correct response and the
    shortest other incorrect one, as `pick_demonstrations` / `pick_feedback` choose them."""
    from mmrlsd.algo.sdpo import pick_demonstrations, pick_feedback
    from mmrlsd.data.prompts import PromptBuilder

    seen = []
    real = PromptBuilder.teacher

    def spy(self, s, demonstration=None, feedback=None):
        if demonstration:  # not the start-up checks' placeholder renders
            seen.append((demonstration, feedback))
        return real(self, s, demonstration=demonstration, feedback=feedback)

    monkeypatch.setattr(PromptBuilder, "teacher", spy)
    tpl = "sdpo_release_teacher.jinja"  # a packaged template, by name
    args = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **{
        "trainer.total_steps": 1, "trainer.threads": 1, "algo.token_adv": "opsd", "algo.teacher_info": "sibling",
        "algo.sdpo_pick": "shortest", "data.teacher_template": str(tpl), "trainer.dump_max": 8,
    })  # fmt: skip
    run = train(load_config(None, args), tmp_path / "run", progress=False)
    rows = read_dump(run, 1)
    correct = [r["accuracy"] >= 1.0 for r in rows]
    lengths = [len(r["token_ids"]) for r in rows]
    demos, feedback = pick_demonstrations(correct, 4, lengths), pick_feedback(correct, 4, lengths)
    assert [r["demo"] for r in rows] == demos
    want = [(rows[d]["response"], rows[f]["response"] if f is not None else None)
            for d, f in zip(demos, feedback) if d is not None]  # fmt: skip
    assert seen == want and want, (seen, want)


def test_release_grpo_opsd_with_reinforce_pp(tiny_model, tiny_records, tmp_path):
    """`grpo_opsd_release` + `adv: reinforce_pp`: A is the batch-token-whitened reward, Â_t = A + coef."""
    from mmrlsd.algo.advantage import reinforce_pp_advantages

    args = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **{
        "trainer.total_steps": 1, "trainer.threads": 1, "algo.token_adv": "grpo_opsd_release",
        "algo.adv": "reinforce_pp", "algo.opsd_coef": 0.25, "trainer.dump_max": 8,
    })  # fmt: skip
    run = train(load_config(None, args), tmp_path / "run", progress=False)
    rows = read_dump(run, 1)
    assert len(rows) == 8  # the whole batch: B = 2 prompts x G = 4
    want = reinforce_pp_advantages(torch.tensor([r["reward"] for r in rows]),
                                   torch.tensor([len(r["token_ids"]) for r in rows]))  # fmt: skip
    torch.testing.assert_close(torch.tensor([r["adv"] for r in rows]), want, rtol=0, atol=1e-6)
    for r in rows:
        assert r["token_adv"] == pytest.approx([r["adv"] + 0.25] * len(r["token_ids"]), abs=1e-6)
