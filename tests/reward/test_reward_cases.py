"""The labelled cases in cases.jsonl, scored through the sandboxed pool exactly as in training."""

from __future__ import annotations

from collections import Counter

import pytest
from labelled_cases import load_cases

from rlsys.config import RewardConfig
from rlsys.reward.pool import STATUS_OK, STATUS_TOO_LONG, RewardPool

CASES = load_cases()
REQUIRED_CATEGORIES = {
    "integer", "fraction_decimal", "radical_pi", "percent", "units_text_degrees", "thousands", "interval",
    "set", "tuple", "matrix", "list_any_order", "equation_assignment", "scientific", "complex", "infinity",
    "aime_leading_zeros", "expression", "multiple_choice", "text_answer", "extraction", "hostile",
    "deepscaler_style", "multiple_references", "units_in_words", "trig_log_values", "complex_polar", "vector_tuple",
    "interval_complement", "chained_equation", "huge_cancelling_power", "equation_variable",
}
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def batch():
    with RewardPool(RewardConfig(timeout_s=TIMEOUT_S, num_workers=2)) as pool:
        return pool.score_batch([case.response for case in CASES], [case.reference for case in CASES])


def test_the_labelled_set_is_large_and_covers_every_category():
    counts = Counter(case.category for case in CASES)
    assert len(CASES) >= 300
    assert REQUIRED_CATEGORIES <= set(counts), REQUIRED_CATEGORIES - set(counts)
    negatives = sum(not case.expected for case in CASES)
    assert negatives >= 100, "needs plenty of close-but-wrong answers to measure false positives"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"line{case.line}-{case.category}" for case in CASES])
def test_labelled_case(batch, index):
    case = CASES[index]
    assert batch.correct[index] == case.expected, f"{case.label}: extracted {batch.extracted[index]!r}"
    expected_score = 5.0 if case.expected else -5.0
    assert batch.scores[index] == expected_score
    assert batch.statuses[index] in (STATUS_OK, STATUS_TOO_LONG)
    assert batch.durations_s[index] < TIMEOUT_S


def test_no_case_timed_out_or_crashed(batch):
    assert (batch.n_timeout, batch.n_crash) == (0, 0), batch.errors
