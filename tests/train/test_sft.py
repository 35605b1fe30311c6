"""`mmrlsd sft`: the lr schedule, the batch layout (loss only on the solution and <|im_end|>, the RL student
prompt), teacher-prompt mixing, gradient accumulation, the strict config, and a from-scratch smoke run whose
loss drops."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mmrlsd.config import ConfigError
from mmrlsd.data.encoding import encode
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.experiments.lab.data import lab_records
from mmrlsd.recipes.sft import (
    load_sft_config,
    lr_at,
    prompt_texts,
    sft,
    sft_loss,
    solution_batch,
)
from mmrlsd.types import Sample

STUDENT = str(Path(__file__).resolve().parents[2] / "mmrlsd/prompts/tiny_student.jinja")
TEACHER = str(Path(__file__).resolve().parents[2] / "mmrlsd/prompts/tiny_teacher.jinja")


def test_lr_schedule_warmup_then_cosine():
    # warmup=2: steps 0, 1 -> 1/2, 2/2 of lr; then cosine over total - warmup = 4 steps, min_ratio 0.2:
    # step 2: progress 0 -> 1.0; step 4: progress 1/2 -> 0.2 + 0.8*0.5*(1+cos(pi/2)) = 0.6
    # step 5: progress 3/4 -> 0.2 + 0.8*0.5*(1+cos(3pi/4)) = 0.2 + 0.4*(1-0.70711) = 0.317157
    got = [lr_at(s, 2.0, warmup=2, total=6, min_ratio=0.2) for s in range(6)]
    want = [1.0, 2.0, 2.0, 2.0 * (0.2 + 0.4 * (1 + 0.70711)), 1.2, 2.0 * 0.317157]
    assert got == pytest.approx(want, abs=1e-4)
    assert lr_at(9, 1.0, warmup=0, total=10, min_ratio=1.0) == 1.0  # min_ratio 1: constant


@pytest.fixture(scope="module")
def lab_model(tmp_path_factory):
    """A tiny random Qwen2-VL whose tokenizer knows the lab's words, and 48 lab records as Samples."""
    from mmrlsd.data.synth import TAGS, corpus
    from mmrlsd.model.load import load_model
    from mmrlsd.model.tiny import TinySize, make_tiny

    recs = lab_records(48, seed=3, split="train")
    texts = corpus() + [t for r in recs for t in (r["problem"], r["solution"])]
    path = make_tiny("qwen2_vl", tmp_path_factory.mktemp("sft_tiny"), seed=0, size=TinySize(hidden=64, layers=2),
                     extra_corpus=texts, vocab_size=384, added_tokens=list(TAGS))  # fmt: skip
    policy, processor = load_model(str(path))
    samples = [Sample(id=r["id"], problem=r["problem"], answer=r["answer"], images=r["images"],
                      problem_type=r["problem_type"], solution=r["solution"], pil_images=r["pil_images"])
               for r in recs]  # fmt: skip
    return policy, processor, samples


def test_solution_batch_masks_exactly_the_solution_and_eos(lab_model):
    policy, processor, samples = lab_model
    tok = processor.tokenizer
    prompts = PromptBuilder(processor, STUDENT, TEACHER, "answer")
    batch = samples[:4]
    seq = solution_batch(processor, batch, [prompts.student(s) for s in batch])
    mask = seq.attention_mask[:, seq.prompt_len :]  # (4, T)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for i, s in enumerate(batch):
        ids = seq.input_ids[i, seq.prompt_len :][mask[i].bool()].tolist()
        assert ids[-1] == eos and ids.count(eos) == 1
        assert tok.decode(ids[:-1]) == s.solution  # the response is the solution, token for token
        # the prompt is the RL student prompt, encoded as a rollout encodes it (left-padded)
        p_ids = seq.input_ids[i, : seq.prompt_len][seq.attention_mask[i, : seq.prompt_len].bool()].tolist()
        assert p_ids == encode(processor, [prompts.student(s)], [s.pil_images])["input_ids"][0].tolist()
    assert seq.image_grid_thw.tolist()[0] == [1, 4, 4]  # 56x56 px, not resized: 16 patches -> 4 merged tokens


def test_prompt_texts_mixes_teacher_prompts(lab_model):
    _, processor, samples = lab_model
    b = {i: PromptBuilder(processor, STUDENT, TEACHER, i) for i in ("answer", "solution")}
    s = samples[2]
    assert prompt_texts(b, [s], 0.0, ["answer"], random.Random(0)) == [b["answer"].student(s)]
    assert prompt_texts(b, [s], 1.0, ["answer"], random.Random(0)) == [b["answer"].teacher(s)]
    assert prompt_texts(b, [s], 1.0, ["solution"], random.Random(0)) == [b["solution"].teacher(s)]
    assert f"reference : {s.solution}" in b["solution"].teacher(s)
    mixed = prompt_texts(b, samples, 0.5, ["answer", "solution"], random.Random(1))
    n_teacher = sum("reference :" in t for t in mixed)
    assert 0 < n_teacher < len(samples)  # 48 draws at p=0.5: all-or-nothing has probability 2^-47


def test_micro_batches_accumulate_to_the_full_batch_gradient(lab_model):
    policy, processor, samples = lab_model
    prompts = PromptBuilder(processor, STUDENT, TEACHER, "answer")
    batch = samples[:6]  # solutions of different lengths: the token mean must be over the whole batch
    seq = solution_batch(processor, batch, [prompts.student(s) for s in batch])
    grads, losses = [], []
    for mb in (6, 4, 1):
        policy.zero_grad(set_to_none=True)
        loss, tokens = sft_loss(policy, seq, mb)
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert tokens == float(seq.attention_mask[:, seq.prompt_len :].sum())
    for loss, g in zip(losses[1:], grads[1:]):
        assert loss == pytest.approx(losses[0], rel=0, abs=1e-5)
        torch.testing.assert_close(g, grads[0], rtol=0, atol=1e-6)
    policy.zero_grad(set_to_none=True)


def test_config_is_strict(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train_files: [x.jsonl]\nsft:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'sft.batch_size'"):
        load_sft_config(p)
    p.write_text("data:\n  train_files: [x.jsonl]\n")
    with pytest.raises(ConfigError, match="teacher_frac"):
        load_sft_config(p, ["sft.teacher_frac=1.5"])
    with pytest.raises(ConfigError, match="teacher_infos"):
        load_sft_config(p, ["sft.teacher_infos=[hint]"])
    assert load_sft_config("configs/tiny_sft.yaml").init.arch == "qwen2_vl"


def test_sft_from_scratch_loss_drops(tmp_path):
    from mmrlsd.experiments.lab.data import write_lab_data
    from mmrlsd.model.load import load_model

    write_lab_data(tmp_path / "data", n_train=64, n_val=8, seed=5)
    cfg = load_sft_config("configs/tiny_sft.yaml", [
        f"data.train_files=[{tmp_path / 'data' / 'train.jsonl'}]", f"data.val_files=[{tmp_path / 'data' / 'val.jsonl'}]",
        "init.hidden=64", "init.layers=2", "init.intermediate=128", "init.vision_hidden=32", "sft.batch_size=8",
        "trainer.total_steps=40", "trainer.val_every=40", "trainer.save_every=20", "optim.lr=3e-3",
        "optim.warmup_steps=5", "trainer.threads=1", "sft.teacher_frac=0.25",
    ])  # fmt: skip
    out = sft(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # a random init starts near log(vocab) ~ 6 nats per token; the chat tags and template are learnt first
    assert last < 0.5 * first, (first, last)
    assert rows[0]["step"] == 0 and "val/accuracy" in rows[0] and "val/accuracy" in rows[-1]
    assert (tmp_path / "run" / "checkpoint-20" / "config.json").is_file()
    policy, processor = load_model(str(out))  # the final model loads as an RL starting point
    assert processor.tokenizer.convert_tokens_to_ids("<thought>") != processor.tokenizer.unk_token_id
