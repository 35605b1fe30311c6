"""Memory-lean log-probs: chunked lm_head + logsumexp equal the full-logit ones (values, entropy, gradients) within
1e-5 in fp32, and keep nothing of shape [tokens, vocab] for the backward."""

import math

import pytest
import torch

from mmrlsd.model.logprobs import build_sequences, lean_logprobs, token_logprobs
from mmrlsd.model.packing import FastOptions


def test_lean_logprobs_by_hand():
    # h = [1, 0], W rows (vocab 3) = [1, 0], [0, 1], [0, 0]: logits = [1, 0, 0]
    # logZ = log(e + 2) = 1.551445; log p(y=0) = 1 - 1.551445 = -0.551445, log p(y=1) = -1.551445
    # entropy = logZ - Σ p·logit = 1.551445 - e/(e+2)·1 = 1.551445 - 0.576117 = 0.975328
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    logz = math.log(math.e + 2)
    for chunk in (0, 1):
        logp, ent = lean_logprobs(h, W, y, chunk=chunk, with_entropy=True)
        torch.testing.assert_close(logp, torch.tensor([1 - logz, -logz]), rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, torch.full((2,), logz - math.e / (math.e + 2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_equals_full_values_and_gradients(chunk):
    torch.manual_seed(0)
    R, H, V = 53, 16, 311  # 53 tokens: chunk 7 leaves a remainder of 4
    h = torch.randn(R, H, dtype=torch.float32) * 2
    W = torch.randn(V, H, dtype=torch.float32) * 0.5
    y = torch.randint(0, V, (R,))
    g = torch.randn(R) / R  # an upstream gradient like a token-mean loss's: -Â_t·ρ_t / num_tokens
    out = {}
    for name, c in (("full", 0), ("chunked", chunk)):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        logp, ent = lean_logprobs(hh, WW, y, chunk=c, with_entropy=True)
        (logp * g).sum().backward()
        out[name] = (logp.detach(), ent, hh.grad, WW.grad)
    for a, b, what in zip(out["full"], out["chunked"], ("logp", "entropy", "grad h", "grad W")):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=what)


def test_chunked_backward_keeps_no_vocab_sized_tensor():
    """What autograd saves for the backward is h, W, y and logZ: nothing with R·V elements."""
    R, H, V = 40, 8, 500
    h = torch.randn(R, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, _ = lean_logprobs(h, W, torch.randint(0, V, (R,)), chunk=8)
    assert saved and max(saved) < R * V  # the largest is W itself (V·H = 4000 < R·V = 20000)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lean_logprobs(h, W, torch.randint(0, V, (R,)), chunk=0)  # the reference keeps the (R, V) logits
    assert max(saved) >= R * V


def test_chunked_gradients_in_bf16_follow_the_reference():
    """bf16 (the GPU dtype): logits are computed in bf16 and upcast, as the full path does."""
    torch.manual_seed(1)
    h = torch.randn(10, 8).bfloat16()
    W = torch.randn(50, 8).bfloat16()
    y = torch.randint(0, 50, (10,))
    a, _ = lean_logprobs(h, W, y, chunk=0)
    b, _ = lean_logprobs(h, W, y, chunk=3)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_model_logprobs_lean_equal_full(arch, tiny_model):
    from PIL import Image

    from mmrlsd.data.encoding import chat_text, encode
    from mmrlsd.model.load import load_model
    from mmrlsd.rollout.generate import generate

    model, proc = load_model(str(tiny_model(arch)))
    texts = [chat_text(proc, "how many red shapes?", 1)] * 2 + [chat_text(proc, "2 + 2 = ?", 0)] * 2
    imgs = [[Image.new("RGB", (56, 56), "red")]] * 2 + [[], []]
    enc = encode(proc, texts, imgs)
    r = generate(model, proc, enc, group_size=2, max_new_tokens=9, seed=1)
    seq = build_sequences(enc, r)
    m = r.response_mask.bool()
    full, ent_full = token_logprobs(
        model, seq, 4, with_entropy=True, fast=FastOptions(packing=True, group_size=2)
    )
    lean, ent_lean = token_logprobs(model, seq, 4, with_entropy=True,
                                    fast=FastOptions(packing=True, logprob_chunk=5, group_size=2))  # fmt: skip
    torch.testing.assert_close(lean[m], full[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_lean[m], ent_full[m], rtol=0, atol=1e-5)
    ref, ent_ref = token_logprobs(model, seq, 4, with_entropy=True)  # the plain HF forward
    torch.testing.assert_close(lean[m], ref[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_lean[m], ent_ref[m], rtol=0, atol=1e-5)
