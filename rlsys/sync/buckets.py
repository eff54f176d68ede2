"""Group a stream of named tensors into size-bounded buckets (plain torch, no collectives).

Rule (what must stay true, the weight sync's memory bound rests on it):
- A bucket is flushed when adding the next tensor would take it past ``bucket_bytes``; the
  tensor then starts the next bucket. A single tensor larger than ``bucket_bytes`` goes alone.
- So the tensors one bucket holds never add up to more than ``max(bucket_bytes, largest tensor)``.
  The iterator keeps no reference to a bucket it has handed out (only to the one tensor that did
  not fit, which opens the next bucket), so a caller that drops each bucket before asking for the
  next holds at most one bucket plus one tensor.
- Bucket boundaries depend only on the sequence of tensor sizes, so every rank that sees the same
  names, shapes and dtypes (real or ``meta`` tensors) cuts the stream at the same places; the
  weight sync relies on that to check for failures at the same points on every rank.

``BucketStats`` records what the accumulator held, so tests can check the rule on real syncs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

MIB = 1 << 20

NamedTensors = list[tuple[str, torch.Tensor]]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's elements (also for ``meta`` tensors, which have no storage)."""
    return tensor.numel() * tensor.element_size()


@dataclass
class BucketStats:
    """What ``iter_buckets`` handed out: counts and the most bytes one bucket held."""

    num_tensors: int = 0
    num_buckets: int = 0
    total_bytes: int = 0
    largest_tensor_bytes: int = 0
    max_bucket_bytes: int = 0
    """The most bytes of tensors the accumulator held at once (the largest bucket)."""
    oversized_tensors: int = 0
    """Tensors larger than the bucket size, each sent alone."""


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, stats: BucketStats | None = None
) -> Iterator[NamedTensors]:
    """Buckets of ``(name, tensor)`` in stream order, cut by the rule at the top of this file."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    stats = stats if stats is not None else BucketStats()
    bucket: NamedTensors = []
    held = 0
    for name, tensor in named_tensors:
        size = tensor_bytes(tensor)
        if bucket and held + size > bucket_bytes:
            yield _handed_out(bucket, held, stats)
            held = 0
        bucket.append((name, tensor))
        held += size
        stats.num_tensors += 1
        stats.total_bytes += size
        stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, size)
        if size > bucket_bytes:
            stats.oversized_tensors += 1
    if bucket:
        yield _handed_out(bucket, held, stats)


def _handed_out(bucket: NamedTensors, held: int, stats: BucketStats) -> NamedTensors:
    """A new list with the bucket's items; ``bucket`` is emptied in place, so the suspended
    generator no longer references the tensors while the caller sends them."""
    stats.num_buckets += 1
    stats.max_bucket_bytes = max(stats.max_bucket_bytes, held)
    ready = list(bucket)
    bucket.clear()
    return ready
