"""pass@k and avg@n over n samples per problem.

Choices:
- pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models
  Trained on Code"): for a problem with n samples of which c are correct,
  ``1 - C(n - c, k) / C(n, k)``, the probability that k samples drawn without replacement from
  the n include a correct one. It is computed with Python's exact integers: ``math.comb`` never
  overflows and ``int / int`` is correctly rounded, so neither the huge binomials (n = 1024 is
  common) nor their ratio lose precision. The paper's float product
  ``1 - prod(1 - k / i for i in n-c+1..n)`` is the same number up to rounding.
- A benchmark's pass@k is the mean of the per-problem values. avg@n is the mean correctness of
  all samples; with n samples for every problem it equals the mean pass@1.
- Default k values: the powers of two below n, and n itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples."""
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        # Every draw of k samples contains a correct one (C(n - c, k) is 0).
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k of a benchmark: the mean over problems, each with ``n`` samples."""
    if not correct_counts:
        raise ValueError("pass@k of a benchmark needs at least one problem")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n: e.g. [1, 2, 4, 8, 10] for n = 10."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def check_ks(ks: Iterable[int], n: int) -> list[int]:
    """Sorted distinct k values, each in [1, n]; a ValueError names the first one out of range."""
    checked = sorted(set(ks))
    if not checked:
        raise ValueError("at least one k is needed for pass@k")
    for k in checked:
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs 1 <= k <= n (n={n} samples per problem)")
    return checked
