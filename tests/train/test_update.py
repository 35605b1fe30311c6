"""The PPO update gives the same step whether the batch is taken whole or in micro-batches."""

import copy

import torch
from PIL import Image

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.model.load import load_model
from mmrlsd.model.logprobs import build_sequences, token_logprobs
from mmrlsd.train.update import ppo_update
from mmrlsd.types import Rollouts


def test_micro_batching_gives_the_same_update(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    texts = [chat_text(proc, f"question {i}", 1 if i % 3 else 0) for i in range(6)]
    imgs = [[Image.new("RGB", (56, 56), (40 * i, 0, 0))] if i % 3 else [] for i in range(6)]
    enc = encode(proc, texts, imgs)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 300, (6, 7), generator=g)  # ordinary tokens (ids < 14 are special)
    mask = torch.ones(6, 7)
    mask[2, 4:] = 0
    seq = build_sequences(enc, Rollouts(ids, mask.long(), [""] * 6, 3))
    old, _ = token_logprobs(model, seq, 6)
    old = old + 0.05 * torch.randn(old.shape, generator=g)  # ratios != 1 so both clip branches can occur
    token_adv = torch.randn(6, 7, generator=g) * mask
    results = []
    for mb in (6, 4, 1):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)  # the step equals minus the gradient
        stats = ppo_update(m, opt, seq, old, token_adv, mask, mini_batches=1, micro_batch_size=mb,
                           clip_low=0.2, clip_high=0.28, clip_c=3.0, grad_clip=0.0)  # fmt: skip
        results.append((stats, {k: v.detach().clone() for k, v in m.state_dict().items()}))
    (s0, w0) = results[0]
    for s, w in results[1:]:
        assert abs(s["loss"] - s0["loss"]) < 1e-6
        assert abs(s["actor/grad_norm"] - s0["actor/grad_norm"]) < 1e-5
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(w0[k], v) for k, v in model.state_dict().items())  # the step did move weights
