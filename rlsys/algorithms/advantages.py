"""Group-relative advantages for GRPO, from one scalar reward per sequence.

Choices and simplifications:
- Layout: rewards are a flat ``[n_prompts * group_size]`` tensor whose groups are contiguous
  (the ``group_size`` responses of prompt ``p`` sit at ``p * group_size ... (p + 1) * group_size - 1``).
- Baseline: the group mean; every advantage is ``r_i - mean(group)``. There is no value model.
- ``norm_by_std`` divides by ``std(group) + eps`` with the POPULATION std (``correction=0``): the
  group is all the samples we normalise, not a sample from which we estimate a spread. It is
  defined for ``group_size == 1`` (where the unbiased std is NaN), and it gives every group with
  any spread the same advantage energy, ``sum_i A_i**2 ~= group_size``. The unbiased std
  (verl, TRL) only differs by the constant ``sqrt((G - 1) / G)`` for a fixed group size, i.e. by
  a learning-rate scale.
- Groups whose rewards are all equal get advantage exactly 0, with or without std
  normalisation. Testing equality instead of trusting ``r - mean == 0`` matters because float
  rounding in the mean would otherwise leave values of order 1e-8 that ``/ (0 + eps)`` blows up.
- Dynamic sampling (DAPO) is a keep-mask of groups whose rewards are not all equal: those are
  exactly the groups that carry a gradient. The mask looks at the rewards it is given; pass the
  shaped rewards (after the overlong penalty) so that a group of equally wrong answers of
  different lengths, which still has a learning signal, is kept.
- Soft overlong punishment (DAPO, eq. 13) with ``L = max_length`` and ``B = buffer_length``:
      penalty(len) = 0                        if len <= L - B
                   = ((L - B) - len) / B      if L - B < len <= L
                   = -1                       if len > L
  multiplied by ``penalty_factor`` (DAPO uses 1 for ±1 rewards; scale it with the reward range).
  It is added to the reward before the advantages are computed.
- Advantages reach tokens by broadcasting the sequence value over its response tokens; padding
  and prompt tokens get 0.

Intended order: ``rewards + overlong_penalty(...)`` -> ``nonzero_variance_group_mask`` (optional)
-> ``group_relative_advantages`` -> ``advantages_to_tokens``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [n_prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")


def nonzero_variance_group_mask(rewards: Tensor, group_size: int) -> Tensor:
    """Bool ``[n_prompts]``: True for groups whose rewards are not all equal (the groups to keep).

    Expand to sequences with ``mask.repeat_interleave(group_size)``.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def group_relative_advantages(
    rewards: Tensor, group_size: int, *, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Per-sequence advantages ``[n_prompts * group_size]``: reward minus its group mean,
    divided by ``population_std + eps`` when ``norm_by_std``; 0 for groups with equal rewards."""
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (grouped.std(dim=1, correction=0, keepdim=True) + eps)
    has_spread = nonzero_variance_group_mask(rewards, group_size).unsqueeze(1)
    return torch.where(has_spread, centred, torch.zeros_like(centred)).view(-1)


def overlong_penalty(
    response_lengths: Tensor, max_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO soft overlong punishment per response (<= 0), to be added to the rewards."""
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"buffer_length must be in (0, max_length={max_length}], got {buffer_length}")
    lengths = response_lengths.to(torch.float32)
    expected_length = max_length - buffer_length
    in_buffer = ((expected_length - lengths) / buffer_length).clamp(max=0.0)
    penalty = torch.where(lengths > max_length, torch.full_like(lengths, -1.0), in_buffer)
    return penalty * penalty_factor


def advantages_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """``[batch, seq]`` token advantages: each sequence's advantage on its response tokens, 0 elsewhere."""
    if advantages.dim() != 1 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be [batch] matching response_mask {tuple(response_mask.shape)}"
        )
    return advantages.unsqueeze(1) * response_mask.to(advantages.dtype)
