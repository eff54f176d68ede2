"""Megatron distributed checkpoints: the actor's (model, optimizer, scheduler) and ``rlsys convert``'s.

Checked against megatron-core 0.16.1.

Directory layout: ``rlsys.actor.checkpoint_files`` (which needs no megatron).

Choices and what must stay true:
- Tensors go through megatron's sharded state dicts (``GPTModel.sharded_state_dict`` and the
  optimizer's; the DistributedOptimizer is saved in its ``fully_reshardable`` format, which
  stores each state tensor shaped like its parameter). So a checkpoint written at one (TP, PP, DP)
  loads at any other whose TP divides the padded vocabulary (``padded_vocab_size`` is the same
  for every TP that divides 128).
- Keys: ``model``, ``optimizer`` (optional), and plain python values under ``scheduler`` and
  ``actor_state`` (saved once by rank 0 in megatron's common file; every rank must pass equal
  values).
- Atomic: every rank writes into ``.<name>.partial`` beside the target; after a barrier rank 0
  adds the JSON and the HF side files and renames it into place (replacing an older checkpoint of
  the same name). A crash leaves the previous checkpoint, or none, never a torn one.
- Every rank of the default process group must call save and load (megatron's collectives use it).
- megatron 0.16 behaviours worked around here (each function says how): its default
  DistributedOptimizer format fails its own validation; without Transformer Engine or apex its
  DistributedOptimizer can neither save a fresh torch AdamW, nor load AdamW state in the
  ``fully_reshardable`` format, and on load it would share one ``step`` tensor between all
  parameters; its save starts a ``spawn`` multiprocessing manager per process (replaced here by
  an in-process queue). Save still forks short-lived writer processes, so ranks must not be
  daemonic processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async as megatron_filesystem_async
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from rlsys.actor.checkpoint_files import (
    FORMAT,
    FORMAT_VERSION,
    HF_FILES_DIR,
    METADATA_FILE,
    CheckpointError,
    copy_hf_side_files,
    read_metadata,
)

# megatron 0.16's default DistributedOptimizer format ("fully_sharded_model_space") fails its own
# ShardedTensor validation ("flattened_range is not supported"); "fully_reshardable" stores each
# state tensor shaped like its parameter (gathered over DP on save), so it reshards over TP / PP.
_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state(
    model: GPTModel, optimizer: MegatronOptimizer | None, *, is_loading: bool
) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model.sharded_state_dict(metadata=dict(_SHARDING_METADATA))}
    if optimizer is not None:
        _materialise_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata=dict(_SHARDING_METADATA)
        )
    return state


def _materialise_adam_state(optimizer: MegatronOptimizer) -> None:
    """Give every parameter torch AdamW's state (``step`` 0, zero moments) if it has none yet.

    Without Transformer Engine or apex, megatron 0.16 wraps torch's AdamW, which creates its state
    lazily at the first step, while ``DistributedOptimizer.state_dict`` asserts that every
    parameter's state holds a ``step`` (so a fresh optimizer can neither be saved nor loaded
    into). This state is exactly what AdamW's first step would create, so the next update is the
    same with or without it.
    """
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(member, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW | torch.optim.Adam):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
                    )


def _load_optimizer_state(optimizer: MegatronOptimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron 0.16 with torch's AdamW.

    ``DistributedOptimizer.load_state_dict`` first puts ``step`` into every parameter's AdamW
    state, then copies the ``fully_reshardable`` tensors into that state key by key and fails on
    ``step``, which the checkpoint keeps in the parameter groups instead. Here the two halves run
    separately, with ``step`` set aside while the tensors are copied. Upstream also hands ONE
    step tensor to every parameter, and AdamW increments each parameter's step in place, so the
    shared counter would advance once per parameter and every later bias correction would be
    wrong: each parameter gets its own copy. Only a single DistributedOptimizer over torch
    Adam/AdamW takes this path; everything else loads as usual.
    """
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    member = members[0]
    if (
        len(members) != 1
        or not isinstance(member, DistributedOptimizer)
        or not isinstance(member.optimizer, torch.optim.AdamW | torch.optim.Adam)
        or state.get("param_state_sharding_type") != "fully_reshardable"
    ):
        optimizer.load_state_dict(state)
        return
    state = dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    member.load_state_dict(state)
    steps = {param: param_state_of.pop("step") for param, param_state_of in member.optimizer.state.items()}
    try:
        member.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for param, step in steps.items():
            member.optimizer.state[param]["step"] = step.clone()


@contextlib.contextmanager
def _in_process_write_results() -> Iterator[None]:
    """Make megatron's synchronous torch_dist save collect its write results in this process.

    megatron 0.16 (``strategies.filesystem_async``) creates a process-wide results queue from a
    ``spawn`` multiprocessing manager on the first save: one more Python process per rank, which
    re-imports the launching script, may not be started from a daemonic process, and outlives a
    rank that is killed. A synchronous save puts and takes its results in the calling process,
    so an ordinary thread queue serves; the previous queue is put back afterwards.
    """
    previous = megatron_filesystem_async._results_queue
    megatron_filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        megatron_filesystem_async._results_queue = previous


def save_checkpoint(
    directory: str | Path,
    model: GPTModel,
    *,
    hf_config: Any,
    hf_side_files: str | Path | None = None,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
    actor_state: dict[str, Any] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint atomically (collective over the default process group)."""
    directory = Path(directory)
    partial = directory.parent / f".{directory.name}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()

    state = _sharded_state(model, optimizer, is_loading=False)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if actor_state is not None:
        state["actor_state"] = actor_state
    with _in_process_write_results():
        dist_checkpointing.save(state, str(partial))

    if rank == 0:
        side_files = partial / HF_FILES_DIR
        if hf_side_files is not None:
            copy_hf_side_files(hf_side_files, side_files)
        if not (side_files / "config.json").is_file():
            hf_config.save_pretrained(side_files)
        config = model.config
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tp": config.tensor_model_parallel_size,
            "pp": config.pipeline_model_parallel_size,
            "params_dtype": str(config.params_dtype).removeprefix("torch."),
            "padded_vocab_size": model.vocab_size,
            "contents": sorted(key for key in ("model", "optimizer", "scheduler", "actor_state") if key in state),
            **(extra_metadata or {}),
        }
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _fsync_tree(partial)
        if directory.exists():
            outdated = directory.parent / f".{directory.name}.outdated"
            shutil.rmtree(outdated, ignore_errors=True)
            os.replace(directory, outdated)
            os.replace(partial, directory)
            shutil.rmtree(outdated, ignore_errors=True)
        else:
            os.replace(partial, directory)
    dist.barrier()
    return directory


def load_checkpoint(
    directory: str | Path,
    model: GPTModel,
    *,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
) -> dict[str, Any]:
    """Load model (and optimizer / scheduler when given) from ``directory``; returns ``actor_state``."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    wanted = {"model"} | ({"optimizer"} if optimizer is not None else set()) | (
        {"scheduler"} if scheduler is not None else set()
    )
    missing = wanted - set(metadata["contents"])
    if missing:
        raise CheckpointError(f"{directory} holds {metadata['contents']}, not {sorted(missing)}")
    if metadata["padded_vocab_size"] != model.vocab_size:
        raise CheckpointError(
            f"{directory}: padded vocabulary {metadata['padded_vocab_size']} != the model's {model.vocab_size} "
            "(a TP size that does not divide the vocabulary padding multiple)"
        )
    state = _sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, str(directory))
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    return dict(loaded.get("actor_state") or {})


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(root, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
