"""Seeded shuffling, epoch wrap-around and exact resumption of training batches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rlsys.config import DataConfig
from rlsys.data import EpochBatchSampler, PromptBatches, epoch_order, load_train_prompts


def test_epoch_order_is_a_pinned_permutation_of_seed_and_epoch():
    # Pinned values: the order must not change between library or Python versions, or resumed
    # runs would replay different prompts.
    assert epoch_order(10, seed=1, epoch=0) == [1, 8, 4, 2, 9, 6, 5, 7, 3, 0]
    assert epoch_order(10, seed=1, epoch=1) == [9, 1, 6, 0, 8, 3, 4, 7, 2, 5]
    assert epoch_order(10, seed=2, epoch=0) == [3, 2, 0, 7, 5, 9, 8, 1, 6, 4]
    assert sorted(epoch_order(1000, seed=7, epoch=3)) == list(range(1000))


def test_order_ignores_global_random_state():
    first = EpochBatchSampler(50, 8, seed=3)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    batches_a = [first.next_indices() for _ in range(10)]
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    second = EpochBatchSampler(50, 8, seed=3)
    assert [second.next_indices() for _ in range(10)] == batches_a


def test_batches_wrap_into_the_next_epoch_and_cover_each_epoch_once():
    sampler = EpochBatchSampler(10, 4, seed=1)
    stream = [index for _ in range(5) for index in sampler.next_indices()]
    assert stream == epoch_order(10, 1, 0) + epoch_order(10, 1, 1)
    assert sampler.state_dict() == {"epoch": 2, "offset": 0}

    sampler.next_indices()
    assert sampler.state_dict() == {"epoch": 2, "offset": 4}


def test_a_batch_larger_than_the_dataset_spans_epochs():
    sampler = EpochBatchSampler(3, 7, seed=5)
    assert sampler.next_indices() == epoch_order(3, 5, 0) + epoch_order(3, 5, 1) + epoch_order(3, 5, 2)[:1]
    assert sampler.state_dict() == {"epoch": 2, "offset": 1}


def test_without_shuffle_every_epoch_is_in_file_order():
    sampler = EpochBatchSampler(5, 3, shuffle=False)
    assert [sampler.next_indices() for _ in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 4, 5, 6, 7])
def test_resuming_in_a_fresh_sampler_replays_the_same_batches(stop_after):
    # 13 prompts in batches of 5: epoch boundaries fall inside batches 3, 6 and 8.
    uninterrupted = EpochBatchSampler(13, 5, seed=11)
    expected = [uninterrupted.next_indices() for _ in range(12)]

    first = EpochBatchSampler(13, 5, seed=11)
    for _ in range(stop_after):
        first.next_indices()
    state = first.state_dict()
    assert set(state) == {"epoch", "offset"}

    resumed = EpochBatchSampler(13, 5, seed=11)
    resumed.load_state_dict(dict(state))
    assert [resumed.next_indices() for _ in range(12 - stop_after)] == expected[stop_after:]


def test_state_that_does_not_fit_the_dataset_is_rejected():
    sampler = EpochBatchSampler(4, 2)
    with pytest.raises(ValueError, match="does not fit a dataset of 4 prompts"):
        sampler.load_state_dict({"epoch": 0, "offset": 4})
    with pytest.raises(ValueError, match="batch_size must be positive"):
        EpochBatchSampler(4, 0)
    with pytest.raises(ValueError, match="num_prompts must be positive"):
        EpochBatchSampler(0, 2)


def test_prompt_batches_resume_across_an_epoch_boundary(smollm2_tokenizer, write_jsonl, tmp_path):
    write_jsonl([{"prompt": f"{i} + {i}?", "solutions": [str(2 * i)]} for i in range(7)], name="train.jsonl")
    config = DataConfig(train_files=["train.jsonl"], val_files=[], seed=4)
    dataset = load_train_prompts(config, smollm2_tokenizer, base=tmp_path)

    uninterrupted = PromptBatches.from_config(dataset, 3, config)
    expected = [uninterrupted.next_batch() for _ in range(6)]

    first = PromptBatches.from_config(dataset, 3, config)
    first.next_batch()
    first.next_batch()
    state = first.state_dict()
    assert state == {"epoch": 0, "offset": 6}

    resumed = PromptBatches.from_config(dataset, 3, config)
    resumed.load_state_dict(state)
    batches = [resumed.next_batch() for _ in range(4)]
    assert batches == expected[2:]
    # Batch 3 holds the last prompt of epoch 0 and the first two of epoch 1.
    assert [p.index for p in batches[0]] == epoch_order(7, 4, 0)[6:] + epoch_order(7, 4, 1)[:2]
    assert resumed.epoch == 2
