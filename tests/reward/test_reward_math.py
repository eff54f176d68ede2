"""In-process checks of extraction, normalisation and exact comparison (trusted inputs only)."""

from __future__ import annotations

import pytest

from rlsys.reward.math import (
    MAX_ANSWER_CHARS,
    MAX_RESPONSE_CHARS,
    answers_equal,
    clean_answer,
    compute_score,
    extract_boxed_answer,
    split_top_level,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 and more", "5"),
        ("\\boxed{3} then \\boxed{4", "3"),
        ("\\boxedx{3}", None),
        ("no box at all", None),
        ("\\boxed{}", None),
        ("\\boxed{   }", None),
    ],
)
def test_extracts_the_last_balanced_box(text, expected):
    assert extract_boxed_answer(text) == expected


def test_overlong_inputs_are_not_read():
    assert extract_boxed_answer("x" * (MAX_RESPONSE_CHARS + 1) + "\\boxed{1}") is None
    assert extract_boxed_answer("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}") is None


def test_score_scale_is_configurable():
    assert compute_score("\\boxed{4}", "4") == 5.0
    assert compute_score("\\boxed{5}", "4") == -5.0
    assert compute_score("\\boxed{4}", "4", correct_score=1.0, wrong_score=0.0) == 1.0
    assert compute_score("\\boxed{5}", "4", correct_score=1.0, wrong_score=0.0) == 0.0
    assert compute_score("no box: 4", "4") == -5.0


def test_any_reference_of_a_list_may_match():
    assert compute_score("\\boxed{\\sqrt{8}}", ["3", "2\\sqrt{2}"]) == 5.0
    assert compute_score("\\boxed{\\sqrt{8}}", ["3", "2\\sqrt{3}"]) == -5.0
    assert compute_score("\\boxed{3}", []) == -5.0


@pytest.mark.parametrize(
    "raw,text,percent",
    [
        ("1,000", "1000", False),
        ("1{,}000", "1000", False),
        ("1\\,000", "1000", False),
        ("1, 000", "1, 000", False),
        ("1,2", "1,2", False),
        ("12,34", "12,34", False),
        ("50\\%", "50", True),
        ("10\\text{ cm}^2", "10", False),
        ("\\$18.50", "18.50", False),
        ("45^{\\circ}", "45", False),
        ("\\dfrac{1}{2}.", "\\frac{1}{2}", False),
        ("\\left( 1, 2 \\right)", "( 1, 2 )", False),
    ],
)
def test_normalisation(raw, text, percent):
    cleaned = clean_answer(raw)
    assert (cleaned.text, cleaned.percent) == (text, percent)


def test_top_level_split_respects_every_bracket_kind():
    assert split_top_level("(1,2], \\{3,4\\}, f(5,6)", ",") == ["(1,2]", "\\{3,4\\}", "f(5,6)"]


@pytest.mark.parametrize(
    "answer,reference",
    [
        ("0.333333", "\\frac{1}{3}"),
        ("0.3333333333333333333333", "\\frac{1}{3}"),
        ("3.14", "\\pi"),
        ("3.14159265358979", "\\pi"),
        ("1.41421356", "\\sqrt{2}"),
        ("2.718281828", "e"),
        ("0.5", "50"),
        ("[1,2)", "(1,2)"),
        ("(1,2)", "\\{1,2\\}"),
        ("(2,1)", "(1,2)"),
        ("-7", "7"),
        ("8", "7"),
        ("1000001", "1000000"),
        ("x^2+y^2=25", "x^2+y^2=26"),
    ],
)
def test_close_answers_are_wrong(answer, reference):
    assert not answers_equal(answer, reference)


def test_decimals_compare_as_the_rational_they_spell():
    assert answers_equal("0.1", "\\frac{1}{10}")
    assert answers_equal("0.10000000000000000000001", "0.10000000000000000000001")
    assert not answers_equal("0.10000000000000000000001", "\\frac{1}{10}")


def test_huge_numbers_are_refused_before_evaluation():
    assert not answers_equal("9^{9^{9^{9}}}", "9^{9^{9^{8}}}")
    assert not answers_equal("(10^{10})!", "1")
    assert answers_equal("2^{100}", "1267650600228229401496703205376")
    assert answers_equal("9^{9^{9^{9}}}", "9^{9^{9^{9}}}"), "identical text needs no evaluation"


def test_scale_words_multiply_instead_of_being_dropped_as_units():
    assert answers_equal("5 \\text{ million}", "5000000")
    assert not answers_equal("5 \\text{ million}", "5")
    assert answers_equal("2 \\text{ dozen}", "24")


def test_digits_separated_by_a_space_are_not_a_product():
    assert not answers_equal("2 3", "6")
    assert answers_equal("2 \\cdot 3", "6")


def test_numeric_references_from_json_are_read_as_text():
    assert compute_score("\\boxed{72}", 72) == 5.0
    assert compute_score("\\boxed{0.5}", [0.5]) == 5.0
    assert compute_score("\\boxed{1}", True) == -5.0


@pytest.mark.parametrize("response", [None, 42, b"\\boxed{4}", "\\boxed{\ud800}", "\\boxed{\\frac{1}{0}}"])
def test_junk_scores_wrong_without_raising(response):
    assert compute_score(response, "4") == -5.0
