"""The PPO update gives the same step whether the batch is taken whole or in micro-batches."""

import copy

import pytest
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
        stats = ppo_update(m, opt, seq, mask, old_logp=old, token_adv=token_adv, mini_batches=1, micro_batch_size=mb,
                           clip_low=0.2, clip_high=0.28, clip_c=3.0, grad_clip=0.0).stats  # fmt: skip
        results.append((stats, {k: v.detach().clone() for k, v in m.state_dict().items()}))
    (s0, w0) = results[0]
    for s, w in results[1:]:
        assert abs(s["loss"] - s0["loss"]) < 1e-6
        assert abs(s["actor/grad_norm"] - s0["actor/grad_norm"]) < 1e-5
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(w0[k], v) for k, v in model.state_dict().items())  # the step did move weights


def _batch(tiny_model, arch="qwen2_5_vl"):
    """9 rows, 3 prompts x G = 3 (rows of a prompt share its image), random responses, a ragged mask."""
    from mmrlsd.data.encoding import repeat_encoding

    model, proc = load_model(str(tiny_model(arch)))
    texts = [chat_text(proc, f"question {i}", 1) for i in range(3)]
    imgs = [[Image.new("RGB", (56, 56), (60 * i, 20, 0))] for i in range(3)]
    enc = repeat_encoding(encode(proc, texts, imgs), 3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 300, (9, 6), generator=g)
    mask = torch.ones(9, 6)
    mask[1, 3:], mask[5, 1:], mask[7, 5:] = 0, 0, 0
    seq = build_sequences(enc, Rollouts(ids, mask.long(), [""] * 9, 3))
    old, _ = token_logprobs(model, seq, 9)
    old = old + 0.05 * torch.randn(old.shape, generator=g)
    return model, seq, mask, old, torch.randn(9, 6, generator=g) * mask, g


def _after(model, seq, mask, **kw):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    settings = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, grad_clip=0.0) | kw
    u = ppo_update(m, opt, seq, mask, **settings)
    return u, {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    (ua, wa), (ub, wb) = a, b
    assert abs(ua.stats["loss"] - ub.stats["loss"]) < 1e-6
    assert abs(ua.stats["actor/pg_clip_frac"] - ub.stats["actor/pg_clip_frac"]) < 1e-6
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def test_the_split_into_micro_batches_leaves_every_mini_batch_step_unchanged(tiny_model):
    """Two optimizer steps per batch: however the rows are cut into micro-batches (rows on the plain forward, a
    token budget on the fast one), the same two steps are taken."""
    from mmrlsd.model.packing import FastOptions

    model, seq, mask, old, token_adv, _ = _batch(tiny_model)
    kw = dict(old_logp=old, token_adv=token_adv, mini_batches=2)
    ref = _after(model, seq, mask, micro_batch_size=9, **kw)
    for mb in (1, 2, 4):
        _same(ref, _after(model, seq, mask, micro_batch_size=mb, **kw))
    for budget in (40, 120, 10_000):  # the fast forward: packed micro-batches of at most `budget` tokens
        fast = FastOptions(
            packing=True, share_prefix=True, share_vision=True, token_budget=budget, group_size=3
        )
        _same(ref, _after(model, seq, mask, micro_batch_size=9, fast=fast, **kw))
    assert any(not torch.equal(ref[1][k], v) for k, v in model.state_dict().items())


def test_the_fused_update_is_split_invariant_and_reports_what_it_formed(tiny_model):
    """The fused behaviour pass (one step, Δ_t and Â_t formed per micro-batch from the update's own forward): the
    same step for every token budget, and the Δ_t, Â_t it reports are those of its starting weights."""
    from mmrlsd.algo.methods import TokenRule, privileged_gain, token_advantages
    from mmrlsd.model.packing import FastOptions
    from mmrlsd.train.update import Credit

    model, seq, mask, _, _, g = _batch(tiny_model)
    start, _ = token_logprobs(model, seq, 9)
    credit = Credit(torch.randn(9, generator=g), start + 0.3 * torch.randn(start.shape, generator=g), mask,
                    TokenRule("rlsd", lam=0.5, eps_w=0.2))  # fmt: skip
    runs = []
    for budget in (30, 80, 10_000):
        fast = FastOptions(
            packing=True, share_prefix=True, share_vision=True, token_budget=budget, group_size=3
        )
        runs.append(_after(model, seq, mask, credit=credit, mini_batches=1, micro_batch_size=9, fast=fast))
    for other in runs[1:]:
        _same(runs[0], other)
    u = runs[0][0]
    on = mask.bool()
    torch.testing.assert_close(u.student_logp[on], start[on], rtol=0, atol=1e-5)
    want_delta = privileged_gain(credit.teacher_logp, u.student_logp, mask)
    torch.testing.assert_close(u.delta, want_delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(u.token_adv, token_advantages(credit.rule, credit.adv, want_delta, mask),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert u.stats["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_gradient_checkpointing_recomputes_with_the_packed_kernel(tiny_model, share_prefix):
    """With gradient checkpointing the backward re-runs each layer's forward: it must use the packed kernel the
    forward used (on an H200 the recompute fell back to sdpa: a BlockMask it cannot take, or a different number
    of saved tensors). Checkpointed and plain packed updates take the same step, and the model's own kernel is
    back in place afterwards."""
    from mmrlsd.model.packing import FastOptions

    model, seq, mask, old, token_adv, _ = _batch(tiny_model)
    fast = FastOptions(packing=True, share_prefix=share_prefix, share_vision=True, token_budget=80, group_size=3,
                       attention="varlen_sdpa")  # fmt: skip
    kw = dict(old_logp=old, token_adv=token_adv, mini_batches=2, micro_batch_size=9, fast=fast)
    ref = _after(model, seq, mask, **kw)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    (u, w) = _after(ckpt, seq, mask, **kw)
    _same(ref, (u, w))
    assert (
        ckpt.model.language_model.config._attn_implementation == model.config._attn_implementation == "sdpa"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["flex_attention", "varlen_sdpa"])
def test_gradient_checkpointing_with_packed_kernels_on_gpu(tiny_model, kernel):
    """The H200 failure itself: flex attention (a `BlockMask`) and varlen_sdpa under gradient checkpointing on CUDA,
    against the same packed update without checkpointing."""
    from mmrlsd.model.packing import FastOptions

    model, seq, mask, old, token_adv, _ = _batch(tiny_model)
    model = model.cuda()
    fast = FastOptions(packing=True, share_prefix=True, share_vision=True, token_budget=80, group_size=3,
                       attention=kernel)  # fmt: skip
    kw = dict(old_logp=old, token_adv=token_adv, mini_batches=2, micro_batch_size=9, fast=fast)
    ref = _after(model, seq, mask, **kw)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    _same(ref, _after(ckpt, seq, mask, **kw))
