"""Risks in the HF <-> Megatron mapping that show without starting megatron.

- q/k/v rows land in the wrong order inside ``linear_qkv`` or gate/up inside ``linear_fc1``
  (checked on labelled rows, so a failure names the misplaced row);
- a TP split and its merge are not inverse (for every split kind and TP size);
- the round trip HF -> (TP, PP) shards -> full -> HF loses or changes a tensor;
- vocabulary padding depends on TP (checkpoints would not reshard) or does not divide by TP;
- an HF config with a feature we do not implement is accepted instead of refused.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlsys.models.architecture import UnsupportedModelError, architecture_of, layers_of_stage, padded_vocab_size
from rlsys.models.weight_mapping import (
    EMBEDDING,
    FC1,
    OUTPUT_LAYER,
    QKV_BIAS,
    QKV_WEIGHT,
    canonical_megatron_name,
    hf_to_megatron_shard,
    layer_param_name,
    megatron_to_hf,
    merge_tp_shards,
    shard_for_tp,
    to_global_name,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 8, 4, 2, 2, 6, 4, 13


def _config(**changes: Any) -> SimpleNamespace:
    settings: dict[str, Any] = dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
        max_position_embeddings=32,
        hidden_act="silu",
    )
    settings.update(changes)
    return SimpleNamespace(**settings)


def _random_hf_state(config: SimpleNamespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    state = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = rand(VOCAB, HIDDEN)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = rand(HIDDEN)
        state[prefix + "post_attention_layernorm.weight"] = rand(HIDDEN)
        state[prefix + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        state[prefix + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        state[prefix + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        if config.model_type == "qwen2":
            state[prefix + "self_attn.q_proj.bias"] = rand(HEADS * HEAD_DIM)
            state[prefix + "self_attn.k_proj.bias"] = rand(KV_HEADS * HEAD_DIM)
            state[prefix + "self_attn.v_proj.bias"] = rand(KV_HEADS * HEAD_DIM)
        state[prefix + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        state[prefix + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        state[prefix + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        state[prefix + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
    return state


def _labelled_rows(count: int, first_label: int) -> torch.Tensor:
    """A [count, HIDDEN] tensor whose row i is filled with the label first_label + i."""
    labels = torch.arange(first_label, first_label + count, dtype=torch.float32)
    return labels.unsqueeze(1).expand(count, HIDDEN).clone()


def test_qkv_rows_interleave_per_query_group_and_fc1_holds_gate_then_up_per_rank() -> None:
    config = _config()
    state = _random_hf_state(config)
    # Labels: q rows 100.., k rows 200.., v rows 300..; gate 400.., up 500..
    state["model.layers.0.self_attn.q_proj.weight"] = _labelled_rows(HEADS * HEAD_DIM, 100)
    state["model.layers.0.self_attn.k_proj.weight"] = _labelled_rows(KV_HEADS * HEAD_DIM, 200)
    state["model.layers.0.self_attn.v_proj.weight"] = _labelled_rows(KV_HEADS * HEAD_DIM, 300)
    state["model.layers.0.mlp.gate_proj.weight"] = _labelled_rows(FFN, 400)
    state["model.layers.0.mlp.up_proj.weight"] = _labelled_rows(FFN, 500)

    full = hf_to_megatron_shard(state, config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    qkv_labels = full[layer_param_name(0, QKV_WEIGHT)][:, 0].int().tolist()
    # 2 groups of (2 query heads, 1 key head, 1 value head), 2 rows per head.
    assert qkv_labels == [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]

    rank1 = hf_to_megatron_shard(state, config, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1)
    assert rank1[layer_param_name(0, QKV_WEIGHT)][:, 0].int().tolist() == [104, 105, 106, 107, 202, 203, 302, 303]
    assert rank1[layer_param_name(0, FC1)][:, 0].int().tolist() == [403, 404, 405, 503, 504, 505]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize(
    "name, shape",
    [
        (EMBEDDING, (16, 3)),
        (layer_param_name(0, QKV_WEIGHT), (8, 3)),
        (layer_param_name(0, QKV_BIAS), (8,)),
        (layer_param_name(1, "self_attention.linear_proj.weight"), (3, 8)),
        (layer_param_name(2, FC1), (16, 3)),
        (layer_param_name(3, "mlp.linear_fc2.weight"), (3, 8)),
        (layer_param_name(0, "mlp.linear_fc1.layer_norm_weight"), (3,)),
    ],
)
def test_tp_merge_inverts_tp_split(name: str, shape: tuple[int, ...], tp_size: int) -> None:
    full = torch.randn(*shape)
    shards = [shard_for_tp(name, full, rank, tp_size) for rank in range(tp_size)]
    assert torch.equal(merge_tp_shards(name, shards), full)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_hf_to_sharded_megatron_and_back_is_bitwise(model_type: str, tied: bool) -> None:
    config = _config(model_type=model_type, tie_word_embeddings=tied)
    hf_state = _random_hf_state(config)
    tp_size, pp_size = 2, 2
    shards = [
        [hf_to_megatron_shard(hf_state, config, tp, tp_size, pp, pp_size) for tp in range(tp_size)]
        for pp in range(pp_size)
    ]
    full: list[tuple[str, torch.Tensor]] = []
    for pp, stage in enumerate(shards):
        for name in stage[0]:
            merged = merge_tp_shards(name, [shard[name] for shard in stage])
            if name == OUTPUT_LAYER and tied:
                # megatron's copy of the embedding on the last stage: it must equal the embedding.
                assert torch.equal(merged, merge_tp_shards(EMBEDDING, [shard[EMBEDDING] for shard in shards[0]]))
                continue
            full.append((to_global_name(name, pp, pp_size, LAYERS), merged))
    back = dict(megatron_to_hf(iter(full), config))
    assert sorted(back) == sorted(hf_state)
    assert [name for name in hf_state if not torch.equal(back[name], hf_state[name])] == []


def test_output_layer_exists_only_where_megatron_has_one() -> None:
    tied = _config(tie_word_embeddings=True)
    state = _random_hf_state(tied)
    assert OUTPUT_LAYER not in hf_to_megatron_shard(state, tied, 0, 1, 0, 1)
    assert OUTPUT_LAYER in hf_to_megatron_shard(state, tied, 0, 1, 1, 2)
    assert EMBEDDING not in hf_to_megatron_shard(state, tied, 0, 1, 1, 2)


def test_local_spec_norm_names_and_wrapper_prefixes_become_checkpoint_names() -> None:
    assert (
        canonical_megatron_name("module.module.decoder.layers.3.input_layernorm.weight")
        == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    )
    assert (
        canonical_megatron_name("decoder.layers.0.pre_mlp_layernorm.weight")
        == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    )
    assert canonical_megatron_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"


def test_padded_vocab_is_the_same_for_every_tp_size_dividing_the_multiple() -> None:
    for vocab in (301, 151_665, 151_936, 49_152):
        sizes = {padded_vocab_size(vocab, tp) for tp in (1, 2, 4, 8)}
        assert len(sizes) == 1
        padded = sizes.pop()
        assert padded >= vocab and padded % 128 == 0 and padded - vocab < 128
    assert padded_vocab_size(301, 3) % 3 == 0


def test_layers_split_evenly_and_in_order_over_stages() -> None:
    assert [list(layers_of_stage(6, rank, 3)) for rank in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(UnsupportedModelError, match="evenly"):
        layers_of_stage(5, 0, 2)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="mistral"), "model_type"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "rope_type"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="llama", attention_bias=True), "attention_bias"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(UnsupportedModelError, match=field):
        architecture_of(_config(**changes))


def test_architecture_reads_rope_theta_and_head_dim() -> None:
    arch = architecture_of(_config(model_type="llama", head_dim=4, rope_parameters=None, rope_theta=5e4))
    assert (arch.head_dim, arch.rope_theta, arch.qkv_bias) == (4, 5e4, False)
    assert architecture_of(_config()).qkv_bias
