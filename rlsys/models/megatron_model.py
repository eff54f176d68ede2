"""Megatron-core ``GPTModel`` for an HF config (Qwen2/Qwen2.5, Llama): config, layer spec, model.

Checked against megatron-core 0.16.1.

Choices:
- Layer spec (``transformer_impl``): ``"transformer_engine"`` uses megatron's TE spec (fused
  norm+linear, TE attention); ``"local"`` uses megatron's local spec with our RMSNorm that works
  under sequence parallel (``rlsys.models.local_layers``). Default: TE when CUDA and Transformer
  Engine are both available, otherwise local (always local on CPU).
- Core attention of the local spec (``local_core_attention``): ``"sdpa"`` (our
  ``SdpaCoreAttention``, fused kernels, never a seq x seq score matrix) is the default on GPU;
  ``"megatron"`` (upstream ``DotProductAttention``, which materialises the score matrix) is the
  default on CPU, because it reproduces HF eager attention bit for bit there: on SmolLM2-135M
  (30 layers, logits up to 34) upstream gave max |diff| 0 against HF eager in fp32 and SDPA 1e-4,
  outside the 1e-5 we hold CPU runs to. Tiny models are within 1e-6 either way, and the tests
  run both.
- Dtype: fp32 params on CPU, bf16 on GPU, unless ``params_dtype`` says otherwise.
- Dropout is 0 (hidden and attention): RL recomputes log-probs that must match the rollout's.
- Every fusion flag is off by default (what CPU runs need; on GPU with TE they are opt-in through
  ``config_overrides``, e.g. ``bias_activation_fusion``, ``apply_rope_fusion``,
  ``gradient_accumulation_fusion``).
- CPU runs build parameters on the CPU (``use_cpu_initialization``) and need
  ``rlsys.platform.megatron_cpu.enable_cpu_megatron()`` called at process start;
  ``build_gpt_model`` refuses to run on CPU without it.
- Vocabulary padding and the layer split over PP stages come from
  ``rlsys.models.architecture`` (``padded_vocab_size``, ``layers_of_stage``); the weight mapping
  uses the same functions, and ``build_gpt_model`` checks megatron placed the layers as they say.
  No virtual pipeline stages, no uneven first/last stages.
- ``parallel_output=True`` keeps logits vocab-sharded over TP (for vocab-parallel losses).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from rlsys.models.architecture import Architecture, architecture_of, layers_of_stage, padded_vocab_size
from rlsys.models.local_layers import LocalRMSNorm, SdpaCoreAttention
from rlsys.platform.megatron_cpu import cpu_megatron_enabled

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"
TRANSFORMER_IMPLS = (LOCAL, TRANSFORMER_ENGINE)

SDPA = "sdpa"
MEGATRON_ATTENTION = "megatron"
LOCAL_CORE_ATTENTIONS = (SDPA, MEGATRON_ATTENTION)


def runs_on_cpu() -> bool:
    """Megatron runs on CPU in this process (no CUDA, or the CPU workarounds were forced on)."""
    return not torch.cuda.is_available() or cpu_megatron_enabled()


def default_transformer_impl() -> str:
    if not runs_on_cpu() and importlib.util.find_spec("transformer_engine") is not None:
        return TRANSFORMER_ENGINE
    return LOCAL


def default_local_core_attention() -> str:
    return MEGATRON_ATTENTION if runs_on_cpu() else SDPA


def build_transformer_config(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype | None = None,
    sequence_parallel: bool = False,
    **config_overrides: Any,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` equivalent to ``hf_config``; overrides win over our defaults."""
    arch = architecture_of(hf_config)
    on_cpu = runs_on_cpu()
    if params_dtype is None:
        params_dtype = torch.float32 if on_cpu else torch.bfloat16
    settings: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    settings.update(config_overrides)
    return TransformerConfig(**settings)


def build_layer_spec(transformer_impl: str, local_core_attention: str | None = None) -> ModuleSpec:
    """The spec of one transformer layer (local: megatron's local spec with our substitutions)."""
    if transformer_impl == TRANSFORMER_ENGINE:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if transformer_impl != LOCAL:
        raise ValueError(f"transformer_impl={transformer_impl!r}: one of {TRANSFORMER_IMPLS}")
    local_core_attention = local_core_attention or default_local_core_attention()
    if local_core_attention not in LOCAL_CORE_ATTENTIONS:
        raise ValueError(f"local_core_attention={local_core_attention!r}: one of {LOCAL_CORE_ATTENTIONS}")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    if local_core_attention == SDPA:
        spec.submodules.self_attention.submodules.core_attention = SdpaCoreAttention
    return spec


def build_block_spec(
    config: TransformerConfig, transformer_impl: str, pp_rank: int, local_core_attention: str | None = None
) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage plus the final norm."""
    if transformer_impl == TRANSFORMER_ENGINE:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm", pp_rank=pp_rank)
    num_layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    layer_spec = build_layer_spec(LOCAL, local_core_attention)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=LocalRMSNorm)


def build_gpt_model(
    hf_config: Any,
    *,
    transformer_impl: str | None = None,
    local_core_attention: str | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    params_dtype: torch.dtype | None = None,
    sequence_parallel: bool = False,
    parallel_output: bool = True,
    vocab_pad_multiple: int = 128,
    **config_overrides: Any,
) -> GPTModel:
    """This rank's ``GPTModel`` stage for ``hf_config`` under megatron's initialised parallel state.

    The vocabulary is padded to ``padded_vocab_size(vocab, tp, vocab_pad_multiple)``; logits
    beyond the HF vocabulary belong to zero rows and are not the model's (see architecture).
    """
    if not torch.cuda.is_available() and not cpu_megatron_enabled():
        raise RuntimeError(
            "megatron-core on CPU: call rlsys.platform.megatron_cpu.enable_cpu_megatron() at process start"
        )
    transformer_impl = transformer_impl or default_transformer_impl()
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={transformer_impl!r}: one of {TRANSFORMER_IMPLS}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    arch = architecture_of(hf_config)
    config = build_transformer_config(
        hf_config, tp=tp, pp=pp, params_dtype=params_dtype, sequence_parallel=sequence_parallel, **config_overrides
    )
    _check_stage_layers(config, arch, pp_rank, pp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_block_spec(config, transformer_impl, pp_rank, local_core_attention),
        vocab_size=padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    if len(model.decoder.layers) != len(layers_of_stage(arch.num_layers, pp_rank, pp)):
        raise RuntimeError("megatron built a different number of layers than layers_of_stage gives")
    return model


def _check_stage_layers(config: TransformerConfig, arch: Architecture, pp_rank: int, pp: int) -> None:
    # The weight mapping places HF layers by layers_of_stage; megatron must place them the same.
    expected = layers_of_stage(arch.num_layers, pp_rank, pp)
    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    if (offset, count) != (expected.start, len(expected)):
        raise RuntimeError(
            f"megatron places layers {offset}..{offset + count - 1} on stage {pp_rank}, "
            f"the weight mapping expects {expected.start}..{expected.stop - 1}"
        )
