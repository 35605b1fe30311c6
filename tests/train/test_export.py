"""`mmrlsd export` writes a plain Hugging Face checkpoint whose log-probs equal the training model's."""

import sys
from pathlib import Path

import torch

from mmrlsd.cli import main
from mmrlsd.config import load_config
from mmrlsd.data.encoding import encode
from mmrlsd.data.images import load_image
from mmrlsd.data.prompts import PromptBuilder
from mmrlsd.log import read_dump
from mmrlsd.model.load import load_model
from mmrlsd.model.logprobs import build_sequences, token_logprobs
from mmrlsd.train.loop import train
from mmrlsd.types import Rollouts, Sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_smoke import tiny_overrides  # noqa: E402


def test_export_round_trip(tiny_model, tiny_records, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_model("qwen2_5_vl"), tiny_records, **{"trainer.save_every": 1}))
    run = train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "exported"
    assert main(["export", str(run / "checkpoint-1"), "--out", str(out)]) == 0
    model, proc = load_model(str(out))  # plain transformers Auto classes
    # checkpoint-1 holds the weights that sampled and scored step 2: its dumped student log-probs are the
    # training model's numbers
    rows = [r for r in read_dump(run, 2) if len(r["token_ids"]) > 0]
    prompts = PromptBuilder(proc, cfg.data.student_template, cfg.data.teacher_template, "answer")
    for row in rows[:4]:
        s = Sample(id=row["id"], problem=row["problem"], answer=row["answer"], images=row["images"])
        images = [load_image(p) for p in s.images]
        enc = encode(proc, [prompts.student(s)], [images])
        ids = torch.tensor([row["token_ids"]])
        seq = build_sequences(enc, Rollouts(ids, torch.ones_like(ids), [row["response"]], 1))
        logp, _ = token_logprobs(model, seq, micro_batch_size=1)
        torch.testing.assert_close(logp[0], torch.tensor(row["student_logp"]), rtol=0, atol=1e-5)
    assert main(["export", str(run / "nope"), "--out", str(tmp_path / "x")]) == 2
