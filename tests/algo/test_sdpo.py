import pytest
import torch

from mmrlsd.algo import demonstration_mask, pick_demonstrations
from mmrlsd.algo.sdpo import pick_feedback


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


def test_shortest_demonstration_and_feedback():
    # G=4, two groups. lengths: group 0 [5, 3, 8, 3], group 1 [4, 4, 2, 9]
    correct = [True, True, False, True, False, False, True, False]
    lengths = [5, 3, 8, 3, 4, 4, 2, 9]
    # shortest other correct: row0 -> {1:3, 3:3} -> 1 (first of the equally short); row1 -> {0:5, 3:3} -> 3;
    # row2 -> {0, 1, 3} -> 1; row3 -> {0:5, 1:3} -> 1; group 1: only row 6 is correct -> rows 4, 5, 7 get 6, row 6 none
    assert pick_demonstrations(correct, 4, lengths) == [1, 3, 1, 1, 6, 6, None, 6]
    assert pick_demonstrations(correct, 4) == [1, 0, 0, 0, 6, 6, None, 6]  # the first, as before
    # shortest other incorrect: group 0 has only row 2 -> rows 0, 1, 3 get 2, row 2 none;
    # group 1: {4:4, 5:4, 7:9}: row4 -> 5, row5 -> 4, row6 -> 4 (first of 4, 5), row7 -> 4
    assert pick_feedback(correct, 4, lengths) == [2, 2, None, 2, 5, 4, 4, 4]
