"""One real training step with the released recipe's pieces on a tiny model: the `unified` prompts (an image
placed mid-prompt by its `<image>` marker: after the preamble for the student, at the start for the teacher),
the `unified` reward and the paper configs' fast paths. The step must run and produce a real Δ."""

import json

import pytest
from PIL import Image

from mmrlsd.config import load_config
from mmrlsd.log import read_dump, read_metrics
from mmrlsd.train.loop import train


def _records(root):
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (ptype, q, a) in enumerate([("math", "<image>How many red squares?", "2"),
                                       ("multiple choice", "Look at <image> and pick: (A) red (B) blue", "A"),
                                       ("numerical", "<image>Area in cm^2?", "3.5"),
                                       ("free-form", "What is 1+1?", "2")]):  # fmt: skip
        rec = {"id": f"r{i}", "problem": q, "answer": a, "problem_type": ptype}
        if "<image>" in q:
            Image.new("RGB", (56, 56), "red").save(root / "images" / f"r{i}.png")
            rec["images"] = [f"images/r{i}.png"]
        rows.append(json.dumps(rec))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root / "train.jsonl"


@pytest.mark.parametrize("fast", [False, True])
def test_one_step_with_the_release_prompts_and_reward(fast, tiny_model, tmp_path):
    data = _records(tmp_path / "data")
    over = {
        "model.path": str(tiny_model("qwen2_vl")), "data.train_files": f"[{data}]", "data.shuffle": "false",
        "data.student_template": "unified_student.jinja",
        "data.teacher_template": "unified_teacher.jinja", "reward.name": "unified",
        "rollout.n": 2, "rollout.batch_size": 4, "rollout.max_new_tokens": 8, "optim.micro_batch_size": 4,
        "trainer.total_steps": 1, "trainer.save_every": 0, "trainer.dump_max": 8,
        "model.share_vision": str(fast).lower(), "model.logprob_chunk": 64 if fast else 0,
    }  # fmt: skip
    run = train(load_config(None, [f"{k}={v}" for k, v in over.items()]), tmp_path / "run", progress=False)
    (m,) = read_metrics(run)
    assert m["loss"] is not None and abs(m["loss"]) < 1e3
    dump = read_dump(run, 1)
    assert {r["problem"] for r in dump} >= {
        "<image>How many red squares?",
        "Look at <image> and pick: (A) red (B) blue",
    }
    assert any(abs(d) > 1e-6 for r in dump for d in r["delta"])  # the teacher pass ran on its own layout
