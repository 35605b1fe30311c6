"""Online filtering with refill (`mmrlsd.train.refill`): which groups are kept, when more prompts are rolled
out, what fills the batch when the tries run out, and how groups of different response widths are joined."""

from types import SimpleNamespace

import torch

from mmrlsd.train.refill import fill_groups, gather_groups, pad_rollouts
from mmrlsd.types import Rollouts

G = 2


def groups(name: str, accs: list[float], width: int = 3):
    """A stand-in for `Groups`: B = len(accs) // G prompts named name0, name1, ...; the reward is the accuracy."""
    n = len(accs)
    ids = torch.arange(n * width).view(n, width) + 100 * len(name)
    ro = Rollouts(ids, torch.ones(n, width, dtype=torch.long), [f"{name}{i}" for i in range(n)], G)
    return SimpleNamespace(
        samples=[f"{name}{b}" for b in range(n // G)], group_size=G, rollouts=ro,
        results=[SimpleNamespace(accuracy=a) for a in accs], rewards=torch.tensor(accs),
    )  # fmt: skip


def names(chosen):
    return [g.samples[b] for g, b in chosen]


def test_refills_until_the_batch_is_full():
    # band (0.01, 0.99): group means a: [1, .5, 0] -> keep a1; b: [.5, .5, 1] -> keep b0, b1 -> full (B = 3)
    first = groups("a", [1, 1, 1, 0, 0, 0])
    rounds = {1: groups("b", [1, 0, 0, 1, 1, 1]), 2: groups("c", [1, 0, 1, 0, 1, 0])}
    calls = []

    def more(r):
        calls.append(r)
        return rounds[r]

    kept, pad, stats = fill_groups(first, more, key="accuracy", low=0.01, high=0.99, max_rounds=20)
    assert calls == [1]  # the second batch filled it; no third round
    assert names(kept) == ["a1", "b0", "b1"] and pad == []
    # 6 groups rolled out, 3 kept; one extra round of B = 3 prompts x G = 2 responses
    assert stats == {"filter/kept_frac": 0.5, "filter/rounds": 2.0, "filter/extra_rollouts": 6.0,
                     "filter/padded_groups": 0.0}  # fmt: skip


def test_keeps_the_first_b_groups_in_rollout_order():
    first = groups("a", [1, 0, 1, 0, 0, 0])  # a0, a1 kept
    kept, pad, stats = fill_groups(first, lambda r: groups("b", [1, 0] * 3), key="reward", low=0.01,
                                   high=0.99, max_rounds=5)  # fmt: skip
    assert names(kept) == ["a0", "a1", "b0"] and pad == []
    assert stats["filter/kept_frac"] == 5 / 6  # a0, a1 and all three of b's groups pass


def test_out_of_tries_pads_with_the_latest_dropped_groups():
    first = groups("a", [1, 1, 0, 1, 0, 0])  # only a1 kept
    kept, pad, stats = fill_groups(first, lambda r: groups("b", [1, 1, 1, 1, 0, 0]), key="accuracy",
                                   low=0.01, high=0.99, max_rounds=2)  # fmt: skip
    assert names(kept) == ["a1"]
    assert names(pad) == ["b1", "b2"]  # the two most recently dropped
    assert stats["filter/padded_groups"] == 2.0 and stats["filter/rounds"] == 2.0
    assert stats["filter/kept_frac"] == 1 / 6


def test_a_full_first_batch_rolls_out_nothing_more():
    kept, pad, stats = fill_groups(groups("a", [1, 0] * 3), lambda r: 1 / 0, key="accuracy", low=0.01,
                                   high=0.99, max_rounds=3)  # fmt: skip
    assert len(kept) == 3 and not pad and stats["filter/extra_rollouts"] == 0.0


def test_gather_pads_responses_of_different_widths():
    a, b = groups("a", [1, 0, 1, 1], width=2), groups("bb", [0, 1, 0, 0], width=4)
    samples, ro, results, rewards = gather_groups([(a, 1), (b, 0)], pad_id=-1)
    assert samples == ["a1", "bb0"]
    assert ro.texts == ["a2", "a3", "bb0", "bb1"]
    assert ro.response_ids.tolist() == [[104, 105, -1, -1], [106, 107, -1, -1], [200, 201, 202, 203],
                                        [204, 205, 206, 207]]  # fmt: skip
    assert ro.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert [r.accuracy for r in results] == [1, 1, 0, 1]
    assert torch.equal(rewards, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert pad_rollouts([b.rollouts], 0).response_ids.shape == (4, 4)
