"""Per-token entropy from full-vocabulary logits, against closed-form values."""

import math

import pytest
import torch

from rlsys.algorithms import entropy_from_logits


def test_entropy_values_and_shape():
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [math.log(1.0), math.log(3.0), -math.inf, -math.inf]],
            [[7.0, 7.0, 7.0, 7.0], [0.0, -math.inf, -math.inf, -math.inf]],
        ]
    )
    # uniform over 4 -> ln 4 (also when shifted); probabilities (1/4, 3/4) -> -(1/4 ln 1/4 + 3/4 ln 3/4); one-hot -> 0.
    two_way = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (2, 2)
    assert entropy.flatten().tolist() == pytest.approx([math.log(4), two_way, math.log(4), 0.0], abs=1e-6)


def test_masked_vocabulary_keeps_value_and_gradient_finite():
    logits = torch.tensor([[1.0, 2.0, -math.inf]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    entropy.sum().backward()
    assert torch.isfinite(entropy).all()
    assert torch.isfinite(logits.grad).all()
    # dH/dz_v = -p_v (ln p_v + H), and 0 for the masked entry.
    probs = [math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))]
    h = -sum(p * math.log(p) for p in probs)
    expected_grad = [-p * (math.log(p) + h) for p in probs] + [0.0]
    assert logits.grad.flatten().tolist() == pytest.approx(expected_grad, abs=1e-6)


def test_bf16_logits_are_computed_in_float32():
    logits = torch.zeros(3, 8, dtype=torch.bfloat16)
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32
    assert entropy.tolist() == pytest.approx([math.log(8)] * 3, abs=1e-6)
