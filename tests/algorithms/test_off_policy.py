"""Off-policy correction weights, checked against values computed by hand from log-ratios of
ln 2, ln 3, ln 0.25 and 0 (so every weight is an exact small number)."""

import math

import pytest
import torch

from rlsys.algorithms import importance_weights, policy_loss

LN2, LN3, LN_QUARTER = math.log(2.0), math.log(3.0), math.log(0.25)


def _case():
    # Row 0: log-ratios ln2, ln3, ln0.25 (ratios 2, 3, 0.25). Row 1: 0, ln2, then padding.
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -7.0]])
    proximal = behaviour + torch.tensor([[LN2, LN3, LN_QUARTER], [0.0, LN2, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return proximal, behaviour, mask


def test_token_tis_truncates_at_high():
    proximal, behaviour, mask = _case()
    weights, metrics = importance_weights(proximal, behaviour, mask, mode="tis", level="token", high=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 2.0, 0.25], [1.0, 2.0, 0.0]]))
    assert metrics["is_clipped_fraction"].item() == pytest.approx(1 / 5)  # only the 3 was cut
    assert metrics["is_weight_mean"].item() == pytest.approx((2 + 3 + 0.25 + 1 + 2) / 5)
    assert metrics["is_weight_max"].item() == pytest.approx(3.0)


def test_token_mis_masks_outside_the_band():
    proximal, behaviour, mask = _case()
    weights, metrics = importance_weights(proximal, behaviour, mask, mode="mis", level="token", low=0.5, high=2.0)
    # 2 and 1 are inside [0.5, 2] (bounds included); 3 and 0.25 are out.
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]]))
    assert metrics["is_clipped_fraction"].item() == pytest.approx(2 / 5)


def test_sequence_level_uses_the_product_of_token_ratios():
    proximal, behaviour, mask = _case()
    # Row 0: 2 * 3 * 0.25 = 1.5; row 1: 1 * 2 = 2 (the padding's log-ratio of 5 is ignored).
    weights, _ = importance_weights(proximal, behaviour, mask, mode="tis", level="sequence", high=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 1.5, 1.5], [2.0, 2.0, 0.0]]))
    masked, metrics = importance_weights(proximal, behaviour, mask, mode="mis", level="sequence", low=0.5, high=1.8)
    torch.testing.assert_close(masked, torch.tensor([[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]]))
    assert metrics["is_clipped_fraction"].item() == pytest.approx(2 / 5)


def test_geometric_level_uses_the_mean_log_ratio():
    proximal, behaviour, mask = _case()
    # Row 0: (2 * 3 * 0.25) ** (1/3) = 1.5 ** (1/3); row 1: 2 ** (1/2).
    weights, _ = importance_weights(proximal, behaviour, mask, mode="tis", level="geometric", high=2.0)
    row0, row1 = 1.5 ** (1 / 3), 2 ** 0.5
    torch.testing.assert_close(weights, torch.tensor([[row0] * 3, [row1, row1, 0.0]]))


def test_decoupled_ppo_is_token_level_truncation():
    proximal, behaviour, mask = _case()
    decoupled, _ = importance_weights(proximal, behaviour, mask, mode="decoupled_ppo", high=2.5)
    torch.testing.assert_close(decoupled, torch.tensor([[2.0, 2.5, 0.25], [1.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="token level"):
        importance_weights(proximal, behaviour, mask, mode="decoupled_ppo", level="sequence")


def test_bad_arguments_are_refused():
    proximal, behaviour, mask = _case()
    with pytest.raises(ValueError, match="low <= high"):
        importance_weights(proximal, behaviour, mask, mode="mis", low=2.0, high=0.5)
    with pytest.raises(ValueError, match="mode"):
        importance_weights(proximal, behaviour, mask, mode="is")
    with pytest.raises(ValueError, match="shapes"):
        importance_weights(proximal, behaviour[:, :2], mask, mode="tis")


def test_weights_scale_the_policy_term_of_the_loss():
    """The corrected token-mean loss, by hand: sum_t -A_t * ratio_t * w_t / N."""
    proximal, behaviour, mask = _case()
    logprobs = (proximal + torch.tensor([[0.1, 0.0, -0.1], [0.0, 0.05, 0.0]])).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0])
    weights, _ = importance_weights(proximal, behaviour, mask, mode="tis", high=2.0)
    loss, _ = policy_loss(logprobs, proximal, advantages, mask, clip_low=0.2, clip_high=0.2, token_weights=weights)
    ratio = torch.exp(torch.tensor([[0.1, 0.0, -0.1], [0.0, 0.05, 0.0]]))
    # Row 0 (A = +1): clipped at 1.2 from above only, none of 1.105, 1, 0.905 reach it.
    # Row 1 (A = -1): the pessimistic max keeps the unclipped -A * ratio for ratios above 0.8.
    expected = (-(ratio[0, 0] * 2.0 + ratio[0, 1] * 2.0 + ratio[0, 2] * 0.25)
                + (ratio[1, 0] * 1.0 + ratio[1, 1] * 2.0)) / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # d loss / d logp_t = -A_t * ratio_t * w_t / N where unclipped; padding gets no gradient.
    expected_grad = torch.tensor([[-ratio[0, 0] * 2.0, -ratio[0, 1] * 2.0, -ratio[0, 2] * 0.25],
                                  [ratio[1, 0], ratio[1, 1] * 2.0, 0.0]]) / 5
    torch.testing.assert_close(logprobs.grad, expected_grad)
    unweighted, _ = policy_loss(logprobs.detach(), proximal, advantages, mask, clip_low=0.2, clip_high=0.2)
    assert unweighted.item() != pytest.approx(loss.item())
