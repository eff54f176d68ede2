"""From scored rollouts to the actor's batch: rewards, optional overlong penalty and group filter,
group-relative advantages, and the rollout metrics.

Choices:
- Layout: ``n_samples`` responses per prompt, prompt-major (engines return them so), so groups
  are contiguous as ``rlsys.algorithms.advantages`` expects.
- The overlong penalty (``algorithm.overlong_buffer > 0``) is added to the scored rewards before
  the advantages and the group filter see them (a group of equally wrong answers of different
  lengths still carries a signal). ``rollout/rewards`` reports the scored rewards, unshaped.
- Dynamic sampling (``algorithm.filter_zero_variance_groups``): groups whose shaped rewards are
  all equal are dropped from the batch (they would only add zero-advantage tokens). When every
  group is dropped the step trains on nothing; ``rollout/kept_groups`` says how many were kept.
- The rollout engine's log-probs travel with the batch so the actor's own can be compared with
  them (``train/logprob_mismatch``) and, under ``algorithm.off_policy_correction``, weighed
  against them.
- Partial responses (tokens of more than one weight version, ``rlsys.runner.rollouts``):
  ``rollout/partial_fraction`` counts them. With ``algorithm.partial_rollout_mask_old`` the loss
  skips a partial response's tokens that came before its last weight update (slime's
  ``--mask-offpolicy-in-partial-rollout``); the tokens still condition the later ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlsys.actor.microbatch import RolloutBatch
from rlsys.algorithms import group_relative_advantages, nonzero_variance_group_mask, overlong_penalty
from rlsys.config import AlgorithmConfig
from rlsys.data.dataset import Prompt
from rlsys.rollout.base import Sample


@dataclass
class TrainBatch:
    batch: RolloutBatch | None
    """The kept sequences, or None when the group filter dropped every group."""
    rollout_logprobs: list[torch.Tensor]
    """The engine's log-probs of the kept sequences."""
    metrics: dict[str, float]


def _shaped_rewards(samples: Sequence[Sample], rewards: Sequence[float], max_new_tokens: int,
                    algorithm: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scored = torch.tensor(rewards, dtype=torch.float32)
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    shaped = scored
    if algorithm.overlong_buffer > 0:
        shaped = scored + overlong_penalty(lengths, max_new_tokens, algorithm.overlong_buffer,
                                           algorithm.overlong_penalty_factor)
    return scored, lengths, shaped


def groups_with_signal(samples: Sequence[Sample], rewards: Sequence[float], *, group_size: int, max_new_tokens: int,
                       algorithm: AlgorithmConfig) -> list[bool]:
    """Per group, whether ``build_train_batch`` keeps it (every group when the filter is off)."""
    if not algorithm.filter_zero_variance_groups:
        return [True] * (len(samples) // group_size)
    _, _, shaped = _shaped_rewards(samples, rewards, max_new_tokens, algorithm)
    return nonzero_variance_group_mask(shaped, group_size).tolist()


def build_train_batch(prompts: Sequence[Prompt], samples: Sequence[Sample], rewards: Sequence[float],
                      *, group_size: int, max_new_tokens: int, algorithm: AlgorithmConfig,
                      token_versions: Sequence[Sequence[int]] | None = None) -> TrainBatch:
    if len(samples) != len(prompts) * group_size or len(rewards) != len(samples):
        raise ValueError(f"{len(prompts)} prompts x {group_size} samples, got {len(samples)} samples "
                         f"and {len(rewards)} rewards")
    scored, lengths, shaped = _shaped_rewards(samples, rewards, max_new_tokens, algorithm)
    advantages = group_relative_advantages(shaped, group_size, norm_by_std=algorithm.norm_adv_by_std)
    keep_groups = torch.ones(len(prompts), dtype=torch.bool)
    if algorithm.filter_zero_variance_groups:
        keep_groups = nonzero_variance_group_mask(shaped, group_size)
    keep = keep_groups.repeat_interleave(group_size).tolist()
    versions = token_versions if token_versions is not None else [[0] * len(s.response_ids) for s in samples]

    metrics = {
        "rollout/rewards": scored.mean().item(),
        "rollout/accuracy": (scored > 0).float().mean().item(),
        "rollout/response_length": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/prompt_length": sum(len(p.token_ids) for p in prompts) / len(prompts),
        "rollout/fraction_properly_ended": sum(s.finish_reason == "stop" for s in samples) / len(samples),
        "rollout/advantages_mean": advantages.mean().item(),
        "rollout/advantages_max": advantages.max().item(),
        "rollout/advantages_min": advantages.min().item(),
        "rollout/kept_groups": float(keep_groups.sum().item()),
        "rollout/tokens": float(sum(len(prompts[s.prompt_index].token_ids) + len(s.response_ids) for s in samples)),
        "rollout/partial_fraction": sum(len(set(v)) > 1 for v in versions) / len(samples),
    }
    kept = [i for i, k in enumerate(keep) if k and samples[i].response_ids]
    if not kept:
        return TrainBatch(None, [], metrics)
    loss_mask = None
    if algorithm.partial_rollout_mask_old:
        loss_mask = [[version == max(versions[i]) for version in versions[i]] for i in kept]
    batch = RolloutBatch.build(
        prompt_ids=[list(prompts[samples[i].prompt_index].token_ids) for i in kept],
        response_ids=[samples[i].response_ids for i in kept],
        advantages=advantages[kept],
        loss_mask=loss_mask,
    )
    rollout_logprobs = [torch.tensor(samples[i].logprobs, dtype=torch.float32) for i in kept]
    return TrainBatch(batch, rollout_logprobs, metrics)
