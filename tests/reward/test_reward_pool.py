"""The sandboxed pool: timeouts, crashes, memory limit, reward combination and term loading.

Failures that real model output cannot trigger on demand (a worker that dies, an extra term
that hangs inside C code) are produced by reward terms defined in this module; the pool imports
them by path in its workers exactly as it imports user terms.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import resource
import time

import pytest

from rlsys.config import ConfigError, RewardConfig, RewardTerm
from rlsys.reward.math import MAX_RESPONSE_CHARS
from rlsys.reward.pool import (
    STATUS_CRASH,
    STATUS_OK,
    STATUS_TIMEOUT,
    STATUS_TOO_LONG,
    RewardPool,
    score_batch,
)

THIS_MODULE = __name__
SLACK_S = 4.0
"""Allowance over the timeout for pebble to notice, kill the worker and report. A worker that
ignored SIGTERM would cost pebble's 3 s grace period before its SIGKILL and fail this."""


def sabotage_term(response: str, reference) -> float:
    """0.0 normally; misbehaves when the response asks for it with a marker word."""
    if "HANG_PYTHON" in response:
        time.sleep(120)
    if "HANG_C" in response:
        # Minutes inside one C call that never checks for signals, so a Python-level SIGTERM
        # handler could not run until it returned.
        return float(len(hashlib.pbkdf2_hmac("sha256", response.encode(), b"salt", 10**9)))
    if "EXIT" in response:
        os._exit(3)
    if "SEGFAULT" in response:
        ctypes.string_at(0)
    if "RAISE" in response:
        raise ValueError("term failed")
    if "ALLOCATE" in response:
        limit, _ = resource.getrlimit(resource.RLIMIT_AS)
        return float(len(bytearray(limit)))
    if "NAN" in response:
        return float("nan")
    return 0.0


def memory_limit_term(response: str, reference) -> float:
    """The worker's address-space limit in MiB."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    return limit / (1024 * 1024)


def length_term(response: str, reference) -> float:
    """Number of characters, to check weights and the arguments a term receives."""
    assert reference in ("4", ["4", "four"])
    return float(len(response))


def not_a_function():
    return 0.0


NOT_CALLABLE = 3


def sabotage_config(**overrides) -> RewardConfig:
    # 3 s: long enough that a good answer on a freshly restarted worker of a loaded 2-core
    # machine never times out, short enough to keep the hang tests quick.
    settings = dict(timeout_s=3.0, num_workers=2, extra=[RewardTerm(path=f"{THIS_MODULE}:sabotage_term", weight=1.0)])
    settings.update(overrides)
    return RewardConfig(**settings)


@pytest.fixture(scope="module")
def sabotage_pool():
    with RewardPool(sabotage_config()) as pool:
        # Start the workers so that timings below measure batches, not process start-up.
        pool.score_batch(["\\boxed{1}"] * pool.num_workers, ["1"] * pool.num_workers)
        yield pool


GOOD = ["The answer is \\boxed{4}.", "\\boxed{\\frac{1}{2}}", "So $\\boxed{x = 3}$."]
GOOD_REFERENCES = ["4", "0.5", "3"]


@pytest.mark.parametrize("marker", ["HANG_PYTHON", "HANG_C"])
def test_a_hanging_item_times_out_is_counted_and_the_rest_still_score(sabotage_pool, marker):
    started = time.monotonic()
    result = sabotage_pool.score_batch([f"{marker} \\boxed{{4}}", *GOOD], ["4", *GOOD_REFERENCES])
    elapsed = time.monotonic() - started
    assert elapsed < sabotage_pool.config.timeout_s + SLACK_S
    assert result.statuses == [STATUS_TIMEOUT, STATUS_OK, STATUS_OK, STATUS_OK]
    assert result.scores == [-5.0, 5.0, 5.0, 5.0]
    assert (result.n_timeout, result.n_crash) == (1, 0)
    assert result.correct == [False, True, True, True]


def test_several_hanging_items_do_not_stall_the_batch(sabotage_pool):
    responses = ["HANG_PYTHON \\boxed{4}"] * 3 + GOOD
    started = time.monotonic()
    result = sabotage_pool.score_batch(responses, ["4"] * 3 + GOOD_REFERENCES)
    elapsed = time.monotonic() - started
    # Three hangs on two workers take two rounds of the timeout.
    assert elapsed < 2 * sabotage_pool.config.timeout_s + SLACK_S
    assert result.n_timeout == 3
    assert result.scores[3:] == [5.0, 5.0, 5.0]


@pytest.mark.parametrize("marker", ["EXIT", "SEGFAULT", "RAISE", "NAN"])
def test_a_crashing_item_is_counted_and_the_rest_still_score(sabotage_pool, marker):
    result = sabotage_pool.score_batch([f"{marker} \\boxed{{4}}", *GOOD], ["4", *GOOD_REFERENCES])
    assert result.statuses == [STATUS_CRASH, STATUS_OK, STATUS_OK, STATUS_OK]
    assert result.scores == [-5.0, 5.0, 5.0, 5.0]
    assert (result.n_timeout, result.n_crash) == (0, 1)
    assert result.errors[0]


def test_the_pool_keeps_working_after_failures(sabotage_pool):
    sabotage_pool.score_batch(["EXIT \\boxed{1}", "HANG_PYTHON \\boxed{1}"], ["1", "1"])
    result = sabotage_pool.score_batch(GOOD * 5, GOOD_REFERENCES * 5)
    assert result.scores == [5.0] * 15
    assert result.statuses == [STATUS_OK] * 15


def test_memory_limit_is_applied_and_exceeding_it_is_a_counted_crash():
    config = RewardConfig(
        timeout_s=5.0,
        num_workers=1,
        memory_limit_mb=512,
        extra=[
            RewardTerm(path=f"{THIS_MODULE}:memory_limit_term", weight=1.0),
            RewardTerm(path=f"{THIS_MODULE}:sabotage_term", weight=1.0),
        ],
    )
    with RewardPool(config) as pool:
        result = pool.score_batch(["\\boxed{4}", "ALLOCATE \\boxed{4}", "\\boxed{4}"], ["4", "4", "4"])
    assert result.scores[0] == 5.0 + 512
    assert result.statuses[1] == STATUS_CRASH
    assert "MemoryError" in result.errors[1]
    assert result.n_crash == 1
    assert result.scores[1] == -5.0
    assert result.scores[2] == 5.0 + 512


def test_overlong_responses_are_refused_without_a_worker(sabotage_pool):
    result = sabotage_pool.score_batch(["9" * (MAX_RESPONSE_CHARS + 1) + "\\boxed{4}", "\\boxed{4}"], ["4", "4"])
    assert result.statuses == [STATUS_TOO_LONG, STATUS_OK]
    assert result.scores == [-5.0, 5.0]
    assert result.n_too_long == 1


def test_hostile_math_scores_wrong_within_the_timeout(sabotage_pool):
    hostile = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{(10^{10})!}", "\\boxed{" + "{" * 100000 + "}", "\\boxed{\x00\ud800}"]
    started = time.monotonic()
    result = sabotage_pool.score_batch(hostile, ["1"] * len(hostile))
    assert time.monotonic() - started < sabotage_pool.config.timeout_s + SLACK_S
    assert result.scores == [-5.0] * len(hostile)


def test_total_combines_math_format_and_weighted_terms():
    config = RewardConfig(
        timeout_s=5.0,
        num_workers=1,
        format_weight=0.5,
        extra=[RewardTerm(path=f"{THIS_MODULE}:length_term", weight=-0.01)],
    )
    formatted_right = "<think>2+2</think><answer>\\boxed{4}</answer>"
    formatted_wrong = "<think>2+3</think><answer>\\boxed{5}</answer>"
    unformatted_right = "so \\boxed{4}"
    with RewardPool(config) as pool:
        result = pool.score_batch(
            [formatted_right, formatted_wrong, unformatted_right], ["4", ["4", "four"], "4"]
        )
    assert result.statuses == [STATUS_OK] * 3
    assert result.scores[0] == pytest.approx(5.0 + 0.5 - 0.01 * len(formatted_right))
    assert result.scores[1] == pytest.approx(-5.0 + 0.5 - 0.01 * len(formatted_wrong))
    assert result.scores[2] == pytest.approx(5.0 + 0.0 - 0.01 * len(unformatted_right))
    assert result.correct == [True, False, True]
    assert result.extracted == ["4", "5", "4"]


def test_format_reward_is_off_at_weight_zero():
    result = score_batch(["<think>a</think><answer>\\boxed{4}</answer>"], ["4"], RewardConfig(num_workers=1))
    assert result.scores == [5.0]


@pytest.mark.parametrize(
    "path,message",
    [
        ("rlsys.no_such_module:score", "cannot import module 'rlsys.no_such_module'"),
        (f"{THIS_MODULE}:no_such_function", "has no attribute 'no_such_function'"),
        (f"{THIS_MODULE}:NOT_CALLABLE", "is not callable"),
        (f"{THIS_MODULE}:not_a_function", "must accept (response, reference)"),
        (f"{THIS_MODULE}:", "must look like 'package.module:function'"),
    ],
)
def test_a_bad_term_path_fails_at_pool_start_naming_the_field(path, message):
    config = RewardConfig(extra=[RewardTerm(path=f"{THIS_MODULE}:length_term"), RewardTerm(path=path)])
    with pytest.raises(ConfigError) as error:
        RewardPool(config)
    assert str(error.value).startswith("reward.extra[1].path: ")
    assert message in str(error.value)


def test_zero_workers_means_one_per_cpu():
    assert RewardPool(RewardConfig(num_workers=0)).num_workers == os.cpu_count()


def test_mismatched_lengths_are_a_caller_error(sabotage_pool):
    with pytest.raises(ValueError):
        sabotage_pool.score_batch(["\\boxed{1}"], [])


def test_an_empty_batch_returns_empty_lists(sabotage_pool):
    result = sabotage_pool.score_batch([], [])
    assert result.scores == [] and result.n_timeout == 0 and result.n_crash == 0
