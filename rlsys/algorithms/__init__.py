"""Pure tensor functions of GRPO: advantages, policy losses, off-policy correction, importance-ratio
early stop, entropy.

No Megatron or Ray here; the only distributed call is the optional all_reduce of the early stop.
"""

from rlsys.algorithms.advantages import (
    advantages_to_tokens,
    group_relative_advantages,
    nonzero_variance_group_mask,
    overlong_penalty,
)
from rlsys.algorithms.early_stop import importance_ratio_early_stop, zero_loss_if_skipped
from rlsys.algorithms.entropy import entropy_from_logits
from rlsys.algorithms.mismatch import logprob_mismatch, sequence_logprob_mismatch
from rlsys.algorithms.off_policy import CorrectionLevel, CorrectionMode, importance_weights
from rlsys.algorithms.policy_loss import AggMode, LossType, aggregate_token_losses, kl_k3, policy_loss

__all__ = [
    "AggMode",
    "CorrectionLevel",
    "CorrectionMode",
    "LossType",
    "advantages_to_tokens",
    "aggregate_token_losses",
    "entropy_from_logits",
    "group_relative_advantages",
    "importance_weights",
    "importance_ratio_early_stop",
    "kl_k3",
    "logprob_mismatch",
    "nonzero_variance_group_mask",
    "overlong_penalty",
    "policy_loss",
    "sequence_logprob_mismatch",
    "zero_loss_if_skipped",
]
