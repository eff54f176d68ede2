"""How far the rollout engine's log-probs are from the actor's for the same tokens.

A token-weighted mean absolute difference: after a weight sync the engine and the actor hold the
same weights, so what remains is numerics (kernels, dtypes, batch shapes). A jump means the sync
or the engine is broken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def logprob_mismatch(rollout_logprobs: Tensor, actor_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-weighted mean absolute log-prob difference over ``mask`` (see the top); a 0-d tensor."""
    if rollout_logprobs.shape != actor_logprobs.shape or mask.shape != actor_logprobs.shape:
        raise ValueError(
            f"shapes differ: rollout {tuple(rollout_logprobs.shape)}, actor {tuple(actor_logprobs.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    selected = mask.bool()
    difference = (rollout_logprobs.float() - actor_logprobs.float()).abs()
    total = torch.where(selected, difference, torch.zeros_like(difference)).sum()
    return total / selected.sum().clamp(min=1)


def sequence_logprob_mismatch(rollout: Sequence[Tensor], actor: Sequence[Tensor]) -> float:
    """``logprob_mismatch`` over every response the engine gave log-probs for (NaN when none did)."""
    pairs = [(r, a.float()) for r, a in zip(rollout, actor) if r.numel() == a.numel() and r.numel()]
    if not pairs:
        return float("nan")
    engine_lp, actor_lp = torch.cat([r for r, _ in pairs]), torch.cat([a for _, a in pairs])
    return logprob_mismatch(engine_lp, actor_lp, torch.ones_like(engine_lp)).item()
