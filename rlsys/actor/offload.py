"""Moving the actor's device memory to the host and back, bit for bit.

Checked against megatron-core 0.16.1 and torch 2.13.0.

``MegatronActor.offload_to_host`` / ``reload_to_device`` use this while a colocated rollout engine
has the device (RLinf's offload_weight / offload_grad / offload_optimizer). Choices, and what must
stay true:
- The unit is a tensor's whole storage. It is copied into a host buffer, then resized to zero
  bytes: the device memory is freed while every tensor that views the storage stays valid (under
  megatron's DDP the parameters, ``main_grad`` and bucket tensors are views into contiguous
  ``param_data`` / ``grad_data`` buffers, and the fp32 DistributedOptimizer's main-weight shards
  are views into ``param_data`` too). Reloading resizes the storage back and copies the bytes in,
  so every view sees exactly the old values. Storages are deduplicated before anything is freed,
  so one behind many views moves once.
- Gradient buffers are freed without a copy and come back zeroed: every train step zeroes them
  before its backward, so their contents are dead between steps.
- Only storages on the actor's device move (torch Adam keeps its ``step`` counters on the host).
  Host buffers are pinned for CUDA storages and plain for CPU ones; on CPU the storages are still
  freed and rebuilt from the copies, so CPU runs exercise the same path.
- Copies are blocking: a storage is freed only after its bytes are on the host. After freeing,
  torch's CUDA caching allocator returns the blocks (``empty_cache``), so the engine can take them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class OffloadedStorage:
    """A freed device storage, its size, and its bytes on the host (None: come back zeroed)."""

    storage: torch.UntypedStorage
    nbytes: int
    host: Tensor | None


def _bytes_of(storage: torch.UntypedStorage) -> Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def offload_storages(kept: Iterable[Tensor], dropped: Iterable[Tensor], device: torch.device) -> list[OffloadedStorage]:
    """Free the ``device`` storages behind ``kept`` (copied to the host first) and ``dropped`` (not copied)."""
    moved: list[OffloadedStorage] = []
    seen: set[int] = set()
    for tensors, keep in ((kept, True), (dropped, False)):
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if tensor.device != device or storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            host = None
            if keep:
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=device.type == "cuda")
                host.copy_(_bytes_of(storage))
            moved.append(OffloadedStorage(storage, storage.nbytes(), host))
    for item in moved:
        item.storage.resize_(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return moved


def reload_storages(moved: list[OffloadedStorage]) -> None:
    """Give every storage of ``offload_storages`` its device memory and its bytes back."""
    for item in moved:
        item.storage.resize_(item.nbytes)
        if item.host is None:
            _bytes_of(item.storage).zero_()
        else:
            _bytes_of(item.storage).copy_(item.host)
