"""Risk: pass@k is biased, numerically unstable for large n, or averaged wrongly over problems.

Values are checked against hand computations and against the definition itself: the fraction
of all k-subsets of the n samples that contain a correct one, enumerated.
"""

from __future__ import annotations

import itertools
import math

import pytest

from rlsys.eval.metrics import check_ks, default_ks, mean_pass_at_k, pass_at_k


def test_one_correct_of_four_by_hand() -> None:
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == 0.5
    assert pass_at_k(4, 1, 4) == 1.0


def test_edges() -> None:
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong samples: every draw holds a correct one


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_equals_the_fraction_of_k_subsets_with_a_correct_sample(n: int) -> None:
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            expected = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15), (n, c, k)


def test_large_n_is_finite_and_matches_the_product_form() -> None:
    # C(1024, 512) has about 307 digits: a float ratio of binomials would overflow.
    for n, c, k in [(1024, 1, 1), (1024, 3, 512), (1024, 500, 16), (2048, 1, 1024)]:
        product = 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
        value = pass_at_k(n, c, k)
        assert math.isfinite(value) and 0.0 <= value <= 1.0
        assert value == pytest.approx(product, rel=1e-12)
    assert pass_at_k(1024, 1, 1) == 1 / 1024


def test_benchmark_value_is_the_mean_over_problems() -> None:
    counts = [1, 0, 4, 2]  # correct samples of four problems, n = 4 each
    for k in (1, 2, 4):
        expected = sum(pass_at_k(4, c, k) for c in counts) / 4
        assert mean_pass_at_k(counts, 4, k) == pytest.approx(expected)
    # By hand for k = 2: (0.5 + 0 + 1 + (1 - 1/6)) / 4.
    assert mean_pass_at_k(counts, 4, 2) == pytest.approx((0.5 + 0.0 + 1.0 + 5 / 6) / 4)
    # pass@1 is the mean accuracy.
    assert mean_pass_at_k(counts, 4, 1) == pytest.approx(sum(counts) / 16)


def test_bad_arguments_raise() -> None:
    for n, c, k in [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 4, 1)


def test_default_and_checked_ks() -> None:
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(10) == [1, 2, 4, 8, 10]
    assert check_ks([4, 1, 4, 2], 4) == [1, 2, 4]
    with pytest.raises(ValueError, match="pass@8"):
        check_ks([1, 8], 4)
