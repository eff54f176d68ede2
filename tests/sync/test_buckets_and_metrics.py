"""Risks: buckets exceed their size or drop, reorder or duplicate tensors; the sync's config takes a
bad value; the log-prob mismatch metric is wrongly weighted or poisoned by padding; the greedy
comparison accepts an engine that departs from the actor.

Plain torch, one process. The bucket rule's effect on real syncs (memory, every rank cutting at
the same places) is tested in ``test_weight_sync.py`` and ``test_sync_memory.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlsys.rollout.base import Sample
from rlsys.sync.buckets import BucketStats, iter_buckets, tensor_bytes


def _named(sizes_in_floats: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.full((size,), float(i))) for i, size in enumerate(sizes_in_floats)]


def _bucket_sizes(buckets: list[list[tuple[str, torch.Tensor]]]) -> list[list[int]]:
    return [[tensor.numel() for _, tensor in bucket] for bucket in buckets]


def test_bucket_flushes_before_the_tensor_that_would_overflow_it() -> None:
    # 10 floats = 40 bytes per bucket.
    stats = BucketStats()
    buckets = list(iter_buckets(_named([4, 6, 1, 9, 10, 3]), bucket_bytes=40, stats=stats))
    assert _bucket_sizes(buckets) == [[4, 6], [1, 9], [10], [3]]
    assert stats.max_bucket_bytes == 40
    assert stats.num_buckets == 4 and stats.num_tensors == 6 and stats.total_bytes == 33 * 4
    assert stats.oversized_tensors == 0


def test_tensor_larger_than_the_bucket_goes_alone() -> None:
    stats = BucketStats()
    buckets = list(iter_buckets(_named([3, 25, 2, 2, 30]), bucket_bytes=40, stats=stats))
    assert _bucket_sizes(buckets) == [[3], [25], [2, 2], [30]]
    assert stats.oversized_tensors == 2
    assert stats.largest_tensor_bytes == 120 == stats.max_bucket_bytes


def test_buckets_keep_every_tensor_once_in_order() -> None:
    named = _named([7, 1, 12, 5, 5, 5, 40, 2])
    flat = [item for bucket in iter_buckets(named, bucket_bytes=64) for item in bucket]
    assert [name for name, _ in flat] == [name for name, _ in named]
    assert all(tensor is original for (_, tensor), (_, original) in zip(flat, named))


def test_meta_tensors_are_cut_where_real_ones_are() -> None:
    """Non-source ranks bucket meta tensors and must stop at the same bucket boundaries."""
    named = [(f"t{i}", torch.zeros(n, dtype=dtype)) for i, (n, dtype) in
             enumerate([(10, torch.float32), (30, torch.bfloat16), (7, torch.float32), (50, torch.bfloat16)])]
    meta = [(name, tensor.to("meta")) for name, tensor in named]
    assert tensor_bytes(meta[1][1]) == 60
    cuts = [[name for name, _ in bucket] for bucket in iter_buckets(named, bucket_bytes=100)]
    meta_cuts = [[name for name, _ in bucket] for bucket in iter_buckets(meta, bucket_bytes=100)]
    assert cuts == meta_cuts == [["t0", "t1"], ["t2"], ["t3"]]


def test_handed_out_bucket_is_not_kept_by_the_iterator() -> None:
    """The memory bound: once the caller drops a bucket, its tensors are freed before the next one
    is built."""
    import weakref

    stream = ((f"t{i}", torch.full((8,), float(i))) for i in range(3))  # nothing else holds them
    iterator = iter_buckets(stream, bucket_bytes=40)
    first = next(iterator)
    assert _bucket_sizes([first]) == [[8]]
    watched = weakref.ref(first[0][1])
    del first
    assert watched() is None
    assert _bucket_sizes([next(iterator)]) == [[8]]


def test_empty_stream_and_bad_size() -> None:
    assert list(iter_buckets([], bucket_bytes=10)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(_named([1]), bucket_bytes=0))


def test_sync_config_checks_fields() -> None:
    from rlsys.sync.weight_sync import SyncConfig

    assert SyncConfig().bucket_bytes == 512 * 2**20
    assert SyncConfig(bucket_mb=0.5).bucket_bytes == 2**19
    for field, value in [("bucket_mb", 0), ("transport", "ipc"), ("timeout_s", -1), ("backend", "mpi"),
                         ("master_port", 70000), ("group_name", ""), ("verify_greedy_tokens", -1)]:
        with pytest.raises(ValueError, match=rf"^sync\.{field}:"):
            SyncConfig(**{field: value})


def test_logprob_mismatch_is_token_weighted_and_ignores_masked_positions() -> None:
    from rlsys.sync.verify import logprob_mismatch

    rollout = torch.tensor([[-1.0, -2.0, -3.0, float("nan")], [-0.5, float("-inf"), 0.0, 0.0]])
    actor = torch.tensor([[-1.5, -2.0, -2.0, -1.0], [-0.25, -1.0, 7.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # |diffs| on the 4 selected tokens: 0.5, 0, 1, 0.25 -> 1.75 / 4 (a per-sequence mean would give
    # (1.5 / 3 + 0.25) / 2 = 0.375).
    value = logprob_mismatch(rollout, actor, mask)
    assert value.dim() == 0
    assert math.isclose(value.item(), 1.75 / 4)
    assert logprob_mismatch(rollout, actor, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch(rollout, actor[:, :3], mask)


def test_greedy_mismatch_accepts_only_the_actors_prefix() -> None:
    from rlsys.sync.verify import greedy_mismatch

    def sample(ids: list[int], reason: str) -> Sample:
        return Sample(prompt_index=0, response_ids=ids, response_text="", logprobs=[], finish_reason=reason)

    actor = [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert greedy_mismatch(actor, [sample([5, 6, 7, 8], "length"), sample([1, 2], "stop")]) is None
    assert "prompt 1, token 2" in greedy_mismatch(actor, [sample([5, 6, 7, 8], "length"),
                                                          sample([1, 2, 9, 4], "length")])
    assert "ended after 2 tokens" in greedy_mismatch(actor, [sample([5, 6], "length"), sample([1, 2, 3, 4], "length")])
    assert "5 tokens" in greedy_mismatch(actor, [sample([5, 6, 7, 8, 9], "length"), sample([1, 2, 3, 4], "length")])
    assert "1 engine samples for 2 prompts" in greedy_mismatch(actor, [sample([5, 6, 7, 8], "length")])
