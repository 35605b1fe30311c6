import pytest
import torch

from mmrlsd.algo import demonstration_mask, pick_demonstrations


def test_first_other_correct_row_of_the_group():
    correct = [False, True, True, False, False, False, False, True]
    assert pick_demonstrations(correct, 4) == [1, 2, 1, 1, 7, 7, 7, None]


def test_a_lone_correct_row_is_never_its_own_demonstration():
    assert pick_demonstrations([True, False, False], 3) == [None, 0, 0]
    assert pick_demonstrations([False] * 4, 2) == [None] * 4


def test_groups_do_not_mix_and_the_mask_follows():
    demos = pick_demonstrations([True, False, False, False], 2)
    assert demos == [None, 0, None, None]
    assert torch.equal(demonstration_mask(demos), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_partial_group_is_an_error():
    with pytest.raises(ValueError, match="5 rows is not a whole number of groups of 2"):
        pick_demonstrations([True] * 5, 2)
