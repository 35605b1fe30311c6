"""RLSD token advantages against hand-computed values and a slow per-token oracle."""

import math

import pytest
import torch

from mmrlsd.algo import TokenRule, get_method, lam_at, rlsd_token_advantages, token_advantages
from mmrlsd.algo.advantage import groups_in_band
from mmrlsd.algo.rlsd import evidence_weights, grpo_opsd_token_advantages, reweight_tokens, thought_span_mask


def oracle(adv, delta, mask, lam, eps_w):
    """Per-token loop, straight from the formula in `mmrlsd.algo.rlsd`."""
    out = torch.zeros_like(delta)
    for i in range(delta.shape[0]):
        a = float(adv[i])
        s = (a > 0) - (a < 0)
        for t in range(delta.shape[1]):
            if mask[i, t]:
                w = math.exp(s * float(delta[i, t]))
                w = min(max(w, 1 - eps_w), 1 + eps_w)
                out[i, t] = a * ((1 - lam) + lam * w)
    return out


def test_hand_computed_example():
    # eps_w=0.2, lam=0.5, Δ=log 2 on one token
    # A=+1: w = exp(+log 2) = 2.0 -> clip to 1.2 -> Â = 1·(0.5 + 0.5·1.2) = 1.1
    # A=-1: w = exp(-log 2) = 0.5 -> clip to 0.8 -> Â = -1·(0.5 + 0.5·0.8) = -0.9
    adv = torch.tensor([1.0, -1.0])
    delta = torch.full((2, 1), math.log(2))
    out = rlsd_token_advantages(adv, delta, torch.ones(2, 1), lam=0.5, eps_w=0.2)
    torch.testing.assert_close(out, torch.tensor([[1.1], [-0.9]]), rtol=0, atol=1e-6)


def test_inside_the_clip_range():
    # A=2, Δ=0.1: w = e^0.1 = 1.10517 (inside [0.8, 1.2]); lam=0.5 -> Â = 2·(0.5 + 0.5·1.10517) = 2.10517
    # A=-2, Δ=0.1: w = e^-0.1 = 0.904837 -> Â = -2·(0.5 + 0.5·0.904837) = -1.904837
    out = rlsd_token_advantages(
        torch.tensor([2.0, -2.0]), torch.full((2, 1), 0.1), torch.ones(2, 1), 0.5, 0.2
    )
    torch.testing.assert_close(out, torch.tensor([[2.105171], [-1.904837]]), rtol=0, atol=1e-5)


def test_teacher_disagreement_gives_blame_on_negative():
    # A=-1, Δ=-log 2 (teacher finds the token half as likely): w = exp(+log 2) = 2 -> 1.2; Â = -(0.5+0.6) = -1.1
    out = rlsd_token_advantages(
        torch.tensor([-1.0]), torch.full((1, 1), -math.log(2)), torch.ones(1, 1), 0.5, 0.2
    )
    torch.testing.assert_close(out, torch.tensor([[-1.1]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lam,eps_w", [(0.0, 0.2), (0.5, 0.0), (0.0, 0.0)])
def test_degenerates_to_grpo(lam, eps_w):
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, generator=g)
    delta = torch.randn(6, 9, generator=g) * 3
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()
    out = rlsd_token_advantages(adv, delta, mask, lam=lam, eps_w=eps_w)
    assert torch.equal(out, adv[:, None] * mask)  # exactly, not approximately


def test_matches_slow_oracle_and_properties():
    g = torch.Generator().manual_seed(1)
    adv = torch.cat([torch.randn(7, generator=g), torch.zeros(1)])
    delta = torch.randn(8, 13, generator=g) * 2
    mask = (torch.rand(8, 13, generator=g) > 0.25).float()
    out = rlsd_token_advantages(adv, delta, mask, lam=0.37, eps_w=0.2)
    torch.testing.assert_close(out, oracle(adv, delta, mask, 0.37, 0.2), rtol=0, atol=1e-6)
    on = mask.bool()
    assert torch.equal(torch.sign(out)[on], torch.sign(adv)[:, None].expand_as(out)[on])  # sign(Â) = sign(A)
    assert torch.all(out[~on] == 0)  # masked tokens are 0
    assert torch.all(out[-1] == 0)  # A = 0 -> Â = 0
    # magnitude bounded by the clip: |Â| / |A| in [(1-λ)+λ(1-ε), (1-λ)+λ(1+ε)] = [0.926, 1.074]
    ratio = (out[:7] / adv[:7, None])[on[:7]]
    assert ratio.min() >= 1 - 0.37 * 0.2 - 1e-6 and ratio.max() <= 1 + 0.37 * 0.2 + 1e-6


def test_does_not_modify_inputs_or_backprop_into_delta():
    adv = torch.tensor([1.0, -0.5])
    delta = torch.tensor([[0.3, -0.2], [0.1, 0.0]], requires_grad=True)
    before = delta.detach().clone()
    out = rlsd_token_advantages(adv, delta, torch.ones(2, 2), lam=0.5, eps_w=0.2)
    assert not out.requires_grad
    assert torch.equal(delta.detach(), before)


def test_evidence_weights():
    # w = exp(sign(A)·Δ): A>0 -> P_T/P_S, A<0 -> P_S/P_T, A=0 -> 1
    w = evidence_weights(torch.tensor([2.0, -3.0, 0.0]), torch.full((3, 1), math.log(3)))
    torch.testing.assert_close(w, torch.tensor([[3.0], [1 / 3], [1.0]]), rtol=0, atol=1e-6)


def test_lambda_schedule_counts_steps_from_one():
    # the release's indexing: optimizer steps count from 1, λ = λ0·max(1 - step/D, 0) without warm-up.
    # λ0 = 0.5, D = 60: step 1 -> 0.5·59/60, step 30 -> 0.5·30/60 = 0.25, step 59 -> 0.5/60, step 60 -> 0
    assert lam_at(1, 0.5, 60) == pytest.approx(0.5 * 59 / 60, rel=0, abs=1e-15)
    assert lam_at(30, 0.5, 60) == pytest.approx(0.25, rel=0, abs=1e-15)
    assert lam_at(59, 0.5, 60) == pytest.approx(0.5 / 60, rel=0, abs=1e-15)
    assert lam_at(60, 0.5, 60) == 0.0 and lam_at(61, 0.5, 60) == 0.0 and lam_at(1000, 0.5, 60) == 0.0
    # D = 50 (the paper): step 10 -> 0.5·(1 - 10/50) = 0.4
    assert lam_at(10, 0.5, 50) == pytest.approx(0.4, rel=0, abs=1e-15)


def test_lambda_schedule_with_warmup():
    # W = 4, D = 8, λ0 = 0.5: steps 1..3 warm up as λ0·s/W = .125, .25, .375; step 4 peaks at .5 (decay starts,
    # progress 0); step 6 -> 0.5·(1 - 2/8) = 0.375; step 12 = W + D -> 0; after that 0
    got = [lam_at(s, 0.5, 8, 4) for s in range(1, 14)]
    want = [0.125, 0.25, 0.375, 0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625, 0.0, 0.0]
    assert got == pytest.approx(want, rel=0, abs=1e-15)
    assert lam_at(0, 0.5, 8, 4) == 0.0  # (no update is step 0; the formula gives 0 there)


def test_methods_table():
    adv = torch.tensor([1.0, -1.0])
    delta = torch.tensor([[0.5, -0.25], [1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])

    def run(method, **kw):
        return token_advantages(TokenRule(method, **kw), adv, delta, mask)

    assert torch.equal(run("grpo", lam=0.5, eps_w=0.2), torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    assert torch.equal(run("opsd"), torch.tensor([[0.5, -0.25], [1.0, 0.0]]))
    # GRPO+OPSD: A + coef·Δ = [[1+.25, 1-.125], [-1+.5, 0]]
    torch.testing.assert_close(run("grpo_opsd", coef=0.5), torch.tensor([[1.25, 0.875], [-0.5, 0.0]]),
                               rtol=0, atol=1e-7)  # fmt: skip
    torch.testing.assert_close(grpo_opsd_token_advantages(adv, delta, mask, coef=0.5), run("grpo_opsd", coef=0.5))
    # rlsd goes through rlsd_token_advantages with the rule's λ and ε_w
    assert torch.equal(run("rlsd", lam=0.5, eps_w=0.2), rlsd_token_advantages(adv, delta, mask, lam=0.5, eps_w=0.2))
    # the JSD form keeps only the reward part: A for grpo_opsd, 0 for opsd
    assert torch.equal(run("grpo_opsd", coef=0.5, distill="jsd"), torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    assert not run("opsd", distill="jsd").any()
    # the teacher pass: never for GRPO, for RLSD when λ > 0 (or for diagnostics), always for the OPSD family
    assert [get_method(m).needs_teacher(0.0, False) for m in ("grpo", "rlsd", "opsd", "grpo_opsd")] == [
        False, False, True, True]  # fmt: skip
    assert get_method("rlsd").needs_teacher(0.1, False) and get_method("rlsd").needs_teacher(0.0, True)
    assert not get_method("grpo").needs_teacher(0.5, True)
    with pytest.raises(KeyError, match="known: rlsd, grpo, opsd, grpo_opsd"):
        get_method("rlsdd")


def test_thought_only_and_negative_only_reweighting():
    # λ=0.5, ε_w=0.2, Δ=log 2 on every token: reweighted A=+1 -> w=2 -> 1.2 -> Â = 0.5 + 0.6 = 1.1;
    # reweighted A=-1 -> w=0.5 -> 0.8 -> Â = -(0.5 + 0.4) = -0.9; not reweighted: Â = A; padding: 0
    adv = torch.tensor([1.0, -1.0])
    delta = torch.full((2, 4), math.log(2))
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    thought = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])

    def run(**kw):  # the switches act through Δ_t: 0 outside the reweighted tokens
        return rlsd_token_advantages(adv, delta * reweight_tokens(adv, mask, **kw), mask, 0.5, 0.2)

    full = torch.tensor([[1.1, 1.1, 1.1, 1.1], [-0.9, -0.9, -0.9, 0.0]])
    torch.testing.assert_close(run(), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(rlsd_token_advantages(adv, delta, mask, 0.5, 0.2), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        run(thought_mask=thought),
        torch.tensor([[1.0, 1.1, 1.1, 1.0], [-0.9, -1.0, -0.9, 0.0]]),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        run(negative_only=True),
        torch.tensor([[1.0, 1.0, 1.0, 1.0], [-0.9, -0.9, -0.9, 0.0]]),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        run(thought_mask=thought, negative_only=True),
        torch.tensor([[1.0, 1.0, 1.0, 1.0], [-0.9, -1.0, -0.9, 0.0]]),
        rtol=0,
        atol=1e-6,
    )
    # A = 0 stays 0 under every switch
    zero_adv = torch.zeros(2)
    for kw in ({}, {"negative_only": True}, {"thought_mask": thought}):
        out = rlsd_token_advantages(zero_adv, delta * reweight_tokens(zero_adv, mask, **kw), mask, 0.5, 0.2)
        assert torch.equal(out, torch.zeros(2, 4))


def test_thought_span_mask_multi_token_tags():
    # "<thought>" = [10, 11], "</thought>" = [10, 12, 11]; the tags are 0, the inside 1, an open span runs on
    S, E = [10, 11], [10, 12, 11]
    ids = torch.tensor([
        [10, 11, 5, 6, 10, 12, 11, 7, 0],    # one span: tokens 5, 6
        [3, 10, 11, 10, 12, 11, 10, 11, 4],  # an empty span, then an open one: token 4
        [10, 5, 11, 10, 11, 8, 9, 0, 0],     # 10 5 11 is no tag; span from index 5, padding after 7
        [10, 12, 11, 5, 6, 7, 8, 9, 1],      # a closing tag first: no span
    ])  # fmt: skip
    mask = torch.ones(4, 9)
    mask[2, 7:] = 0
    want = torch.tensor([
        [0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)  # fmt: skip
    assert torch.equal(thought_span_mask(ids, mask, S, E), want)
    with pytest.raises(ValueError, match="non-empty"):
        thought_span_mask(ids, mask, [], E)


def test_groups_in_band_is_strict():
    # G=4 accuracies, means 0, .25, .5, 1, and exactly low/high: (0.25, 0.75) keeps .5 only (ends excluded)
    scores = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.float32)
    assert groups_in_band(scores, 4, 0.25, 0.75).tolist() == [False, False, True, False, False]
    assert groups_in_band(scores, 4, 0.01, 0.99).tolist() == [False, True, True, False, True]


def test_release_opsd_is_a_constant_token_advantage():
    # the release's OPSD loss coef·mean(log P_T - log P_S) has gradient -coef·∇mean log P_S: Â_t = coef, whatever Δ
    from mmrlsd.algo.rlsd import opsd_release_token_advantages

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for delta in (torch.zeros(2, 3), torch.randn(2, 3)):
        out = opsd_release_token_advantages(torch.tensor([1.0, -1.0]), delta, mask, coef=0.5)
        assert torch.equal(out, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.0]]))
