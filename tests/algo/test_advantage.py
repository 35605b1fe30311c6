import pytest
import torch

from mmrlsd.algo import get_advantage, grpo_advantages
from mmrlsd.algo.advantage import all_equal_groups, reinforce_pp_advantages


def test_hand_computed():
    # group [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.5625 + 3·0.0625)/3) = 0.5
    # A = (1-0.25)/0.5 = 1.5 and (0-0.25)/0.5 = -0.5 (eps = 1e-6 shifts these by < 1e-5)
    a = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    torch.testing.assert_close(a, torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=0, atol=1e-5)
    b = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, norm_std=False)
    torch.testing.assert_close(b, torch.tensor([0.75, -0.25, -0.25, -0.25]), rtol=0, atol=1e-7)


def test_matches_loop_and_zero_for_equal_groups():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (5 * 4,), generator=g).float() / 2
    r[:4] = 0.7  # one all-equal group
    a = grpo_advantages(r, 4)
    for b in range(5):
        grp = r[b * 4 : b * 4 + 4]
        want = (grp - grp.mean()) / (grp.std() + 1e-6)
        torch.testing.assert_close(a[b * 4 : b * 4 + 4], want, rtol=0, atol=1e-6)
    assert torch.all(a[:4] == 0)
    # groups [1,1,1,1], [0,1,0,0], [.5,.5,.5,.5], [0,0,0,1]: the first and third are all equal
    hand = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1])
    assert all_equal_groups(hand, 4).tolist() == [True, False, True, False]
    assert all_equal_groups(hand, 2).tolist() == [True, True, False, True, True, True, True, False]


def test_bad_shape_and_registry():
    with pytest.raises(ValueError, match="G=4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(KeyError, match="known: grpo"):
        get_advantage("ppo")


def test_reinforce_pp_whitens_over_tokens():
    # R = [1, 0, 0.5], lengths [2, 1, 1]: 4 tokens with returns 1, 1, 0, 0.5
    # μ = (2·1 + 0 + 0.5)/4 = 0.625; Σ L (R-μ)² = 2·0.375² + 0.625² + 0.125² = 0.6875; σ² = 0.6875/3 (unbiased)
    # A = (R - μ)/σ = [0.375, -0.625, -0.125]/0.478714 = [0.783349, -1.305582, -0.261116]
    a = reinforce_pp_advantages(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([2, 1, 1]))
    torch.testing.assert_close(a, torch.tensor([0.783349, -1.305582, -0.261116]), rtol=0, atol=2e-6)
    # no group baseline: a batch where every response has the same reward gives 0 (σ = 0, eps keeps it finite)
    assert torch.equal(reinforce_pp_advantages(torch.ones(3), torch.tensor([4, 2, 1])), torch.zeros(3))
    # token weighting: a longer response pulls the mean towards its reward
    short_long = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), torch.tensor([3, 1]))
    torch.testing.assert_close(short_long, torch.tensor([0.5, -1.5]), rtol=0, atol=2e-6)


def test_reinforce_pp_over_ranks_is_the_whole_batch():
    # two "ranks" holding halves of the batch: summing the three token sums over them gives the whole batch's
    # μ and σ, so each half's advantages equal the corresponding rows of the single-process result
    from mmrlsd.algo import get_advantage

    r, L = torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor([2, 1, 1, 5])
    whole = get_advantage("reinforce_pp")(r, 2, lengths=L)
    halves = [(r[:2], L[:2]), (r[2:], L[2:])]
    sums = [
        torch.stack([w.double().sum(), (w * x).double().sum(), (w * x * x).double().sum()]) for x, w in halves
    ]

    def reduce(t):  # what an all-reduce over the two ranks returns
        return sums[0] + sums[1]

    got = torch.cat([reinforce_pp_advantages(x, w, reduce=reduce) for x, w in halves])
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        get_advantage("reinforce_pp")(r, 2)
