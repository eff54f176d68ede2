"""Group-relative advantages, dynamic-sampling mask, overlong penalty and token broadcast, against hand values."""

import math

import pytest
import torch

from rlsys.algorithms import (
    advantages_to_tokens,
    group_relative_advantages,
    nonzero_variance_group_mask,
    overlong_penalty,
)

EPS = 1e-6


def test_mean_centred_per_group_without_std():
    rewards = torch.tensor([5.0, -5.0, -5.0, 5.0, 5.0, 5.0, -5.0, 5.0])
    # group 0: mean 0; group 1: mean (5 + 5 - 5 + 5) / 4 = 2.5
    expected = [5.0, -5.0, -5.0, 5.0, 2.5, 2.5, -7.5, 2.5]
    advantages = group_relative_advantages(rewards, group_size=4, norm_by_std=False)
    assert advantages.tolist() == pytest.approx(expected)


def test_std_normalisation_uses_population_std():
    rewards = torch.tensor([5.0, -5.0, -5.0, 5.0, 5.0, 5.0, -5.0, 5.0], dtype=torch.float64)
    # group 0: deviations ±5, population std 5.
    # group 1: deviations (2.5, 2.5, -7.5, 2.5), population variance (3 * 6.25 + 56.25) / 4 = 18.75.
    # (The unbiased std would be sqrt(75 / 3) = 5, giving 0.5 instead of 0.577 for the 2.5s.)
    std1 = math.sqrt(18.75)
    expected = [5 / (5 + EPS), -5 / (5 + EPS), -5 / (5 + EPS), 5 / (5 + EPS)]
    expected += [2.5 / (std1 + EPS), 2.5 / (std1 + EPS), -7.5 / (std1 + EPS), 2.5 / (std1 + EPS)]
    advantages = group_relative_advantages(rewards, group_size=4, norm_by_std=True, eps=EPS)
    assert advantages.tolist() == pytest.approx(expected, rel=1e-12)


def test_zero_variance_groups_are_masked_and_get_exactly_zero_advantage():
    rewards = torch.tensor([5.0, 5.0, 5.0, -5.0, 5.0, 5.0, -5.0, -5.0, -5.0])
    assert nonzero_variance_group_mask(rewards, group_size=3).tolist() == [False, True, False]
    for norm_by_std in (False, True):
        advantages = group_relative_advantages(rewards, group_size=3, norm_by_std=norm_by_std)
        assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
        assert advantages[6:].tolist() == [0.0, 0.0, 0.0]
        assert advantages[3] < 0 < advantages[4]


def test_equal_rewards_with_float_rounding_in_the_mean_still_give_zero():
    # In float32 the mean of six -4.7s differs from -4.7 by ~5e-7; divided by (std + 1e-6) that
    # would be an advantage of order 0.5 if equality were not tested explicitly.
    rewards = torch.full((6,), -4.7, dtype=torch.float32)
    assert (rewards - rewards.mean()).abs().max() > 0
    advantages = group_relative_advantages(rewards, group_size=6, norm_by_std=True)
    assert advantages.tolist() == [0.0] * 6
    assert nonzero_variance_group_mask(rewards, group_size=6).tolist() == [False]


def test_group_of_one_gives_zero_not_nan():
    advantages = group_relative_advantages(torch.tensor([5.0, -5.0]), group_size=1, norm_by_std=True)
    assert advantages.tolist() == [0.0, 0.0]


def test_rewards_that_do_not_split_into_groups_are_rejected():
    with pytest.raises(ValueError, match="groups of 4"):
        group_relative_advantages(torch.zeros(6), group_size=4)


def test_overlong_penalty_is_linear_in_the_buffer():
    # max_length 10, buffer 4: no penalty up to 6 tokens, (6 - len) / 4 up to 10, -1 beyond; times 5.
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    expected = [0.0, 0.0, 5 * (6 - 7) / 4, 5 * (6 - 8) / 4, 5 * (6 - 10) / 4, -5.0]
    penalty = overlong_penalty(lengths, max_length=10, buffer_length=4, penalty_factor=5.0)
    assert penalty.tolist() == pytest.approx(expected)


def test_overlong_penalty_rejects_an_empty_buffer():
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(torch.tensor([3]), max_length=10, buffer_length=0)


def test_advantages_broadcast_to_response_tokens_only():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    tokens = advantages_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert tokens.tolist() == [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]
