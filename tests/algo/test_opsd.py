import torch
import torch.nn.functional as F

from mmrlsd.algo import generalized_jsd


def _kl(p_log, q_log):  # KL(p || q), per row
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_limits_and_midpoint():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g)
    t = torch.randn(2, 3, 5, generator=g)
    mask = torch.ones(2, 3)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    n = 6.0
    # β = 0: forward KL(T || S); β = 1: reverse KL(S || T)  (GKD / TRL convention)
    torch.testing.assert_close(generalized_jsd(s, t, mask, 0.0, n), _kl(lt, ls).sum() / n, rtol=0, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, mask, 1.0, n), _kl(ls, lt).sum() / n, rtol=0, atol=1e-6)
    # β = 0.5: M = (P_T + P_S)/2, JSD = ½KL(T||M) + ½KL(S||M)
    m = torch.log((lt.exp() + ls.exp()) / 2)
    want = (0.5 * _kl(lt, m) + 0.5 * _kl(ls, m)).sum() / n
    torch.testing.assert_close(generalized_jsd(s, t, mask, 0.5, n), want, rtol=0, atol=1e-6)
    assert float(generalized_jsd(s, s.clone(), mask, 0.5, n)) < 1e-6  # identical distributions -> 0
