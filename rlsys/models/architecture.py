"""Model families: an HF ``config.json`` reduced to the few numbers our Megatron model needs.

One registry maps the HF ``model_type`` to a family reader (``FAMILIES``). Each reader checks that
the config uses only what the Megatron build and the weight mapping implement, and fails with a
message naming the unsupported field otherwise; nothing is silently approximated.

Supported (decoder-only, pre-RMSNorm, SwiGLU MLP, RoPE without scaling, full causal attention):
- ``qwen2``: Qwen2 and Qwen2.5. Bias on q/k/v only; GQA; rope theta from the config; input and
  output embeddings tied for the small sizes (``tie_word_embeddings``).
- ``llama``: Llama-architecture models without biases (e.g. SmolLM2-135M, tied embeddings).

This module imports neither megatron nor transformers: the rollout-side weight sync and the
convert CLI read the same description.

Layout choices that every other module relies on (single source here):
- ``padded_vocab_size``: Megatron's vocab-parallel embedding needs a vocabulary that TP divides.
  The vocabulary is padded up to a multiple of ``lcm(multiple, tp)`` (``multiple`` 128 by
  default). For every TP size that divides 128 (1, 2, 4, ..., 128) the padded size is therefore
  the same for all TP sizes, so Megatron checkpoints reshard across TP. Padded rows are zero; the
  logits they produce are not part of the HF model and consumers drop them (``[..., :vocab_size]``)
  or mask them before any softmax over the vocabulary.
- ``layers_of_stage``: layers are split evenly and in order over pipeline stages (megatron's
  default split); ``rlsys.models.megatron_model`` checks megatron agrees for every model it builds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The HF config asks for something our Megatron model does not implement."""


@dataclass(frozen=True)
class Architecture:
    """What the Megatron build and the HF <-> Megatron weight mapping need to know."""

    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tied_embeddings: bool
    max_position_embeddings: int
    init_std: float

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """The vocabulary rounded up to a multiple of ``lcm(multiple, tp_size)`` (see module doc)."""
    step = math.lcm(multiple, tp_size)
    return -(-vocab_size // step) * step


def layers_of_stage(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global indices of the transformer layers held by pipeline stage ``pp_rank``."""
    if num_layers % pp_size:
        raise UnsupportedModelError(
            f"num_hidden_layers={num_layers} does not split evenly over {pp_size} pipeline stages"
        )
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _field(hf_config: Any, name: str) -> Any:
    value = getattr(hf_config, name, None)
    if value is None:
        raise UnsupportedModelError(f"config.{name} is missing")
    return value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedModelError(message)


def _rope_theta(hf_config: Any) -> float:
    # transformers >= 5 keeps RoPE settings in ``rope_parameters``; older configs use
    # ``rope_theta`` / ``rope_scaling``.
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    _require(rope_type == "default", f"config.rope_parameters.rope_type={rope_type!r}: only 'default' RoPE")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    _require(theta is not None, "config.rope_parameters.rope_theta is missing")
    return float(theta)


def _common(hf_config: Any, family: str, qkv_bias: bool) -> Architecture:
    hidden_act = getattr(hf_config, "hidden_act", "silu")
    _require(hidden_act == "silu", f"config.hidden_act={hidden_act!r}: only 'silu' (SwiGLU)")
    layer_types = getattr(hf_config, "layer_types", None) or []
    _require(
        all(kind == "full_attention" for kind in layer_types),
        "config.layer_types: only full attention (no sliding window layers)",
    )
    hidden_size = int(_field(hf_config, "hidden_size"))
    num_heads = int(_field(hf_config, "num_attention_heads"))
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden_size // num_heads)
    return Architecture(
        family=family,
        vocab_size=int(_field(hf_config, "vocab_size")),
        hidden_size=hidden_size,
        ffn_hidden_size=int(_field(hf_config, "intermediate_size")),
        num_layers=int(_field(hf_config, "num_hidden_layers")),
        num_attention_heads=num_heads,
        num_query_groups=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(hf_config, "rms_norm_eps")),
        rope_theta=_rope_theta(hf_config),
        qkv_bias=qkv_bias,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=int(_field(hf_config, "max_position_embeddings")),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def _qwen2(hf_config: Any) -> Architecture:
    _require(
        not getattr(hf_config, "use_sliding_window", False),
        "config.use_sliding_window=True: only full attention",
    )
    return _common(hf_config, "qwen2", qkv_bias=True)


def _llama(hf_config: Any) -> Architecture:
    # Megatron's add_bias_linear would put a bias on o_proj and the MLP together, and q/k/v-only
    # bias is Qwen2's layout; Llama checkpoints with biases are rare, so they are refused.
    _require(not getattr(hf_config, "attention_bias", False), "config.attention_bias=True: not supported")
    _require(not getattr(hf_config, "mlp_bias", False), "config.mlp_bias=True: not supported")
    return _common(hf_config, "llama", qkv_bias=False)


FAMILIES: dict[str, Callable[[Any], Architecture]] = {
    "qwen2": _qwen2,
    "llama": _llama,
}


def architecture_of(hf_config: Any) -> Architecture:
    """The ``Architecture`` of an HF config (a transformers ``PretrainedConfig`` or look-alike)."""
    model_type = getattr(hf_config, "model_type", None)
    reader = FAMILIES.get(model_type)
    if reader is None:
        raise UnsupportedModelError(
            f"config.model_type={model_type!r}: supported families are {sorted(FAMILIES)}"
        )
    return reader(hf_config)
