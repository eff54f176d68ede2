"""Process group, megatron parallel state and seeds of one actor process.

Checked against megatron-core 0.16.1.

Choices:
- Launch: the caller starts one process per rank (torchrun, Ray, ``tests/dist.py``, or
  ``rlsys.actor.launch``). A default process group that already exists is used as is; otherwise
  it is created from the ``env://`` variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``), with NCCL when CUDA is available and gloo otherwise.
- Device: the backend decides. A gloo group runs megatron on the CPU, with every CPU workaround
  of ``rlsys.platform.megatron_cpu`` switched on even on a host with a GPU (so the CPU test suite
  means the same thing everywhere); an NCCL group runs on ``cuda:LOCAL_RANK``.
- Layout: megatron's ``initialize_model_parallel(tp, pp)``; DP is ``world / (tp * pp)``, in
  megatron's default rank order (TP fastest, then DP, then PP). Re-initialising with the same
  sizes is a no-op; with other sizes it raises (call ``destroy_parallel`` first).
- Seeds, as Megatron-LM: stage seed ``seed + 100 * pp_rank`` for python, torch (CPU and CUDA)
  and megatron's RNG tracker, which adds ``2718 + tp_rank`` for the tensor-parallel state. Data
  parallel replicas share seeds, so they build identical random weights.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from rlsys.platform.megatron_cpu import enable_cpu_megatron


@dataclass(frozen=True)
class ParallelLayout:
    """This process's place in the actor: sizes and ranks of each parallel dimension."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def runs_on_cpu() -> bool:
    """The actor in this process runs on the CPU (its default process group is gloo)."""
    return dist.get_backend() == "gloo"


def _init_process_group(backend: str | None, timeout_s: float) -> None:
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))


def seed_everything(seed: int) -> None:
    """Python, torch and megatron's tracker seeds of this stage (see module doc)."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available() and not runs_on_cpu():
        torch.cuda.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def initialize_parallel(
    tp: int, pp: int, *, seed: int, backend: str | None = None, timeout_s: float = 1800.0
) -> ParallelLayout:
    """Initialise the process group (if needed), megatron's parallel state and the seeds."""
    _init_process_group(backend, timeout_s)
    on_cpu = runs_on_cpu()
    if on_cpu:
        enable_cpu_megatron(force=True)
    world_size = dist.get_world_size()
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tp * pp = {tp} * {pp}")
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if current != (tp, pp):
            raise RuntimeError(f"megatron is initialised with (tp, pp) = {current}, not {(tp, pp)}")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)
    return ParallelLayout(
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device()),
    )


def destroy_parallel() -> None:
    """Tear down megatron's parallel state (the default process group stays)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
