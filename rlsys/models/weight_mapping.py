"""The one HF <-> Megatron weight mapping (names, layouts, TP/PP sharding).

Everything that moves weights between the two worlds calls this module: loading HF checkpoints
into the actor, exporting the actor to HF, the rollout weight sync and the ``rlsys convert`` CLI.
It is plain torch (no megatron, no transformers) so any process can import it.

Three layouts, and the functions between them:

    HF state dict  --hf_to_megatron_shard-->  one (TP rank, PP rank) shard  (names: stage-local)
    HF names       <------megatron_to_hf-----  full Megatron tensors         (names: global)
    full tensor    --shard_for_tp / merge_tp_shards-->  TP shards

"Full" means the layout a TP=1 model holds (``merge_tp_shards`` of all TP ranks' shards), so it
does not depend on the TP size the tensors came from. It still includes the vocabulary padding
(``architecture.padded_vocab_size``); conversion to HF drops the padded rows.

``LAYER_RULES`` and ``MODEL_RULES`` are the mapping: for every Megatron parameter, the HF tensors
it is made of, how they are laid out in it, and how TP splits it. Everything below derives from
them.

Megatron names are megatron-core's checkpoint (sharded state dict) names, the same for the
local and the Transformer Engine layer specs: the pre-attention and pre-MLP norms are
``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight`` (the
local spec's modules are called ``input_layernorm`` / ``pre_mlp_layernorm``;
``canonical_megatron_name`` translates a model's parameter names).

Layouts (what must stay true for logits to match HF):
- ``linear_qkv`` (weight and bias): rows interleaved per query group: for each KV head g, its
  ``heads_per_group`` query heads, then key head g, then value head g. TP splits the full
  interleaved tensor evenly on dim 0 (also when TP exceeds the number of KV heads: megatron's
  attention then gathers and re-slices).
- ``linear_fc1``: gate and up projections; each TP rank holds its chunk of gate followed by its
  chunk of up, so the full layout is ``[gate; up]`` and sharding splits each half separately.
- Column-parallel (``linear_qkv``, ``linear_fc1``, embedding, output layer) split dim 0;
  row-parallel (``linear_proj``, ``linear_fc2``) split dim 1; norms are replicated.
- Embedding and output layer rows are padded with zeros to the padded vocabulary.
- PP stage ``p`` holds layers ``layers_of_stage(num_layers, p, pp)`` renumbered from 0; the first
  stage holds the embedding, the last the final norm and the output layer. With tied
  embeddings and PP > 1 the last stage's ``output_layer.weight`` is megatron's copy of the
  embedding and is loaded from ``embed_tokens``; with PP = 1 it does not exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from rlsys.models.architecture import Architecture, architecture_of, layers_of_stage, padded_vocab_size

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"

QKV_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV_WEIGHT = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
ATTN_OUT = "self_attention.linear_proj.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"

HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_PREFIX = "model.layers.{layer}."

# The local layer spec's module names for the two norms, and their checkpoint names.
_LOCAL_SPEC_NORM_NAMES = {
    "input_layernorm.weight": QKV_NORM,
    "pre_mlp_layernorm.weight": MLP_NORM,
}


class Layout(Enum):
    """How the HF tensors of a rule form the full Megatron tensor."""

    SAME = "same"  # one HF tensor, unchanged
    QKV = "qkv"  # q, k, v rows interleaved per query group
    GATE_UP = "gate_up"  # gate rows, then up rows
    VOCAB = "vocab"  # one HF tensor, rows padded with zeros to the padded vocabulary


class TpSplit(Enum):
    """How a full tensor is divided over tensor-parallel ranks."""

    REPLICATED = "replicated"
    DIM0 = "dim0"
    DIM1 = "dim1"
    GATE_UP_DIM0 = "gate_up_dim0"  # each half split on dim 0; a rank holds its gate chunk, then its up chunk


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter: its HF source tensors, their layout in it, and its TP split."""

    hf_names: tuple[str, ...]
    layout: Layout
    tp_split: TpSplit


# THE mapping. Per-layer rules name HF tensors relative to ``model.layers.{i}.``.
LAYER_RULES: dict[str, Rule] = {
    QKV_NORM: Rule(("input_layernorm.weight",), Layout.SAME, TpSplit.REPLICATED),
    QKV_WEIGHT: Rule(
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Layout.QKV, TpSplit.DIM0
    ),
    QKV_BIAS: Rule(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), Layout.QKV, TpSplit.DIM0),
    ATTN_OUT: Rule(("self_attn.o_proj.weight",), Layout.SAME, TpSplit.DIM1),
    MLP_NORM: Rule(("post_attention_layernorm.weight",), Layout.SAME, TpSplit.REPLICATED),
    FC1: Rule(("mlp.gate_proj.weight", "mlp.up_proj.weight"), Layout.GATE_UP, TpSplit.GATE_UP_DIM0),
    FC2: Rule(("mlp.down_proj.weight",), Layout.SAME, TpSplit.DIM1),
}
MODEL_RULES: dict[str, Rule] = {
    EMBEDDING: Rule((HF_EMBEDDING,), Layout.VOCAB, TpSplit.DIM0),
    FINAL_NORM: Rule((HF_FINAL_NORM,), Layout.SAME, TpSplit.REPLICATED),
    # With tied embeddings the source is HF_EMBEDDING instead (see ``hf_names_of``).
    OUTPUT_LAYER: Rule((HF_LM_HEAD,), Layout.VOCAB, TpSplit.DIM0),
}


def layer_param_name(layer: int, suffix: str) -> str:
    return f"decoder.layers.{layer}.{suffix}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``(layer index, suffix)`` of a per-layer Megatron name, or None for model-level names."""
    match = _LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def canonical_megatron_name(param_name: str) -> str:
    """A Megatron model's parameter name as a checkpoint name (what this module speaks).

    Strips wrapper prefixes (``module.`` from DDP / Float16Module) and renames the local spec's
    norm modules; Transformer Engine spec names are already canonical.
    """
    while param_name.startswith("module."):
        param_name = param_name[len("module.") :]
    parts = split_layer_name(param_name)
    if parts is not None and parts[1] in _LOCAL_SPEC_NORM_NAMES:
        return layer_param_name(parts[0], _LOCAL_SPEC_NORM_NAMES[parts[1]])
    return param_name


def rule_of(name: str) -> Rule:
    """The rule of a Megatron name (local or global layer index: the rule is the same)."""
    parts = split_layer_name(name)
    rule = LAYER_RULES.get(parts[1]) if parts else MODEL_RULES.get(name)
    if rule is None:
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
    return rule


def tp_split_of(name: str) -> TpSplit:
    return rule_of(name).tp_split


def hf_names_of(name: str, arch: Architecture) -> tuple[str, ...]:
    """Full HF names of the tensors that make Megatron parameter ``name`` (global layer index)."""
    if name == OUTPUT_LAYER and arch.tied_embeddings:
        return (HF_EMBEDDING,)
    rule = rule_of(name)
    parts = split_layer_name(name)
    if parts is None:
        return rule.hf_names
    prefix = _HF_LAYER_PREFIX.format(layer=parts[0])
    return tuple(prefix + hf_name for hf_name in rule.hf_names)


# ---------------------------------------------------------------- TP split and merge


def shard_for_tp(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of a full tensor (an independent copy)."""
    split = tp_split_of(name)
    if split is TpSplit.REPLICATED:
        return full.clone()
    if split is TpSplit.DIM1:
        return torch.chunk(full, tp_size, dim=1)[tp_rank].clone()
    if split is TpSplit.DIM0:
        _check_divisible(name, full.shape[0], tp_size)
        return torch.chunk(full, tp_size, dim=0)[tp_rank].clone()
    gate, up = torch.chunk(full, 2, dim=0)
    _check_divisible(name, gate.shape[0], tp_size)
    return torch.cat([torch.chunk(gate, tp_size, dim=0)[tp_rank], torch.chunk(up, tp_size, dim=0)[tp_rank]])


def merge_tp_shards(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor from all TP ranks' shards, in rank order (inverse of ``shard_for_tp``)."""
    split = tp_split_of(name)
    if split is TpSplit.REPLICATED:
        return shards[0]
    if split is TpSplit.DIM1:
        return torch.cat(list(shards), dim=1)
    if split is TpSplit.DIM0:
        return torch.cat(list(shards), dim=0)
    halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
    return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)


def _check_divisible(name: str, rows: int, tp_size: int) -> None:
    if rows % tp_size:
        raise ValueError(f"{name}: {rows} rows do not split over {tp_size} TP ranks")


# ---------------------------------------------------------------- layouts


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Architecture) -> torch.Tensor:
    groups, per_group, head_dim = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    trailing = q.shape[1:]
    q = q.reshape(groups, per_group * head_dim, *trailing)
    k = k.reshape(groups, head_dim, *trailing)
    v = v.reshape(groups, head_dim, *trailing)
    return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)


def _split_qkv(qkv: torch.Tensor, arch: Architecture) -> list[torch.Tensor]:
    groups, per_group, head_dim = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    trailing = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * head_dim, *trailing)
    parts = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return [part.reshape(-1, *trailing).contiguous() for part in parts]


def _pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    padding = weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, padding], dim=0)


def _combine(layout: Layout, tensors: list[torch.Tensor], arch: Architecture, padded_vocab: int) -> torch.Tensor:
    if layout is Layout.SAME:
        return tensors[0]
    if layout is Layout.VOCAB:
        return _pad_vocab(tensors[0], padded_vocab)
    if layout is Layout.QKV:
        return _interleave_qkv(*tensors, arch)
    return torch.cat(tensors, dim=0)


def _separate(layout: Layout, full: torch.Tensor, arch: Architecture) -> list[torch.Tensor]:
    if layout is Layout.SAME:
        return [full]
    if layout is Layout.VOCAB:
        return [full[: arch.vocab_size]]
    if layout is Layout.QKV:
        return _split_qkv(full, arch)
    return list(torch.chunk(full, 2, dim=0))


# ---------------------------------------------------------------- HF -> Megatron shards


def full_megatron_tensor_from_hf(
    name: str, hf_state: Mapping[str, torch.Tensor], arch: Architecture, padded_vocab: int
) -> torch.Tensor:
    """The full (TP=1 layout) tensor for Megatron name ``name`` (global layer index)."""
    tensors = [hf_state[hf_name] for hf_name in hf_names_of(name, arch)]
    return _combine(rule_of(name).layout, tensors, arch, padded_vocab)


def stage_param_names(arch: Architecture, pp_rank: int, pp_size: int) -> list[str]:
    """Megatron names (stage-local layer indices) of the parameters of one PP stage, in model order."""
    names: list[str] = []
    if pp_rank == 0:
        names.append(EMBEDDING)
    layer_suffixes = [suffix for suffix in LAYER_RULES if suffix != QKV_BIAS or arch.qkv_bias]
    for local_layer in range(len(layers_of_stage(arch.num_layers, pp_rank, pp_size))):
        names.extend(layer_param_name(local_layer, suffix) for suffix in layer_suffixes)
    if pp_rank == pp_size - 1:
        names.append(FINAL_NORM)
        # Tied embeddings with PP = 1 compute logits with the embedding itself: no output layer.
        if not arch.tied_embeddings or pp_size > 1:
            names.append(OUTPUT_LAYER)
    return names


def to_global_name(local_name: str, pp_rank: int, pp_size: int, num_layers: int) -> str:
    """A stage-local Megatron name with its layer index made global."""
    parts = split_layer_name(local_name)
    if parts is None:
        return local_name
    first_layer = layers_of_stage(num_layers, pp_rank, pp_size).start
    return layer_param_name(first_layer + parts[0], parts[1])


def iter_megatron_shard(
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Any,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    vocab_pad_multiple: int = 128,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(stage-local Megatron name, shard)`` for every parameter of one (TP rank, PP rank) model.

    Reads only the HF tensors that stage needs, one parameter at a time, so ``hf_state`` may be
    a lazy view of safetensors files and peak memory stays near one full parameter.
    """
    arch = architecture_of(hf_config)
    padded_vocab = padded_vocab_size(arch.vocab_size, tp_size, vocab_pad_multiple)
    for local_name in stage_param_names(arch, pp_rank, pp_size):
        global_name = to_global_name(local_name, pp_rank, pp_size, arch.num_layers)
        full = full_megatron_tensor_from_hf(global_name, hf_state, arch, padded_vocab)
        yield local_name, shard_for_tp(local_name, full, tp_rank, tp_size)


def hf_to_megatron_shard(
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Any,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    vocab_pad_multiple: int = 128,
) -> dict[str, torch.Tensor]:
    """All parameters of one (TP rank, PP rank) model, keyed by stage-local Megatron name."""
    return dict(iter_megatron_shard(hf_state, hf_config, tp_rank, tp_size, pp_rank, pp_size, vocab_pad_multiple))


# ---------------------------------------------------------------- full Megatron -> HF


def hf_tensors_from_full_megatron(
    name: str, full: torch.Tensor, arch: Architecture
) -> list[tuple[str, torch.Tensor]]:
    """The HF ``(name, tensor)`` pairs one full Megatron tensor (global layer index) becomes.

    With tied embeddings the output layer is megatron's copy of the embedding and becomes
    nothing (HF checkpoints of tied models hold the embedding only).
    """
    if name == OUTPUT_LAYER and arch.tied_embeddings:
        return []
    return list(zip(hf_names_of(name, arch), _separate(rule_of(name).layout, full, arch), strict=True))


def megatron_to_hf(
    full_megatron_tensors: Iterable[tuple[str, torch.Tensor]], hf_config: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF ``(name, tensor)`` pairs from full Megatron tensors with global layer indices.

    One input tensor is converted as soon as it arrives and nothing is buffered, so a weight
    sync can bucket the output while the producer is still gathering later layers.
    """
    arch = architecture_of(hf_config)
    for name, full in full_megatron_tensors:
        yield from hf_tensors_from_full_megatron(name, full, arch)
