"""Policy losses, aggregation, KL/entropy terms and metrics, against values computed by hand."""

import math

import pytest
import torch

from rlsys.algorithms import aggregate_token_losses, kl_k3, policy_loss

CLIP_LOW = 0.2
CLIP_HIGH = 0.28


def tokens_with_ratios(ratios: list[float], old_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of (logprobs requiring grad, old_logprobs) whose exp-differences are ``ratios``."""
    old = torch.full((1, len(ratios)), math.log(old_prob), dtype=torch.float64)
    logprobs = (old + torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64)).requires_grad_()
    return logprobs, old


def clip_loss(logprobs, old, advantages, mask=None, **kwargs):
    mask = torch.ones_like(old) if mask is None else mask
    kwargs = {"loss_type": "grpo_clip", "clip_low": CLIP_LOW, "clip_high": CLIP_HIGH} | kwargs
    return policy_loss(logprobs, old, advantages, mask, **kwargs)


def test_clip_higher_with_positive_advantage():
    # A = +2. Ratio 1.25 lies in (1 + clip_low, 1 + clip_high] = (1.2, 1.28]: not clipped, loss -2 * 1.25.
    # Ratio 1.30 is above 1.28: clipped, loss -2 * 1.28 and no gradient.
    logprobs, old = tokens_with_ratios([1.25, 1.30])
    loss, metrics = clip_loss(logprobs, old, torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    loss.backward()
    assert loss.item() == pytest.approx((-2 * 1.25 + -2 * 1.28) / 2)
    # d(-A * ratio)/d logp = -A * ratio, divided by the 2 tokens of the token-mean.
    assert logprobs.grad.flatten().tolist() == pytest.approx([-2 * 1.25 / 2, 0.0])
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.5)
    assert metrics["clip_frac_low"].item() == 0.0


def test_symmetric_clip_does_clip_what_clip_higher_lets_through():
    logprobs, old = tokens_with_ratios([1.25])
    loss, metrics = clip_loss(logprobs, old, torch.tensor([2.0], dtype=torch.float64), clip_high=CLIP_LOW)
    loss.backward()
    assert loss.item() == pytest.approx(-2 * 1.2)
    assert logprobs.grad.tolist() == [[0.0]]
    assert metrics["clip_frac_high"].item() == 1.0


def test_clip_with_negative_advantage_binds_only_below_one_minus_clip_low():
    # A = -2, so the loss is 2 * max(ratio, clip(ratio)).
    # 0.75 < 1 - 0.2: clipped to 0.8 -> 1.6, no gradient.
    # 0.85: inside -> 1.7, gradient 2 * 0.85.
    # 1.30 > 1 + clip_high: the pessimistic max keeps the unclipped 2.6 -> gradient 2 * 1.3.
    logprobs, old = tokens_with_ratios([0.75, 0.85, 1.30])
    loss, metrics = clip_loss(logprobs, old, torch.tensor([-2.0], dtype=torch.float64))
    loss.backward()
    assert loss.item() == pytest.approx((1.6 + 1.7 + 2.6) / 3)
    assert logprobs.grad.flatten().tolist() == pytest.approx([0.0, 1.7 / 3, 2.6 / 3])
    assert metrics["clip_frac"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac_high"].item() == 0.0


def test_ratio_exactly_on_the_clip_bound_is_not_counted_as_clipped():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[1.0 + CLIP_HIGH]], dtype=torch.float64))
    ratio = torch.exp(logprobs - old).item()
    _, metrics = clip_loss(logprobs, old, torch.tensor([1.0], dtype=torch.float64), clip_high=ratio - 1.0)
    assert metrics["clip_frac"].item() == 0.0


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # Tokens (A, ratio): (-2, 4) -> min(2 * 4, 2 * c=3) = 6, no gradient;
    # (-2, 2.5) -> 5 < 6, gradient 2 * 2.5; (+2, 4) -> high clip -2 * 1.28, dual clip not involved.
    logprobs, old = tokens_with_ratios([4.0, 2.5, 4.0], old_prob=0.1)
    advantages = torch.tensor([[-2.0, -2.0, 2.0]], dtype=torch.float64)
    loss, metrics = clip_loss(logprobs, old, advantages, dual_clip_c=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((6.0 + 5.0 - 2 * 1.28) / 3)
    assert logprobs.grad.flatten().tolist() == pytest.approx([0.0, 5.0 / 3, 0.0])
    assert metrics["dual_clip_frac"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)

    without_dual, _ = clip_loss(logprobs.detach(), old, advantages)
    assert without_dual.item() == pytest.approx((8.0 + 5.0 - 2 * 1.28) / 3)


def test_dual_clip_constant_must_exceed_one():
    logprobs, old = tokens_with_ratios([1.0])
    with pytest.raises(ValueError, match="dual_clip_c"):
        clip_loss(logprobs, old, torch.tensor([1.0]), dual_clip_c=1.0)


def test_reinforce_with_baseline_is_minus_advantage_times_logprob_without_ratio():
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.4]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([1.5, -0.5], dtype=torch.float64)
    # Old log-probs far from the current ones: no ratio and no clip may enter this loss.
    old = logprobs.detach() - 3.0
    loss, metrics = policy_loss(logprobs, old, advantages, mask, loss_type="reinforce_with_baseline")
    loss.backward()
    expected = (-1.5 * math.log(0.5) - 1.5 * math.log(0.25) + 0.5 * math.log(0.2)) / 3
    assert loss.item() == pytest.approx(expected)
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1.5 / 3, -1.5 / 3, 0.5 / 3, 0.0])
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(math.exp(3.0))


def test_no_baseline_uses_the_raw_reward_as_advantage():
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.4]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(2, 2)
    raw_rewards = torch.tensor([5.0, -5.0], dtype=torch.float64)
    loss, _ = policy_loss(logprobs, logprobs.detach(), raw_rewards, mask, loss_type="no_baseline")
    loss.backward()
    expected = (-5 * math.log(0.5) - 5 * math.log(0.25) + 5 * math.log(0.2) + 5 * math.log(0.4)) / 4
    assert loss.item() == pytest.approx(expected)
    assert logprobs.grad.flatten().tolist() == pytest.approx([-5 / 4, -5 / 4, 5 / 4, 5 / 4])


def test_unknown_loss_type_and_agg_mode_are_rejected():
    logprobs, old = tokens_with_ratios([1.0])
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logprobs, old, torch.ones(1), torch.ones(1, 1), loss_type="ppo")
    with pytest.raises(ValueError, match="agg_mode"):
        policy_loss(logprobs, old, torch.ones(1), torch.ones(1, 1), agg_mode="sum")


INF = float("inf")
# Row 0: three valid tokens, row 1: one, row 2: padding only. Masked entries are inf on purpose.
TOKEN_LOSSES = torch.tensor([[1.0, 2.0, 3.0, INF], [4.0, INF, INF, INF], [INF, INF, INF, INF]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "agg_mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
        ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),
    ],
)
def test_aggregation_modes(agg_mode, expected):
    assert aggregate_token_losses(TOKEN_LOSSES, MASK, agg_mode).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "agg_mode, normalizers, expected",
    [
        ("token-mean", {"num_tokens_normalizer": 8, "num_seqs_normalizer": 100}, 10 / 8),
        ("seq-mean-token-mean", {"num_tokens_normalizer": 100, "num_seqs_normalizer": 4}, 6 / 4),
        ("seq-mean-token-sum", {"num_tokens_normalizer": 100, "num_seqs_normalizer": 4}, 10 / 4),
    ],
)
def test_explicit_normalizers_replace_the_local_counts(agg_mode, normalizers, expected):
    assert aggregate_token_losses(TOKEN_LOSSES, MASK, agg_mode, **normalizers).item() == pytest.approx(expected)


def test_aggregation_of_a_batch_without_valid_tokens_is_zero_with_a_graph():
    losses = torch.ones(2, 3, requires_grad=True)
    loss = aggregate_token_losses(losses, torch.zeros(2, 3), "token-mean")
    loss.backward()
    assert loss.item() == 0.0
    assert losses.grad.tolist() == [[0.0] * 3] * 2


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_microbatch_losses_with_global_normalizers_sum_to_the_full_batch_loss(agg_mode):
    generator = torch.Generator().manual_seed(0)
    batch, seq = 6, 7
    old = -torch.rand(batch, seq, generator=generator, dtype=torch.float64) * 3
    logprobs = (old + 0.4 * torch.randn(batch, seq, generator=generator, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 3, 6, 2, 5])
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    kwargs = {"loss_type": "grpo_clip", "clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "agg_mode": agg_mode}

    full_loss, _ = policy_loss(logprobs, old, advantages, mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full_loss, logprobs)

    normalizers = {"num_tokens_normalizer": int(mask.sum()), "num_seqs_normalizer": batch}
    microbatches = [slice(0, 2), slice(2, 6)]  # 8 and 16 tokens: unequal on purpose
    summed = sum(
        policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], **kwargs, **normalizers)[0]
        for rows in microbatches
    )
    (summed_grad,) = torch.autograd.grad(summed, logprobs)
    assert summed.item() == pytest.approx(full_loss.item(), rel=1e-12)
    assert torch.allclose(summed_grad, full_grad, rtol=1e-12, atol=0)

    # Averaging local losses instead is a different objective on these unequal microbatches.
    local_mean = sum(policy_loss(logprobs[r], old[r], advantages[r], mask[r], **kwargs)[0] for r in microbatches) / 2
    assert local_mean.item() != pytest.approx(full_loss.item(), rel=1e-6)


def test_kl_k3_values():
    # logp = ln 0.5, ref = ln 0.25: exp(ref - logp) - (ref - logp) - 1 = 0.5 - ln 0.5 - 1.
    logprobs = torch.log(torch.tensor([0.5, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.3]))
    assert kl_k3(logprobs, ref).tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0], abs=1e-7)


def test_kl_and_entropy_terms_enter_loss_and_gradient():
    # Two tokens, ratio 1, A = 1. Token 0 has ref prob 0.25 against 0.5; token 1 has ref = logp.
    kl_coef, entropy_coef = 0.1, 0.01
    logprobs = torch.log(torch.tensor([[0.5, 0.4]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.4]], dtype=torch.float64))
    entropy = torch.tensor([[2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(
        logprobs,
        logprobs.detach(),
        torch.tensor([1.0], dtype=torch.float64),
        torch.ones(1, 2),
        loss_type="grpo_clip",
        ref_logprobs=ref,
        kl_coef=kl_coef,
        entropy=entropy,
        entropy_coef=entropy_coef,
    )
    loss.backward()
    kl0 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx((-1 + kl_coef * kl0 - entropy_coef * 2.0 + -1 - entropy_coef * 1.0) / 2)
    # d k3 / d logp = 1 - exp(ref - logp): 1 - 0.5 on token 0, 0 on token 1.
    assert logprobs.grad.flatten().tolist() == pytest.approx([(-1 + kl_coef * 0.5) / 2, -1 / 2])
    assert entropy.grad.flatten().tolist() == pytest.approx([-entropy_coef / 2, -entropy_coef / 2])
    assert metrics["kl_ref"].item() == pytest.approx(kl0 / 2)
    assert metrics["entropy"].item() == pytest.approx(1.5)


def test_kl_coefficient_needs_reference_logprobs():
    logprobs, old = tokens_with_ratios([1.0])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, torch.ones(1), torch.ones(1, 1), kl_coef=0.1)


def test_ratio_and_approx_kl_metrics_ignore_padding():
    logprobs, old = tokens_with_ratios([1.25, 0.8, 50.0])
    mask = torch.tensor([[1, 1, 0]])
    _, metrics = clip_loss(logprobs, old, torch.tensor([1.0], dtype=torch.float64), mask=mask)
    # k3 of KL(old || new) per token: ratio - 1 - ln(ratio).
    expected_kl = ((0.25 - math.log(1.25)) + (-0.2 - math.log(0.8))) / 2
    assert metrics["approx_kl"].item() == pytest.approx(expected_kl)
    assert metrics["ratio_mean"].item() == pytest.approx((1.25 + 0.8) / 2)
    assert metrics["ratio_max"].item() == pytest.approx(1.25)
    assert metrics["num_valid_tokens"].item() == 2.0
