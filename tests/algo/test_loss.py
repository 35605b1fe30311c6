"""PPO clipped loss: each branch by hand, dual clip, global token mean under micro-batching."""

import math

import torch

from mmrlsd.algo import ppo_clip_loss


def _one(logp, old, adv, c=3.0):
    lp = torch.tensor([[logp]], requires_grad=True)
    loss, st = ppo_clip_loss(lp, torch.tensor([[old]]), torch.tensor([[adv]]), torch.ones(1, 1),
                             clip_low=0.2, clip_high=0.28, clip_c=c, num_tokens=1.0)  # fmt: skip
    loss.backward()
    return float(loss.detach()), float(lp.grad), st


def test_unclipped_region():
    # ρ = e^0.1 = 1.10517 in [0.8, 1.28]; A = 2 -> L = -ρA = -2.21034; dL/dlogp = -ρA
    loss, grad, st = _one(0.1, 0.0, 2.0)
    assert math.isclose(loss, -2 * math.exp(0.1), abs_tol=1e-6) and math.isclose(grad, -2 * math.exp(0.1), abs_tol=1e-6)
    assert float(st["clip_frac"]) == 0


def test_clip_high_positive_advantage():
    # ρ = e^0.5 = 1.6487 > 1.28, A = 1: min(1.6487, 1.28) = 1.28 -> L = -1.28, no gradient (clipped branch)
    loss, grad, st = _one(0.5, 0.0, 1.0)
    assert math.isclose(loss, -1.28, abs_tol=1e-6) and grad == 0.0 and float(st["clip_frac"]) == 1


def test_clip_low_negative_advantage():
    # ρ = e^-0.5 = 0.6065 < 0.8, A = -1: min(-0.6065, -0.8) = -0.8 -> L = 0.8, no gradient
    loss, grad, st = _one(-0.5, 0.0, -1.0)
    assert math.isclose(loss, 0.8, abs_tol=1e-6) and grad == 0.0 and float(st["clip_frac"]) == 1


def test_dual_clip_caps_negative_advantage_loss():
    # ρ = e^2 = 7.389, A = -1: standard L = -min(-7.389, -1.28) = 7.389 > c·|A| = 3 -> L = 3, no gradient
    loss, grad, st = _one(2.0, 0.0, -1.0, c=3.0)
    assert math.isclose(loss, 3.0, abs_tol=1e-6) and grad == 0.0 and float(st["dual_clip_frac"]) == 1
    # without dual clip: L = ρ|A| = 7.389, gradient ρ|A|
    loss, grad, _ = _one(2.0, 0.0, -1.0, c=0.0)
    assert math.isclose(loss, math.exp(2), abs_tol=1e-5) and math.isclose(grad, math.exp(2), abs_tol=1e-5)
    # dual clip never touches positive advantages: ρ = e^2, A = +1 -> -min(7.389, 1.28) = -1.28
    loss, _, _ = _one(2.0, 0.0, 1.0, c=3.0)
    assert math.isclose(loss, -1.28, abs_tol=1e-6)


def test_global_token_mean_is_invariant_to_micro_batching():
    g = torch.Generator().manual_seed(0)
    N, T = 8, 11
    logp = (torch.randn(N, T, generator=g) * 0.3 - 2).requires_grad_()
    old = logp.detach() + torch.randn(N, T, generator=g) * 0.2
    adv = torch.randn(N, T, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3).float()
    total = float(mask.sum())
    whole, _ = ppo_clip_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, num_tokens=total)
    whole.backward()
    g_whole = logp.grad.clone()
    logp.grad = None
    parts = 0.0
    for s in (slice(0, 3), slice(3, 4), slice(4, 8)):  # uneven micro-batches
        part, _ = ppo_clip_loss(logp[s], old[s], adv[s], mask[s], 0.2, 0.28, 3.0, num_tokens=total)
        part.backward()
        parts += float(part)
    assert abs(parts - float(whole)) < 1e-6
    torch.testing.assert_close(logp.grad, g_whole, rtol=0, atol=1e-7)
    # and it is the token mean: with ρ = 1 everywhere, L = -Σ mask·A / Σ mask
    l1, _ = ppo_clip_loss(old.clone(), old, adv, mask, 0.2, 0.28, 3.0, num_tokens=total)
    assert abs(float(l1) + float((adv * mask).sum() / total)) < 1e-6
