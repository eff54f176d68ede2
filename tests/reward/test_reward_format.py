"""Format reward: whole-response <think>...</think><answer>...</answer> shape."""

from __future__ import annotations

import pytest

from rlsys.reward.format import format_score

GOOD = [
    "<think>2 + 2 = 4</think><answer>\\boxed{4}</answer>",
    "<think>\nLet me think.\n</think>\n\n<answer>\n4\n</answer>\n",
    "  <think>a</think> <answer>b</answer>  ",
]
BAD = [
    ("no tags", "The answer is \\boxed{4}."),
    ("answer only", "<answer>4</answer>"),
    ("think only", "<think>hmm</think>"),
    ("text before think", "Sure! <think>a</think><answer>4</answer>"),
    ("text between blocks", "<think>a</think> so <answer>4</answer>"),
    ("text after answer", "<think>a</think><answer>4</answer> done"),
    ("answer before think", "<answer>4</answer><think>a</think>"),
    ("two think blocks", "<think>a</think><think>b</think><answer>4</answer>"),
    ("nested answer", "<think>a</think><answer><answer>4</answer></answer>"),
    ("unclosed think", "<think>a<answer>4</answer>"),
    ("empty answer", "<think>a</think><answer>  </answer>"),
    ("tag inside think", "<think>a <answer>x</answer></think><answer>4</answer>"),
]


@pytest.mark.parametrize("response", GOOD)
def test_well_formed_responses_score_one(response):
    assert format_score(response) == 1.0


@pytest.mark.parametrize("reason,response", BAD, ids=[reason for reason, _ in BAD])
def test_malformed_responses_score_zero(reason, response):
    assert format_score(response) == 0.0


def test_a_long_response_is_checked_in_linear_time():
    response = "<think>" + "x" * 5_000_000 + "</think><answer>4</answer>"
    assert format_score(response) == 1.0
    assert format_score(response.replace("<answer>", "")) == 0.0
