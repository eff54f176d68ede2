"""Move weights between HF checkpoints and a live, sharded Megatron ``GPTModel``.

All layout knowledge is in ``rlsys.models.weight_mapping``; this module only adds I/O and the
collectives that gather TP shards and PP stages. The export functions are the producer side of
the rollout weight sync and of ``rlsys convert``.

Choices:
- HF checkpoints are read from safetensors (``model.safetensors`` or a sharded
  ``model.safetensors.index.json``), lazily: each rank reads only the tensors of its stage, one
  parameter at a time.
- Loading is strict both ways: every model parameter gets a tensor and every mapped tensor
  lands in a parameter with exactly its shape; otherwise it raises naming the parameter.
- Export streams tensors in model order (embedding, layer 0, 1, ..., final norm, output layer).
  Tensors are gathered over TP with ``all_gather`` (replicated norms are not gathered: every TP
  rank holds the same values) and, in ``iter_full_megatron_tensors``, broadcast from their PP
  stage to every rank of the PP group. Yielded tensors may alias live parameters: a consumer
  that keeps them past the next optimizer step must copy them.
- With tied embeddings and PP > 1 the last stage's output layer is megatron's copy of the
  embedding; export skips it (HF has the embedding only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from safetensors import safe_open

from rlsys.models.weight_mapping import (
    OUTPUT_LAYER,
    TpSplit,
    canonical_megatron_name,
    iter_megatron_shard,
    megatron_to_hf,
    merge_tp_shards,
    to_global_name,
    tp_split_of,
)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class SafetensorsState(Mapping[str, torch.Tensor]):
    """Read-only, lazy view of an HF safetensors checkpoint: a tensor is read when asked for."""

    def __init__(self, hf_dir: str | Path) -> None:
        hf_dir = Path(hf_dir)
        index = hf_dir / SAFETENSORS_INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: hf_dir / file for name, file in weight_map.items()}
        elif (hf_dir / SAFETENSORS_FILE).is_file():
            with safe_open(hf_dir / SAFETENSORS_FILE, framework="pt") as handle:
                self._file_of = {name: hf_dir / SAFETENSORS_FILE for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _stage_coordinates(model: GPTModel) -> tuple[int, int, int, int]:
    """(tp_rank, tp_size, pp_rank, pp_size) of this model stage."""
    return model.tp_group.rank(), model.tp_group.size(), model.pp_group.rank(), model.pp_group.size()


def _load_hf_config(hf_dir: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir)


def load_hf_into_megatron(
    model: GPTModel,
    hf_dir: str | Path,
    hf_config: Any | None = None,
    vocab_pad_multiple: int = 128,
) -> None:
    """Copy this rank's shard of the HF checkpoint in ``hf_dir`` into ``model`` (strict)."""
    hf_config = hf_config if hf_config is not None else _load_hf_config(hf_dir)
    load_hf_state_into_megatron(model, SafetensorsState(hf_dir), hf_config, vocab_pad_multiple)


@torch.no_grad()
def load_hf_state_into_megatron(
    model: GPTModel, hf_state: Mapping[str, torch.Tensor], hf_config: Any, vocab_pad_multiple: int = 128
) -> None:
    """Copy this rank's shard of an HF state dict (or lazy view) into ``model`` (strict)."""
    tp_rank, tp_size, pp_rank, pp_size = _stage_coordinates(model)
    unfilled = {canonical_megatron_name(name): param for name, param in model.named_parameters()}
    for name, shard in iter_megatron_shard(hf_state, hf_config, tp_rank, tp_size, pp_rank, pp_size, vocab_pad_multiple):
        if name not in unfilled:
            raise KeyError(f"the mapping produced {name!r}, which the model does not have (or got twice)")
        param = unfilled.pop(name)
        if param.shape != shard.shape:
            raise ValueError(f"{name}: model shape {tuple(param.shape)}, mapped shape {tuple(shard.shape)}")
        param.copy_(shard)
    if unfilled:
        raise KeyError(f"model parameters the mapping did not fill: {sorted(unfilled)}")


def _exported_params(model: GPTModel) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():
        canonical = canonical_megatron_name(name)
        if canonical == OUTPUT_LAYER and model.share_embeddings_and_output_weights:
            continue
        yield canonical, param.detach()


def iter_stage_full_tensors(model: GPTModel) -> Iterator[tuple[str, torch.Tensor]]:
    """This PP stage's parameters as full (TP-merged) tensors with global layer indices.

    Collective over the stage's TP group: every TP rank of the stage must consume the iterator
    to the end, in step; each of them receives every full tensor.
    """
    tp_rank, tp_size, pp_rank, pp_size = _stage_coordinates(model)
    num_layers = model.config.num_layers
    for name, shard in _exported_params(model):
        global_name = to_global_name(name, pp_rank, pp_size, num_layers)
        if tp_size == 1 or tp_split_of(name) is TpSplit.REPLICATED:
            yield global_name, shard
            continue
        shard = shard.contiguous()
        shards = [torch.empty_like(shard) for _ in range(tp_size)]
        dist.all_gather(shards, shard, group=model.tp_group)
        yield global_name, merge_tp_shards(name, shards)


def iter_full_megatron_tensors(model: GPTModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the whole model, full and with global names, on every rank.

    Collective over the TP and PP groups: every rank of the model-parallel group must consume
    the iterator to the end. Stages are streamed in order; each tensor is broadcast from its
    stage as soon as it is gathered, so peak memory is one full tensor beyond the model.
    """
    pp_group = model.pp_group
    pp_rank, pp_size = pp_group.rank(), pp_group.size()
    if pp_size == 1:
        yield from iter_stage_full_tensors(model)
        return
    device = next(model.parameters()).device
    for stage in range(pp_size):
        own = iter_stage_full_tensors(model) if stage == pp_rank else None
        while True:
            item = next(own, None) if own is not None else None
            # The owner stage announces each tensor (None once it is done); the others follow.
            header: list[Any] = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(header, group=pp_group, group_src=stage)
            if header[0] is None:
                break
            name, shape, dtype = header[0]
            tensor = item[1].contiguous() if item is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, group=pp_group, group_src=stage)
            yield name, tensor


def iter_hf_weights(model: GPTModel, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole model as HF ``(name, tensor)`` pairs, streamed, on every model-parallel rank."""
    return megatron_to_hf(iter_full_megatron_tensors(model), hf_config)


def export_hf_state_dict(model: GPTModel, hf_config: Any) -> dict[str, torch.Tensor]:
    """The whole model as an HF state dict (independent copies), on every model-parallel rank."""
    return {name: tensor.clone() for name, tensor in iter_hf_weights(model, hf_config)}
