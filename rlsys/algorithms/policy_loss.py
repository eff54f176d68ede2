"""GRPO policy losses on ``[batch, seq]`` token tensors, with their aggregation and metrics.

Choices and simplifications:
- Per-token loss ``l_t = pg_t + kl_coef * k3_ref_t - entropy_coef * H_t``, then ONE aggregation
  (``agg_mode``) for the whole sum, so the KL and entropy terms are weighted like the policy term.
- ``ratio_t = exp(logp_t - old_logp_t)``. This log-ratio and the one inside k3 are clamped to ±20
  before ``exp`` only to keep padding and diverged tokens finite (a real update never gets near
  e^20); past the clamp the term has no gradient.
- ``grpo_clip``: PPO's pessimistic clipped surrogate with clip-higher (DAPO):
      pg_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
  ``clip_high > clip_low`` lets low-probability tokens with A > 0 grow further before the clip
  stops their gradient. Dual-clip (``dual_clip_c = c > 1``) caps the loss of tokens with A < 0,
  whose surrogate is otherwise unbounded in the ratio:
      pg_t = min(pg_t, -A_t * c)   where A_t < 0
- ``reinforce_with_baseline``: ``pg_t = -A_t * logp_t``, no ratio and no clip. ``A`` already
  holds the group-mean baseline (``group_relative_advantages``). It is exact on-policy; off-policy
  (several minibatches per rollout) it is not importance-corrected.
- ``no_baseline``: ``pg_t = -R_t * logp_t``. The caller passes in ``advantages`` each sequence's
  scalar reward as scored (plus the overlong penalty if used), with no group mean subtracted
  and no std division, broadcast over its response tokens. Same formula as
  ``reinforce_with_baseline``: the two differ only in what the caller passes.
- Aggregation, with ``m`` the response mask, ``N = sum(m)`` (or ``num_tokens_normalizer``) and
  ``S`` the number of sequences with at least one valid token (or ``num_seqs_normalizer``):
      token-mean            (DAPO, default): sum_{i,t} m_it l_it / N
      seq-mean-token-mean   (GRPO paper):    (1/S) sum_i [ sum_t m_it l_it / sum_t m_it ]
      seq-mean-token-sum    (Dr. GRPO-like): (1/S) sum_i   sum_t m_it l_it
  Rows without valid tokens (padding rows) add nothing and are not counted in ``S``. An empty
  batch gives a zero loss that still has a graph.
- Microbatches and data parallel: the normalisers are the only non-additive part. Passing the
  count over the GLOBAL batch (all microbatches of the step, all DP ranks) as
  ``num_tokens_normalizer`` / ``num_seqs_normalizer`` makes the sum of the per-microbatch losses
  equal the full-batch loss. Under a DP gradient all-reduce that AVERAGES (Megatron's default),
  multiply the loss by the DP world size to keep that sum. Each normaliser is used only by the
  modes it applies to, so a caller may always pass both.
- ``token_weights`` (off-policy correction) scale the policy term per token: ``pg_t * w_t``. The
  clip decisions and metrics are those of the unweighted ratio.
- Metrics are detached 0-dim tensors (no host sync), means over THIS call's valid tokens
  (``num_valid_tokens`` is there to weight them across microbatches). ``approx_kl`` is the k3
  estimate of KL(pi_old || pi_theta) on the sampled tokens: ``ratio - 1 - log(ratio)``, unbiased
  and never negative. ``clip_frac`` counts the tokens whose gradient a clip removed: A > 0 and
  ratio > 1 + clip_high, A < 0 and ratio < 1 - clip_low, or dual-clipped (A < 0, ratio > c);
  a ratio exactly on a bound is not clipped. Non-clip loss types report 0 for the clip metrics.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

LossType = Literal["grpo_clip", "reinforce_with_baseline", "no_baseline"]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

LOG_RATIO_LIMIT = 20.0
"""Log-ratios are clamped to ±this before ``exp`` so that no ratio overflows."""


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi:
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, low variance)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(log_ratio) - log_ratio - 1.0


def aggregate_token_losses(
    token_losses: Tensor,
    response_mask: Tensor,
    agg_mode: AggMode = "token-mean",
    *,
    num_tokens_normalizer: float | Tensor | None = None,
    num_seqs_normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce ``[batch, seq]`` per-token losses to a scalar by ``agg_mode`` (formulas in the module doc)."""
    if agg_mode not in get_args(AggMode):
        raise ValueError(f"agg_mode must be one of {get_args(AggMode)}, got {agg_mode!r}")
    for name, value in (("num_tokens_normalizer", num_tokens_normalizer), ("num_seqs_normalizer", num_seqs_normalizer)):
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    valid = response_mask.bool()
    # where() rather than a product: a non-finite loss on a padding token must not leak into the sum.
    masked = torch.where(valid, token_losses, torch.zeros_like(token_losses))
    if agg_mode == "token-mean":
        denominator = num_tokens_normalizer if num_tokens_normalizer is not None else valid.sum().clamp(min=1)
        return masked.sum() / denominator

    tokens_per_seq = valid.sum(dim=-1)
    seq_losses = masked.sum(dim=-1)
    if agg_mode == "seq-mean-token-mean":
        seq_losses = seq_losses / tokens_per_seq.clamp(min=1)
    denominator = num_seqs_normalizer if num_seqs_normalizer is not None else (tokens_per_seq > 0).sum().clamp(min=1)
    return seq_losses.sum() / denominator


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    values = torch.where(valid, values.detach(), torch.zeros_like(values)).float()
    return values.sum() / valid.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_type: LossType = "grpo_clip",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip_c: float | None = None,
    agg_mode: AggMode = "token-mean",
    num_tokens_normalizer: float | Tensor | None = None,
    num_seqs_normalizer: float | Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar policy loss over ``[batch, seq]`` tokens and its detached metrics.

    ``advantages`` is ``[batch]`` (broadcast over tokens) or ``[batch, seq]``. ``ref_logprobs``
    is required when ``kl_coef > 0`` and ``entropy`` (per token) when ``entropy_coef != 0``.
    ``token_weights`` (``[batch, seq]``, no gradient) multiply each token's policy term, not the
    KL or entropy terms: the off-policy correction of ``rlsys.algorithms.off_policy``.
    """
    if loss_type not in get_args(LossType):
        raise ValueError(f"loss_type must be one of {get_args(LossType)}, got {loss_type!r}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must have the same [batch, seq] shape"
        )

    # Ratios and their exp lose too much in half precision; compute in at least float32.
    compute_dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logprobs = logprobs.to(compute_dtype)
    old_logprobs = old_logprobs.to(compute_dtype)
    advantages = advantages.to(compute_dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logprobs)
    valid = response_mask.bool()

    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    clipped_high = clipped_low = dual_clipped = torch.zeros_like(valid)
    if loss_type == "grpo_clip":
        unclipped_loss = -advantages * ratio
        clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        pg_losses = torch.maximum(unclipped_loss, clipped_loss)
        clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
        clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
        if dual_clip_c is not None:
            negative = advantages < 0
            pg_losses = torch.where(negative, torch.minimum(pg_losses, -advantages * dual_clip_c), pg_losses)
            dual_clipped = negative & (ratio > dual_clip_c)
    else:
        pg_losses = -advantages * logprobs

    token_losses = pg_losses
    if token_weights is not None:
        if token_weights.shape != logprobs.shape:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} must have the [batch, seq] shape "
                             f"{tuple(logprobs.shape)}")
        token_losses = token_losses * token_weights.detach().to(compute_dtype)
    kl_ref = None
    if ref_logprobs is not None:
        kl_ref = kl_k3(logprobs, ref_logprobs.to(compute_dtype))
        if kl_coef > 0.0:
            token_losses = token_losses + kl_coef * kl_ref
    if entropy is not None and entropy_coef != 0.0:
        token_losses = token_losses - entropy_coef * entropy.to(compute_dtype)

    loss = aggregate_token_losses(
        token_losses,
        response_mask,
        agg_mode,
        num_tokens_normalizer=num_tokens_normalizer,
        num_seqs_normalizer=num_seqs_normalizer,
    )

    with torch.no_grad():
        any_clip = (clipped_high | clipped_low | dual_clipped).to(compute_dtype)
        # Ratios are positive, so the clamp only turns the -inf of a batch without valid tokens into 0.
        valid_ratios = torch.where(valid, ratio, torch.full_like(ratio, float("-inf")))
        metrics = {
            "pg_loss": _masked_mean(pg_losses, valid),
            "clip_frac": _masked_mean(any_clip, valid),
            "clip_frac_high": _masked_mean(clipped_high.to(compute_dtype), valid),
            "clip_frac_low": _masked_mean(clipped_low.to(compute_dtype), valid),
            "dual_clip_frac": _masked_mean(dual_clipped.to(compute_dtype), valid),
            "approx_kl": _masked_mean(kl_k3(old_logprobs, logprobs), valid),
            "ratio_mean": _masked_mean(ratio, valid),
            "ratio_max": valid_ratios.max().clamp(min=0.0).float(),
            "num_valid_tokens": valid.sum().float(),
        }
        if kl_ref is not None:
            metrics["kl_ref"] = _masked_mean(kl_ref, valid)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, valid)
    return loss, metrics
