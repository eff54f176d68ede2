"""Off-policy correction: importance weights of the proximal policy against the behaviour policy.

The rollout engine samples from the behaviour policy ``pi_behav`` (its log-probs travel with the
samples). The actor's log-probs of the same tokens, recomputed at training time before the update
(``old_logprobs``), are the proximal policy ``pi_prox``. PPO's ratio clips ``pi_theta`` against
``pi_prox``; the weights below multiply each token's policy loss by how much more (or less) likely
``pi_prox`` makes the sampled tokens than ``pi_behav`` did. They correct for two things at once:
stale samples (asynchronous rollout, ``rollout.max_staleness > 0``) and the numeric difference
between the engine and the actor, which exists even on-policy.

Modes (``algorithm.off_policy_correction``), all on the log-ratio ``d_t = log pi_prox - log pi_behav``:
- ``tis``, truncated importance sampling (verl's ``rollout_is``, slime's ``--use-tis``):
  ``w = min(r, high)``.
- ``mis``, masked importance sampling (verl's rejection sampling): ``w = r`` inside
  ``[low, high]``, 0 outside, so tokens (or whole sequences) the behaviour policy made too
  unlikely or too likely drop out of the loss. Dropped tokens stay in the token-mean's
  denominator: the normaliser is the batch's response-token count, fixed before the update.
- ``decoupled_ppo`` (AReaL): the clip against ``pi_prox`` times the behaviour weight
  ``min(pi_prox / pi_behav, high)`` per token. In formula this is token-level ``tis``; the name is
  there so that a recipe can say which paper it follows. It is token level only.
Levels (``algorithm.correction_level``), what ``r`` is:
- ``token``: ``r_t = exp(d_t)``;
- ``sequence``: ``r = exp(sum_t d_t)`` over the response, one weight for all its tokens;
- ``geometric``: ``r = exp(mean_t d_t)``, the per-token geometric mean (length-independent).
The log-ratio is clamped to ±20 before ``exp`` so that no weight overflows. Weights are constants
(no gradient): they reweight the policy gradient, they are not trained.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

CorrectionMode = Literal["none", "tis", "mis", "decoupled_ppo"]
CorrectionLevel = Literal["token", "sequence", "geometric"]

LOG_RATIO_LIMIT = 20.0


def importance_weights(
    proximal_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    *,
    mode: CorrectionMode,
    level: CorrectionLevel = "token",
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token weights ``[batch, seq]`` (0 off ``mask``) and their metrics over ``mask``.

    Metrics (detached 0-d tensors): ``is_weight_mean`` and ``is_weight_max`` of the raw ratio ``r``
    before truncation or masking, ``is_clipped_fraction``, the fraction of tokens whose weight the
    mode changed (truncated, or masked out), and ``is_valid_tokens``.
    """
    if mode not in get_args(CorrectionMode):
        raise ValueError(f"mode must be one of {get_args(CorrectionMode)}, got {mode!r}")
    if level not in get_args(CorrectionLevel):
        raise ValueError(f"level must be one of {get_args(CorrectionLevel)}, got {level!r}")
    if mode == "decoupled_ppo" and level != "token":
        raise ValueError(f"decoupled_ppo is token level, got level={level!r}")
    if not 0.0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    if proximal_logprobs.shape != behaviour_logprobs.shape or mask.shape != proximal_logprobs.shape:
        raise ValueError(f"shapes differ: proximal {tuple(proximal_logprobs.shape)}, behaviour "
                         f"{tuple(behaviour_logprobs.shape)}, mask {tuple(mask.shape)}")
    valid = mask.bool()
    log_ratio = proximal_logprobs.detach().float() - behaviour_logprobs.detach().float()
    log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio))
    if level == "token":
        pooled = log_ratio
    else:
        pooled = log_ratio.sum(dim=-1, keepdim=True)
        if level == "geometric":
            pooled = pooled / valid.sum(dim=-1, keepdim=True).clamp(min=1)
        pooled = pooled.expand_as(log_ratio)
    ratio = torch.exp(pooled.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    if mode == "none":
        weights, changed = torch.ones_like(ratio), torch.zeros_like(valid)
    elif mode == "mis":
        inside = (ratio >= low) & (ratio <= high)
        weights, changed = torch.where(inside, ratio, torch.zeros_like(ratio)), ~inside
    else:  # tis, decoupled_ppo
        weights, changed = ratio.clamp(max=high), ratio > high
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    count = valid.sum().clamp(min=1)
    metrics = {
        "is_weight_mean": torch.where(valid, ratio, torch.zeros_like(ratio)).sum() / count,
        "is_weight_max": torch.where(valid, ratio, torch.zeros_like(ratio)).max().clamp(min=0.0),
        "is_clipped_fraction": (changed & valid).float().sum() / count,
        "is_valid_tokens": valid.sum().float(),
    }
    return weights, metrics
