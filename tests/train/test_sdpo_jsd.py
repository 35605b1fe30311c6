"""The SDPO and full-vocabulary JSD baselines, run for one real step on the tiny lab model and
checked against an independent recomputation: per-row forwards of the starting weights on prompts rebuilt from
the rollout dump, no padding, no fast path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmrlsd.algo import generalized_jsd, pick_demonstrations
from mmrlsd.config import ConfigError, load_config
from mmrlsd.data.encoding import encode
from mmrlsd.data.images import load_image
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.log import read_dump, read_metrics
from mmrlsd.model.logprobs import logprobs_from_logits, response_logits
from mmrlsd.train.loop import train
from mmrlsd.types import Sample, SeqBatch

REPO = Path(__file__).resolve().parents[2]
LAB_MODEL = REPO / "data/tiny/sft-qwen2vl"
SMALL = {"rollout.batch_size": 4, "trainer.total_steps": 1, "trainer.val_every": 0, "trainer.dump_max": 32, "trainer.dump_every": 1,
         "optim.mini_batches": 1, "optim.micro_batch_size": 8, "trainer.seed": 3}  # fmt: skip


def run_one_step(config: str, tmp_path, **extra):
    overrides = [f"{k}={v}" for k, v in {**SMALL, **extra}.items()]
    cfg = load_config(REPO / config, overrides)
    run = train(cfg, tmp_path / "run", progress=False)
    return cfg, read_metrics(run)[0], read_dump(run, 1)


@pytest.fixture(scope="module")
def lab():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(LAB_MODEL).eval()
    return model, AutoProcessor.from_pretrained(LAB_MODEL)


def row_seq(processor, prompt_text: str, images: list, token_ids: list[int]) -> SeqBatch:
    """One unpadded `[prompt | response]` sequence."""
    enc = encode(processor, [prompt_text], [images])
    resp = torch.tensor([token_ids], dtype=enc["input_ids"].dtype)
    mm = enc.get("mm_token_type_ids")
    return SeqBatch(
        input_ids=torch.cat([enc["input_ids"], resp], 1), attention_mask=torch.ones(1, enc["input_ids"].shape[1] + resp.shape[1], dtype=torch.long),
        mm_token_type_ids=torch.cat([mm, torch.zeros_like(resp)], 1) if mm is not None else None,
        pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
        images_per_seq=[len(images)], prompt_len=enc["input_ids"].shape[1],
    )  # fmt: skip


def builder(cfg, processor) -> PromptBuilder:
    d = cfg.data
    return PromptBuilder(
        processor, REPO / d.student_template, REPO / d.teacher_template, cfg.algo.teacher_info
    )


def sample_of(row, cfg, solutions: dict | None = None) -> Sample:
    imgs = [load_image(p, cfg.model.max_pixels) for p in row["images"]]
    return Sample(id=row["id"], problem=row["problem"], answer=str(row["answer"]), images=row["images"],
                  solution=(solutions or {}).get(row["id"]), pil_images=imgs)  # fmt: skip


def test_sdpo_teacher_conditions_on_a_correct_sibling(lab, tmp_path):
    model, processor = lab
    cfg, metrics, dump = run_one_step("configs/sdpo_tiny_cpu.yaml", tmp_path)
    G = cfg.rollout.n
    assert len(dump) == 32
    correct = [r["accuracy"] >= 1.0 for r in dump]
    assert 0 < sum(correct) < len(dump)  # the lab model half-solves the task: both kinds of rows exist
    assert [r["demo"] for r in dump] == pick_demonstrations(correct, G)
    assert metrics["sdpo/demo_frac"] == pytest.approx(
        sum(d is not None for d in pick_demonstrations(correct, G)) / 32
    )
    no_demo = [r for r in dump if r["demo"] is None]
    assert no_demo, "seed 3 was chosen to give at least one group without a usable demonstration"
    for r in no_demo:  # no privileged information: no Δ, and OPSD's Â_t = Δ_t is zero
        assert all(d == 0.0 for d in r["delta"]) and all(a == 0.0 for a in r["token_adv"])
    prompts = builder(cfg, processor)
    checked = 0
    for r in dump:
        if r["demo"] is None or checked == 4:
            continue
        demo = dump[r["demo"]]
        assert demo["accuracy"] == 1.0 and demo["group"] == r["group"] and demo["sample"] != r["sample"]
        s = sample_of(r, cfg)
        text = prompts.teacher(s, demonstration=demo["response"])
        assert f"reference : {demo['response']}" in text
        with torch.no_grad():  # the teacher at step 1 is the starting weights
            t_logp, _ = logprobs_from_logits(
                response_logits(model, seq := row_seq(processor, text, s.pil_images, r["token_ids"])), seq
            )
            s_logp, _ = logprobs_from_logits(
                response_logits(
                    model, seq := row_seq(processor, prompts.student(s), s.pil_images, r["token_ids"])
                ),
                seq,
            )
        torch.testing.assert_close(torch.tensor(r["teacher_logp"]), t_logp[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(r["delta"]), (t_logp - s_logp)[0], atol=2e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(r["token_adv"]), (t_logp - s_logp)[0], atol=2e-4, rtol=0)
        checked += 1
    assert checked == 4
    assert any(min(r["delta"]) < -1.0 for r in dump if r["demo"] is not None and r["accuracy"] == 0.0)


@pytest.mark.parametrize("token_adv", ["opsd", "grpo_opsd"])
def test_jsd_distillation_is_the_generalized_jsd_of_the_batch(token_adv, lab, tmp_path):
    model, processor = lab
    off = {"model.packing": "false", "model.share_prefix": "false", "model.share_vision": "false"}
    cfg, metrics, dump = run_one_step("configs/opsd_tiny_cpu.yaml", tmp_path, **off, **{
        "algo.distill": "jsd", "algo.token_adv": token_adv, "algo.opsd_coef": 0.3, "algo.jsd_beta": 0.5})  # fmt: skip
    coef = 0.3 if token_adv == "grpo_opsd" else 1.0
    for r in dump:  # the distillation is a loss term; Â_t is A (grpo_opsd) or 0 (opsd)
        want = r["adv"] if token_adv == "grpo_opsd" else 0.0
        assert all(a == pytest.approx(want, abs=1e-6) for a in r["token_adv"])
    prompts = builder(cfg, processor)
    solutions = {}  # OPSD's teacher sees the reference solution, which the dump does not carry
    for line in (REPO / "data/tiny/lab/train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        solutions[rec["id"]] = rec["solution"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in dump:  # all B*G rows, one optimizer step: the student is the starting weights too
            s = sample_of(r, cfg, solutions)
            assert s.solution and s.solution in prompts.teacher(s)
            st = row_seq(processor, prompts.student(s), s.pil_images, r["token_ids"])
            te = row_seq(processor, prompts.teacher(s), s.pil_images, r["token_ids"])
            L = len(r["token_ids"])
            total += float(
                generalized_jsd(
                    response_logits(model, st), response_logits(model, te), torch.ones(1, L), 0.5, 1.0
                )
            )
            tokens += L
    assert metrics["actor/distill_loss"] == pytest.approx(coef * total / tokens, rel=1e-4)
    assert metrics["actor/distill_loss"] > 1e-3  # the teacher (shown the solution) disagrees somewhere


def test_sdpo_and_jsd_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'algo.distill' jsd needs 'algo.token_adv' opsd or grpo_opsd"):
        load_config(REPO / "configs/tiny_cpu.yaml", ["algo.distill=jsd"])
    with pytest.raises(
        ConfigError, match="set model.packing, model.share_vision, model.share_prefix to false"
    ):
        load_config(REPO / "configs/opsd_tiny_cpu.yaml", ["algo.distill=jsd"])
    with pytest.raises(ConfigError, match="'rollout.n' must be >= 2 for sibling demonstrations"):
        load_config(REPO / "configs/sdpo_tiny_cpu.yaml", ["rollout.n=1"])
    with pytest.raises(ConfigError, match=r"'algo.jsd_beta' must be in \[0, 1\]"):
        load_config(REPO / "configs/opsd_tiny_cpu.yaml", ["algo.jsd_beta=1.5"])
    with pytest.raises(ConfigError, match="'algo.teacher_info' is 'peer'"):
        load_config(REPO / "configs/opsd_tiny_cpu.yaml", ["algo.teacher_info=peer"])


def test_sibling_teacher_prompt_needs_a_demonstration(lab):
    _, processor = lab
    p = PromptBuilder(processor, REPO / "mmrlsd/prompts/student.jinja", REPO / "mmrlsd/prompts/sdpo_teacher.jinja",
                      "sibling")  # fmt: skip
    s = Sample(id="q7", problem="what is 2 + 2 ?", answer="4")
    with pytest.raises(ValueError, match="sample 'q7': teacher_info 'sibling' needs a demonstration"):
        p.teacher(s)
    text = p.teacher(s, demonstration="<thought>2 + 2 = 4</thought><answer>4</answer>")
    assert "Correct solution:\n<thought>2 + 2 = 4</thought><answer>4</answer>\nCorrectly solve" in text
