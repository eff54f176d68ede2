"""Importance-ratio early stop: drop the gradient of data the policy has drifted too far from.

Choices and simplifications:
- Statistic: the mean of ``exp(logp - old_logp)`` over valid response tokens, in float64 and
  without clamping (this is a detector: an overflow to inf must trigger it, not hide).
- Across data-parallel ranks it is the TOKEN-WEIGHTED global mean,
  ``sum_ranks sum_tokens ratio / sum_ranks n_tokens`` (one all_reduce of [sum, count]), the same
  weighting as the token-mean loss; a rank with few tokens does not outweigh the others as a mean
  of rank means would. Every rank gets the same value and therefore the same decision.
- Triggers when the mean STRICTLY exceeds the threshold (exactly at it does not), and also when
  the mean is not finite (NaN or inf), since no update from such a batch can be trusted.
- A batch without any valid token has mean 1 (nothing moved) and never triggers.
- A skipped batch is applied by multiplying its loss by 0.0 (``zero_loss_if_skipped``), not by
  leaving out ``backward``. The graph stays the same, so every rank still runs the full backward
  and takes part in every collective inside it: Megatron's DP gradient all-reduce fires from
  backward hooks per bucket, and pipeline stages exchange activation gradients with send/recv.
  A rank that skips backward while its peers run it leaves them waiting on those collectives
  (a hang), and on PP the earlier stages would wait for gradients that never come. Zeroing makes
  all parameter gradients of that batch exactly 0 as long as the graph is finite; it cannot clean
  NaN/inf (0 * inf = NaN in backward), which is left to the optimizer's non-finite grad-norm check.

Granularity (an actor config choice):
- ``microbatch`` (as RLinf does): the check runs inside the loss of each microbatch, on that
  microbatch's tokens, and only that microbatch's loss is zeroed; the other microbatches of the
  minibatch still update. With ``dp_group`` the DP ranks reduce microbatch ``k`` together, which
  needs the same number of microbatches on every rank (Megatron already requires it). Under PP
  only the last stage has log-probs; the zero gradient then flows back through the other stages.
- ``minibatch``: the decision covers one optimizer step. Gradients are accumulated over all
  microbatches before the whole minibatch's mean ratio is known, so the statistic is gathered
  over the minibatch (sum and count per microbatch, or an extra no-grad forward pass) and a
  skipped minibatch has its gradients zeroed / its optimizer step skipped on every rank together.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def importance_ratio_early_stop(
    logprobs: Tensor,
    old_logprobs: Tensor,
    response_mask: Tensor,
    threshold: float = 5.0,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[bool, float]:
    """``(should_skip, mean_ratio)``: skip when the token-weighted mean of ``exp(logp - old_logp)``
    over valid tokens (of all ranks of ``dp_group``) is above ``threshold`` or not finite."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must have the same shape"
        )
    with torch.no_grad():
        valid = response_mask.bool()
        ratio = torch.exp(logprobs.detach().double() - old_logprobs.detach().double())
        ratio_sum = torch.where(valid, ratio, torch.zeros_like(ratio)).sum()
        sum_and_count = torch.stack([ratio_sum, valid.sum().double()])
        if dp_group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sum_and_count, op=dist.ReduceOp.SUM, group=dp_group)
        total_ratio, total_tokens = sum_and_count.tolist()
    mean_ratio = total_ratio / total_tokens if total_tokens > 0 else 1.0
    should_skip = not math.isfinite(mean_ratio) or mean_ratio > threshold
    return should_skip, mean_ratio


def zero_loss_if_skipped(loss: Tensor, should_skip: bool) -> Tensor:
    """``loss * 0.0`` when skipped, so backward still runs through the same graph with zero gradients."""
    return loss * 0.0 if should_skip else loss
