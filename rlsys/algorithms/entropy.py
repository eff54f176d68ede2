"""Per-token entropy of the policy from full-vocabulary logits (CPU / single-device reference).

Choices and simplifications:
- ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``, which needs no ``log(0)``; value and gradient
  stay finite with ``-inf`` logits of masked vocabulary entries (their probability is exactly 0).
- Computed in at least float32: bf16 logits lose the small probabilities that the sum needs.
- The whole vocabulary is on one device. The tensor-parallel actor, whose logits are split
  over the vocabulary, needs a vocab-parallel version with all-reduces of the max, the
  partition sum and the weighted sum; this function is what that version is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last dimension: ``[..., vocab] -> [...]``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    # 0 * -inf would be NaN (in forward and in backward) for masked entries; their probability
    # is 0, so their logit is replaced before the product rather than the product afterwards.
    finite_logits = torch.where(probs > 0, logits, torch.zeros_like(logits))
    expected_logit = (probs * finite_logits).sum(dim=-1)
    return torch.logsumexp(logits, dim=-1) - expected_logit
