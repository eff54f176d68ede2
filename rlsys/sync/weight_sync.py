"""Weight sync: the Megatron actor's weights, resharded to HF layout, streamed into a rollout engine.

Checked against megatron-core 0.16.1.

    report = sync_weights(model, hf_config, transport, bucket_bytes=config.bucket_bytes)

Every actor rank calls ``sync_weights`` (it is collective); only the sync source holds a
``transport`` (``rlsys.sync.transports``), every other rank passes ``None``.

Memory (what must stay true): the sync never holds the whole model. Peak extra memory on a rank
is ONE bucket (at most ``bucket_bytes``, or one tensor when that tensor alone is larger) plus the
tensor being gathered: its TP shards, the collective's gather buffer and their merge (up to three
copies of the largest full tensor, briefly) and, on a PP stage that does not own it, the full
tensor it receives. The transport may
add its own copy of one bucket (``ColocatedTransport`` into a CPU engine pickles it by value; on
GPU it sends IPC handles, no copy). Tests measure this on real syncs
(``tests/sync/test_sync_memory.py``).

Choices:
- Producer: ``rlsys.models.megatron_weights`` (TP all-gather per tensor, PP broadcast from the
  owning stage, HF names and layouts from ``rlsys.models.weight_mapping``), the same mapping
  ``rlsys convert`` uses. Tensors are consumed as they arrive and may alias live parameters; a
  transport is done with a bucket when ``send`` returns.
- Who does what. The sync source is global rank 0 of the default process group (under
  megatron's rank order: DP replica 0, TP rank 0, PP stage 0); it alone talks to the engine.
  The ranks of the source's model-parallel group (TP x PP of DP/CP replica 0) gather: every
  one of them takes part in the TP gathers and PP broadcasts, and converts and buckets the
  same stream, so all cut buckets at the same places. Ranks other than the source bucket
  ``meta`` tensors (sizes only, no memory). Other DP/CP replicas hold the same weights and skip
  the gather.
- Failures reach every rank, and nothing hangs. After ``begin`` and after each bucket, the
  gathering ranks all-reduce one flag "the source failed" and stop together at that bucket
  boundary (no rank is left inside a collective). At the end the source broadcasts the outcome
  to all ranks, and every rank raises ``WeightSyncError`` if it failed. Engine calls and waits
  time out in the transport (``SyncConfig.timeout_s``); the actor's process groups must have a
  longer timeout than that, since the other ranks wait in a collective while the source waits
  for the engine. An exception on a non-source rank (a bug, not an engine fault) propagates
  there as in any SPMD program.
- No overlap of gathering and sending: a bucket is sent before the next is gathered, which is
  what keeps one bucket in memory.
- Pass the bare ``GPTModel`` (not a DDP or Float16Module wrapper): the producer reads its
  parallel groups and config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from rlsys.config import SyncConfig
from rlsys.models.megatron_weights import iter_full_megatron_tensors, iter_hf_weights
from rlsys.models.weight_mapping import megatron_to_hf
from rlsys.sync.buckets import MIB, BucketStats, NamedTensors, iter_buckets, tensor_bytes
from rlsys.sync.transports import (
    COLOCATED,
    IN_PROCESS,
    TRANSPORTS,
    ColocatedTransport,
    DisaggregatedTransport,
    InProcessTransport,
    WeightSyncError,
    WeightTransport,
)

SYNC_SOURCE_RANK = 0
DEFAULT_BUCKET_MB = 512.0


@dataclass
class SyncReport:
    """One sync as the source saw it (the same object on every rank)."""

    transport: str
    bucket_bytes: int
    num_tensors: int
    num_buckets: int
    total_bytes: int
    largest_tensor_bytes: int
    max_bucket_bytes: int
    """The most bytes of tensors one bucket held (at most ``bucket_bytes`` unless one tensor is larger)."""
    oversized_tensors: int
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.total_bytes / self.seconds if self.seconds > 0 else 0.0

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        return {prefix + key: float(value) for key, value in asdict(self).items() if key != "transport"}


def is_sync_source() -> bool:
    """Whether this rank talks to the engine (global rank 0; see the top)."""
    return dist.get_rank() == SYNC_SOURCE_RANK


def make_transport(config: SyncConfig, engine: Any, *, weights_device: torch.device,
                   transport: str | None = None) -> WeightTransport:
    """The transport ``transport`` (default: the configured one) to ``engine``; build it on the sync
    source only. The runner resolves ``sync.transport=auto`` from the placement before calling this."""
    name = transport or config.transport
    if name not in TRANSPORTS:
        raise ValueError(f"sync.transport: one of {TRANSPORTS} here, got {name!r}")
    if name == COLOCATED:
        return ColocatedTransport(engine, timeout_s=config.timeout_s)
    if name == IN_PROCESS:
        return InProcessTransport(engine)
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if weights_device.type == "cuda" else "gloo"
    return DisaggregatedTransport(engine, backend=backend, master_address=config.master_address,
                                  master_port=config.master_port, group_name=config.group_name,
                                  timeout_s=config.timeout_s)


def iter_sync_buckets(model: GPTModel, hf_config: Any, bucket_bytes: int,
                      stats: BucketStats | None = None) -> Iterator[NamedTensors]:
    """The producer side of a sync on its own: HF-named buckets (collective over TP and PP)."""
    return iter_buckets(iter_hf_weights(model, hf_config), bucket_bytes, stats)


def sync_weights(model: GPTModel, hf_config: Any, transport: WeightTransport | None, *,
                 bucket_bytes: int = int(DEFAULT_BUCKET_MB * MIB)) -> SyncReport:
    """Send the actor's weights to the engine behind ``transport`` (collective over all ranks).

    Raises ``WeightSyncError`` on every rank if the sync failed (see the top for what happens).
    """
    source = is_sync_source()
    if source:
        if transport is None:
            raise ValueError("the sync source (global rank 0) needs a transport")
        _check_source_coordinates()
    started = time.perf_counter()
    stats = BucketStats()
    failure: tuple[str, BaseException] | None = None
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        failure = _gather_and_send(model, hf_config, transport if source else None, bucket_bytes, stats)
    report = SyncReport(
        transport=transport.name if transport is not None else "",
        bucket_bytes=bucket_bytes,
        num_tensors=stats.num_tensors,
        num_buckets=stats.num_buckets,
        total_bytes=stats.total_bytes,
        largest_tensor_bytes=stats.largest_tensor_bytes,
        max_bucket_bytes=stats.max_bucket_bytes,
        oversized_tensors=stats.oversized_tensors,
        seconds=time.perf_counter() - started,
    )
    outcome: list[Any] = [failure[0] if failure else None, report]
    dist.broadcast_object_list(outcome, src=SYNC_SOURCE_RANK)
    message, report = outcome
    if message is not None:
        if failure is not None:
            raise WeightSyncError(message) from failure[1]
        raise WeightSyncError(f"weight sync failed on the sync source (global rank {SYNC_SOURCE_RANK}): {message}")
    return report


def _gather_and_send(model: GPTModel, hf_config: Any, transport: WeightTransport | None, bucket_bytes: int,
                     stats: BucketStats) -> tuple[str, BaseException] | None:
    """The gathering ranks' part; returns the source's failure (phase message, exception) or None."""
    group = parallel_state.get_model_parallel_group()
    device = next(model.parameters()).device
    failure = _attempt(transport, "begin", lambda t: t.begin())
    if not _any_rank_failed(failure is not None, group, device):
        stream = iter_hf_weights(model, hf_config) if transport is not None else _sizes_only(model, hf_config)
        for index, bucket in enumerate(iter_buckets(stream, bucket_bytes, stats)):
            phase = f"bucket {index} ({len(bucket)} tensors, {sum(tensor_bytes(t) for _, t in bucket) / MIB:.1f} MiB)"
            failure = _attempt(transport, phase, lambda t: t.send(bucket))
            # Drop the bucket before the next one is gathered: the memory bound depends on it.
            del bucket
            if _any_rank_failed(failure is not None, group, device):
                break
    if transport is not None:
        if failure is None:
            return _attempt(transport, "finish", lambda t: t.finish())
        # Also after a failed begin: a begin that timed out may still open the session later.
        transport.abort()
    return failure


def _sizes_only(model: GPTModel, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's stream as ``meta`` tensors: same names, shapes, dtypes, and bucket cuts."""
    meta = ((name, tensor.to("meta")) for name, tensor in iter_full_megatron_tensors(model))
    return megatron_to_hf(meta, hf_config)


def _attempt(transport: WeightTransport | None, phase: str,
             step: Callable[[WeightTransport], None]) -> tuple[str, BaseException] | None:
    if transport is None:
        return None
    try:
        step(transport)
    except Exception as error:
        cause = str(error) if isinstance(error, WeightSyncError) else f"{type(error).__name__}: {error}"
        return f"weight sync into {transport.name} failed at {phase}: {cause}", error
    return None


def _any_rank_failed(failed_here: bool, group: Any, device: torch.device) -> bool:
    flag = torch.tensor([1 if failed_here else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _check_source_coordinates() -> None:
    coordinates = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
    if coordinates != (0, 0, 0):
        raise RuntimeError(
            f"global rank {SYNC_SOURCE_RANK} must be TP rank 0, PP stage 0 of DP replica 0 to be the sync "
            f"source; it is (tp, pp, dp) = {coordinates}: use megatron's default rank order"
        )
