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
- Who does what. Each rank takes part as an ``EngineFeed`` says (the routes come from
  ``rlsys.cluster.routes``): the *lead* of an engine holds its transport and calls the engine;
  in a colocated engine with TP > 1 the engine's other feeding ranks serialise the same bucket
  on their own GPU and the lead gathers those payloads, one per engine TP rank, over the feed's
  process group before it sends them in one call. Without a feed, a rank that passes a
  ``transport`` is the lead of a one-rank feed. Every rank of every DP replica takes part in
  its replica's TP gathers and PP broadcasts and buckets the same stream, so all ranks cut
  buckets at the same places; ranks that feed nothing bucket ``meta`` tensors (sizes only, no
  memory).
- Failures reach every rank, and nothing hangs. After ``begin`` and after each bucket, all ranks
  all-reduce one flag "a lead failed" and stop together at that bucket boundary (no rank is
  left inside a collective). At the end every lead's outcome goes to all ranks, and every rank
  raises ``WeightSyncError`` if any failed. Engine calls and waits time out in the transport
  (``SyncConfig.timeout_s``); the actor's process groups must have a longer timeout than that,
  since the other ranks wait in a collective while a lead waits for its engine. An exception on
  a rank that is not a lead (a bug, not an engine fault) propagates there as in any SPMD program.
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
from megatron.core.models.gpt import GPTModel

from rlsys.config import SyncConfig
from rlsys.errors import one_line
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
    """Whether this rank is the source of a single-engine sync without routes (global rank 0)."""
    return dist.get_rank() == SYNC_SOURCE_RANK


@dataclass
class EngineFeed:
    """This rank's part in feeding one engine (see the top)."""

    transport: WeightTransport | None = None
    """The engine's transport, on the lead only."""
    group: Any = None
    """Process group of the engine's feeding ranks, when there are several (colocated, engine TP > 1);
    its rank order is the engine's TP rank order."""
    lead_rank: int = 0
    """Global rank of the lead (the gather's destination)."""

    @property
    def is_lead(self) -> bool:
        return self.transport is not None


def make_transport(config: SyncConfig, engine: Any, *, weights_device: torch.device,
                   transport: str | None = None, master_address: str | None = None) -> WeightTransport:
    """The transport ``transport`` (default: the configured one) to ``engine``; build it on the
    engine's lead only. The runner resolves ``sync.transport=auto`` from the placement, and
    ``sync.master_address=auto`` to the lead's node IP (``master_address``), before calling this."""
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
    address = master_address or config.master_address
    if address == "auto":
        address = "127.0.0.1"  # no route named the node: engine and source share this host
    return DisaggregatedTransport(engine, backend=backend, master_address=address,
                                  master_port=config.master_port, group_name=config.group_name,
                                  timeout_s=config.timeout_s)


def iter_sync_buckets(model: GPTModel, hf_config: Any, bucket_bytes: int,
                      stats: BucketStats | None = None) -> Iterator[NamedTensors]:
    """The producer side of a sync on its own: HF-named buckets (collective over TP and PP)."""
    return iter_buckets(iter_hf_weights(model, hf_config), bucket_bytes, stats)


def sync_weights(model: GPTModel, hf_config: Any, transport: WeightTransport | None = None, *,
                 feed: EngineFeed | None = None, bucket_bytes: int = int(DEFAULT_BUCKET_MB * MIB)) -> SyncReport:
    """Send the actor's weights to the engines (collective over all ranks).

    Pass either ``transport`` (the lead of a one-rank feed) or this rank's ``feed``; ranks that
    feed nothing pass neither. Raises ``WeightSyncError`` on every rank if any engine's sync
    failed (see the top for what happens).
    """
    if feed is None and transport is not None:
        feed = EngineFeed(transport, lead_rank=dist.get_rank())
    started = time.perf_counter()
    stats = BucketStats()
    failure = _gather_and_send(model, hf_config, feed, bucket_bytes, stats)
    lead = feed is not None and feed.is_lead
    mine = (failure[0] if failure else None, feed.transport.name if lead else None, time.perf_counter() - started)
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    names = [name for _, name, _ in outcomes if name is not None]
    if not names:
        raise WeightSyncError("weight sync: no rank holds a transport to an engine")
    report = SyncReport(
        transport=names[0] if len(names) == 1 else f"{len(names)} engines ({'; '.join(names)})",
        bucket_bytes=bucket_bytes,
        num_tensors=stats.num_tensors,
        num_buckets=stats.num_buckets,
        total_bytes=stats.total_bytes,
        largest_tensor_bytes=stats.largest_tensor_bytes,
        max_bucket_bytes=stats.max_bucket_bytes,
        oversized_tensors=stats.oversized_tensors,
        seconds=max(seconds for _, _, seconds in outcomes),
    )
    failed = [(rank, message) for rank, (message, _, _) in enumerate(outcomes) if message is not None]
    if failed:
        if failure is not None:
            raise WeightSyncError(failure[0]) from failure[1]
        rank, message = failed[0]
        raise WeightSyncError(f"weight sync failed on global rank {rank}: {message}")
    return report


def _gather_and_send(model: GPTModel, hf_config: Any, feed: EngineFeed | None, bucket_bytes: int,
                     stats: BucketStats) -> tuple[str, BaseException] | None:
    """Every rank's part; returns this lead's failure (phase message, exception) or None."""
    device = next(model.parameters()).device
    transport = feed.transport if feed is not None else None
    failure = _attempt(transport, "begin", lambda t: t.begin())
    if not _any_rank_failed(failure is not None, device):
        stream = iter_hf_weights(model, hf_config) if feed is not None else _sizes_only(model, hf_config)
        for index, bucket in enumerate(iter_buckets(stream, bucket_bytes, stats)):
            phase = f"bucket {index} ({len(bucket)} tensors, {sum(tensor_bytes(t) for _, t in bucket) / MIB:.1f} MiB)"
            if feed is not None:
                failure = _feed(feed, bucket, phase)
            failed = _any_rank_failed(failure is not None, device)
            # Drop the bucket before the next one is gathered: the memory bound depends on it. (Only
            # now: the lead's engine may read a follower's tensors until the lead's send returned.)
            del bucket
            if failed:
                break
    if transport is not None:
        if failure is None:
            return _attempt(transport, "finish", lambda t: t.finish())
        # Also after a failed begin: a begin that timed out may still open the session later.
        transport.abort()
    return failure


def _feed(feed: EngineFeed, bucket: NamedTensors, phase: str) -> tuple[str, BaseException] | None:
    """One bucket into the engine: sent by the lead alone, or gathered from every feeding rank first."""
    if feed.group is None:
        return _attempt(feed.transport, phase, lambda t: t.send(bucket))
    from rlsys.rollout.sglang_engine import serialize_named_tensors

    payloads: list[Any] | None = [None] * dist.get_world_size(feed.group) if feed.is_lead else None
    dist.gather_object(serialize_named_tensors(bucket), payloads, dst=feed.lead_rank, group=feed.group)
    return _attempt(feed.transport, phase, lambda t: t.send_serialized(payloads))


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
        cause = str(error) if isinstance(error, WeightSyncError) else one_line(error)
        return f"weight sync into {transport.name} failed at {phase}: {cause}", error
    return None


def _any_rank_failed(failed_here: bool, device: torch.device) -> bool:
    flag = torch.tensor([1 if failed_here else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
