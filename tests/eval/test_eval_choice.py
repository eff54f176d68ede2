"""Risk: a multiple-choice (GPQA-style) answer is misread, or scored differently from training.

Letter extraction is checked on written responses (boxed, "Answer: X", a final "(X)", none);
scoring goes through the real sandboxed pool: right letter, wrong letter, no letter, the
format reward kept on top of the letter check, and a pool failure (a reward term that hangs,
the one fault real text cannot cause on demand) counted as wrong.
"""

from __future__ import annotations

import pytest

from rlsys.config import RewardConfig, RewardTerm
from rlsys.data.dataset import Prompt
from rlsys.eval.benchmark import resolve_answer_type, score_samples
from rlsys.eval.choice import choice_correct, extract_choice, is_choice_benchmark, reference_letter
from rlsys.reward.format import format_score
from rlsys.reward.math import MAX_RESPONSE_CHARS
from rlsys.reward.pool import STATUS_TIMEOUT, STATUS_TOO_LONG, RewardPool
from rlsys.rollout.base import Sample


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The mass is largest for option C, so \\boxed{C}.", "C"),
        ("Therefore the answer is $\\boxed{(B)}$", "B"),
        ("\\boxed{\\text{D}}", "D"),
        ("\\boxed{(A) 4.5 eV}", "A"),
        ("Answer: C", "C"),
        ("**Answer:** (D)", "D"),
        ("I first thought A. After checking, the answer is B.", "B"),
        ("The correct answer is (J)", "J"),
        ("Both options fit, but on balance\n(C)", "C"),
        ("Comparing the energies...\nB", "B"),
        ("so the pick is option A.", "A"),
        # A box decides alone: a box without a letter is no letter, whatever the text says.
        ("Answer: B, since \\boxed{42}", None),
        ("\\boxed{A, B}", None),
        ("\\boxed{CO_2}", None),
        # Lower case, letters inside words, letters out of range, nothing at all.
        ("the answer is c", None),
        ("Answer: Carbon dioxide", None),
        ("The answer is (K)", None),
        ("I cannot decide between the options.", None),
        ("", None),
    ],
)
def test_extract_choice(response: str, letter: str | None) -> None:
    assert extract_choice(response) == letter


def test_references_and_auto_detection() -> None:
    assert [reference_letter(r) for r in ("C", " (D) ", "J", "K", "CD", "12", "c")] == ["C", "D", "J", None, None,
                                                                                      None, None]
    assert is_choice_benchmark([["A"], ["(B)"], ["C", "D"]])
    assert not is_choice_benchmark([["A"], ["12"]])
    assert not is_choice_benchmark([])
    assert choice_correct("\\boxed{B}", ["(B)"]) == (True, "B")
    assert choice_correct("\\boxed{A}", ["B", "C"]) == (False, "A")


def _prompt(index: int, answers: tuple[str, ...]) -> Prompt:
    return Prompt(index, f"question {index}", (1, 2, 3), answers, f"gpqa.jsonl:{index + 1}")


def _sample(prompt_index: int, text: str) -> Sample:
    return Sample(prompt_index, list(range(len(text.split()) + 1)), text, [], "stop")


def test_right_wrong_and_missing_letters_score_through_the_pool() -> None:
    prompts = [_prompt(0, ("C",)), _prompt(1, ("A",))]
    samples = [
        _sample(0, "Reasoning... so the answer is \\boxed{C}."),
        _sample(0, "Answer: B"),
        _sample(0, "I am not sure."),
        _sample(1, "The answer is (A)"),
    ]
    with RewardPool(RewardConfig(num_workers=1)) as pool:
        records = score_samples(samples, prompts, pool, "choice")
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert [r["reward"] for r in records] == [5.0, -5.0, -5.0, 5.0]
    assert [r["extracted_answer"] for r in records] == ["C", "B", None, "A"]
    assert [(r["prompt_id"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert records[0]["references"] == ["C"] and records[0]["location"] == "gpqa.jsonl:1"


def test_math_answer_type_would_miss_unboxed_letters() -> None:
    """Why choice exists: the training reward reads boxes only."""
    prompts = [_prompt(0, ("C",))]
    samples = [_sample(0, "Answer: C"), _sample(0, "\\boxed{C}")]
    with RewardPool(RewardConfig(num_workers=1)) as pool:
        math_records = score_samples(samples, prompts, pool, "math")
        choice_records = score_samples(samples, prompts, pool, "choice")
    assert [r["correct"] for r in math_records] == [False, True]
    assert [r["correct"] for r in choice_records] == [True, True]


def test_letter_check_replaces_only_the_exact_answer_part_of_the_reward() -> None:
    prompts = [_prompt(0, ("C",))]
    shaped = "<think>compare the options</think> <answer>Answer: C</answer>"
    unshaped = "Answer: D"
    config = RewardConfig(num_workers=1, format_weight=0.5)
    with RewardPool(config) as pool:
        records = score_samples([_sample(0, shaped), _sample(0, unshaped)], prompts, pool, "choice")
    assert format_score(shaped) == 1.0
    assert records[0]["reward"] == config.correct_score + 0.5 * format_score(shaped)
    assert records[1]["reward"] == config.wrong_score + 0.5 * format_score(unshaped)


def test_pool_failures_count_as_wrong_even_with_the_right_letter() -> None:
    prompts = [_prompt(0, ("C",))]
    too_long = "Answer: C " + "x" * MAX_RESPONSE_CHARS
    samples = [_sample(0, "HANG. Answer: C"), _sample(0, too_long), _sample(0, "Answer: C")]
    config = RewardConfig(num_workers=1, timeout_s=1.0, extra=[RewardTerm(path="tests.eval.faulty_terms:hang_term", weight=1.0)])
    with RewardPool(config) as pool:
        records = score_samples(samples, prompts, pool, "choice")
    assert [r["reward_status"] for r in records] == [STATUS_TIMEOUT, STATUS_TOO_LONG, "ok"]
    assert [r["correct"] for r in records] == [False, False, True]
    assert [r["reward"] for r in records] == [-5.0, -5.0, 5.0]
    assert records[0]["reward_error"]


def test_answer_type_resolution() -> None:
    letters = [_prompt(0, ("A",)), _prompt(1, ("(D)",))]
    mixed = [_prompt(0, ("A",)), _prompt(1, ("42",))]
    assert resolve_answer_type("auto", letters) == "choice"
    assert resolve_answer_type("auto", mixed) == "math"
    assert resolve_answer_type("math", letters) == "math"
    with pytest.raises(ValueError, match="gpqa.jsonl:2.*'42'"):
        resolve_answer_type("choice", mixed)
    with pytest.raises(ValueError, match="answer type"):
        resolve_answer_type("letters", letters)
