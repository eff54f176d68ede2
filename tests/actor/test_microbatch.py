"""Risks in cutting a rollout batch into minibatches, DP shares and token-budget microbatches.

A sequence lost, duplicated or reordered; a microbatch over its token budget; a response token
scored at the wrong position (an off-by-one in the label layout shifts every log-prob); unequal
microbatch counts across DP ranks (a hang in megatron's schedule); a malformed batch accepted.
Plain torch, no processes.
"""

from __future__ import annotations

import pytest
import torch

from rlsys.actor.microbatch import (
    RolloutBatch,
    build_microbatch,
    data_parallel_share,
    equalize_microbatch_count,
    minibatch_slices,
    pack_by_token_budget,
    plan_microbatches,
)


def _batch() -> RolloutBatch:
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    responses = [[11, 12], [13, 14, 15, 16], [], [17]]
    return RolloutBatch.build(
        prompts,
        responses,
        advantages=torch.tensor([1.0, -1.0, 0.5, 2.0]),
        old_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5, -0.6], [], [-0.7]],
        loss_mask=[[True, True], [True, True, False, False], [], [True]],
    )


def test_token_budget_packing_keeps_order_and_budget() -> None:
    lengths = [5, 7, 3, 12, 2, 2, 2, 9]
    groups = pack_by_token_budget(list(range(8)), lengths, max_tokens=16)
    assert [i for group in groups for i in group] == list(range(8))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 16 or len(group) == 1
    assert groups == [[0, 1], [2], [3], [4, 5, 6], [7]]
    # A sequence over the budget gets a microbatch of its own.
    assert pack_by_token_budget([0, 1, 2], [3, 40, 3], max_tokens=16) == [[0], [1], [2]]
    # Lengths round up to the multiple (sequence parallel) before the budget is applied.
    assert pack_by_token_budget([0, 1], [5, 5], max_tokens=12, length_multiple=4) == [[0], [1]]


def test_length_sorted_planning_pads_less_and_keeps_every_sequence_once() -> None:
    # Rollout-like lengths: short and long responses interleaved in batch order.
    lengths = [40, 8, 36, 6, 44, 10, 38, 7]
    batch = RolloutBatch.build([[1] * 4] * len(lengths), [[2] * (n - 4) for n in lengths])
    padded = lambda groups: sum(len(g) * max(lengths[i] for i in g) for g in groups)  # noqa: E731
    in_order = pack_by_token_budget(list(range(8)), lengths, max_tokens=96)
    planned = plan_microbatches(batch, list(range(8)), max_tokens=96)
    assert sorted(i for g in planned for i in g) == list(range(8))
    assert all(len(g) * max(lengths[i] for i in g) <= 96 for g in planned)
    assert padded(planned) < padded(in_order)
    assert planned == [[4, 0], [6, 2], [5, 1, 7, 3]]  # longest first, similar lengths together


def test_equalizing_splits_the_largest_before_adding_fillers() -> None:
    assert equalize_microbatch_count([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert equalize_microbatch_count([[0], [1]], 3) == [[0], [1], []]
    assert equalize_microbatch_count([], 2) == [[], []]
    with pytest.raises(ValueError):
        equalize_microbatch_count([[0], [1], [2]], 2)


def test_minibatches_and_dp_shares_partition_the_batch() -> None:
    slices = minibatch_slices(7, 3)
    assert slices == [[0, 1, 2], [3, 4], [5, 6]]
    for indices in slices:
        shares = [data_parallel_share(indices, rank, 2) for rank in range(2)]
        assert sorted(i for share in shares for i in share) == indices
    with pytest.raises(ValueError):
        minibatch_slices(2, 3)


def test_labels_and_per_token_values_sit_on_the_predicting_positions() -> None:
    batch = _batch()
    microbatch = build_microbatch(batch, [0, 1, 2, 3], length_multiple=4)
    assert microbatch.tokens.shape == (4, 8)  # longest 5 tokens, rounded up to 8
    for row, index in enumerate([0, 1, 2, 3]):
        prompt, response = batch.prompt_ids[index], batch.response_ids[index]
        sequence = torch.cat([prompt, response])
        assert torch.equal(microbatch.tokens[row, : sequence.numel()], sequence)
        assert torch.equal(microbatch.position_ids[row], torch.arange(8))
        start = prompt.numel() - 1
        # The label at position t is token t + 1: the response token each position predicts.
        assert torch.equal(microbatch.labels[row, start : start + response.numel()], response)
    expected_mask = torch.zeros(4, 8, dtype=torch.bool)
    expected_mask[0, 2:4] = True
    expected_mask[1, 0:2] = True  # the last two response tokens of sequence 1 are masked out
    expected_mask[3, 3] = True
    assert torch.equal(microbatch.loss_mask, expected_mask)
    assert microbatch.num_valid_tokens == 5
    # Per-token inputs come back unchanged through the same spans the outputs use.
    old = dict(microbatch.response_values(microbatch.old_logprobs))
    for index in range(4):
        assert torch.equal(old[index], batch.old_logprobs[index])
    advantages = dict(microbatch.response_values(microbatch.advantages))
    assert torch.equal(advantages[1], torch.full((4,), -1.0))


def test_filler_microbatch_has_no_valid_token() -> None:
    filler = build_microbatch(_batch(), [], length_multiple=2)
    assert filler.tokens.shape == (1, 2) and filler.spans == []
    assert filler.num_valid_tokens == 0
    assert filler.old_logprobs is not None and filler.advantages is not None and filler.ref_logprobs is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=[[]], response_ids=[[1]]), "prompt is empty"),
        (dict(prompt_ids=[[1]], response_ids=[[1], [2]]), "1 prompts but 2 responses"),
        (dict(prompt_ids=[[1]], response_ids=[[1, 2]], old_logprobs=[[0.0]]), r"old_logprobs\[0\]: 1 values"),
        (dict(prompt_ids=[[1], [2]], response_ids=[[1], [2]], advantages=[1.0]), "advantages: 1 values for 2"),
    ],
)
def test_malformed_batches_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RolloutBatch.build(**kwargs)
