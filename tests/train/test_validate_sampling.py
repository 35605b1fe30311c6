"""mmrlsd/train/validate.py hands the validation sampling settings (rollout.val_*) to the sampler: the greedy pass
gets none of them, the sampled pass all of them."""

import torch

from mmrlsd.config import load_config
from mmrlsd.train import validate as V
from mmrlsd.types import Rollouts, Sample


def test_validation_uses_the_val_sampling_settings(monkeypatch):
    cfg = load_config("configs/release/rlsd_qwen3vl_8b.yaml", ["rollout.max_new_tokens=4"])
    calls = []

    def fake_generate(policy, processor, enc, *, group_size, **kw):
        calls.append({k: kw[k] for k in ("temperature", "top_p", "top_k", "presence_penalty")})
        n = len(enc)
        return Rollouts(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                        ["<answer>1</answer>"] * n, group_size)  # fmt: skip

    monkeypatch.setattr(V, "generate", fake_generate)
    monkeypatch.setattr(V, "encode", lambda processor, texts, images: texts)

    class Prompts:
        student = staticmethod(lambda s: s.problem)

    class Policy:
        eval = staticmethod(lambda: None)

    samples = [Sample(id=str(i), problem="q", answer="1", problem_type="numerical") for i in range(3)]
    out = V.validate(Policy, None, Prompts, samples, cfg, seed=0)
    assert out["val/accuracy"] == 1.0 and out["val/sample_accuracy"] == 1.0
    assert calls[0] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.0}  # greedy
    # the released script's validation: T 0.7, top-p 0.8, top-k 20, presence penalty 1.5
    assert calls[-1] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}
