"""Modules of our local (non Transformer Engine) layer spec that megatron-core's own lack.

Checked against megatron-core 0.16.1.

``SdpaCoreAttention`` replaces megatron's ``DotProductAttention`` in the local spec. Upstream
computes a ``[batch, heads, seq, seq]`` score matrix with ``baddbmm`` and a separate softmax;
on a GPU without Transformer Engine that materialises seq x seq per head and is what we must
never do at RL sequence lengths. Here attention is torch's ``scaled_dot_product_attention``:
- causal without an explicit mask uses ``is_causal=True`` and SDPA's own GQA (``enable_gqa``),
  the case flash attention kernels serve;
- an explicit mask (megatron convention: True = masked out) is the whole mask, as upstream; key
  and value heads are then repeated to the query head count, the form every masked kernel takes;
- on CUDA the math backend is excluded, so an input no fused kernel accepts raises instead of
  silently materialising the score matrix.
On CPU the local spec defaults to upstream's ``DotProductAttention`` instead, which matches HF
eager attention bit for bit (SDPA's CPU kernels differ by up to 1e-4 in the logits of a 30-layer
model); ``SdpaCoreAttention`` is still checked against HF on CPU in the tests (tiny models:
below 1e-6). See ``rlsys.models.megatron_model``.
Not supported (raise): context parallel, packed sequences, attention bias, sliding window,
softmax variants, query-key layer scaling. A row whose explicit mask masks every key gives NaN
(upstream gives a uniform distribution); causal masks never do that.

``LocalRMSNorm`` is ``torch.nn.RMSNorm`` built for megatron's module interface. megatron's
``WrappedTorchNorm`` asserts ``not sequence_parallel``; a norm acts per token, so under sequence
parallel it needs nothing but its weight tagged ``sequence_parallel`` so that megatron all-reduces
that weight's gradient over the TP group (``finalize_model_grads``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

_FUSED_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


class SdpaCoreAttention(MegatronModule):
    """Core attention through ``scaled_dot_product_attention``; megatron's core-attention interface.

    Inputs ``[seq, batch, heads, head_dim]`` (key/value with the partition's query-group count);
    output ``[seq, batch, heads * head_dim]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size > 1": config.context_parallel_size != 1,
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "window_size": config.window_size is not None,
            f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
        }
        for what, present in unsupported.items():
            if present:
                raise ValueError(f"SdpaCoreAttention does not support {what}")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SdpaCoreAttention supports neither packed sequences nor attention bias")
        seq_q, batch, heads, head_dim = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout_p = self.dropout_p if self.training else 0.0

        if attention_mask is None:
            is_causal = mask_type == AttnMaskType.causal
            if is_causal and seq_q != k.shape[2]:
                raise ValueError("causal SdpaCoreAttention needs as many keys as queries (no KV cache)")
            kwargs: dict[str, Any] = {"is_causal": is_causal, "enable_gqa": k.shape[1] != heads}
        else:
            repeats = heads // k.shape[1]
            k, v = (t.repeat_interleave(repeats, dim=1) for t in (k, v))
            kwargs = {"attn_mask": ~attention_mask}

        def attend() -> torch.Tensor:
            kernels = sdpa_kernel(_FUSED_CUDA_BACKENDS) if q.is_cuda else contextlib.nullcontext()
            with kernels:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.softmax_scale, **kwargs)

        # As upstream: attention dropout draws from the tensor-parallel RNG state unless sequence
        # parallel is on, so TP ranks drop different heads.
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, heads * head_dim)


class LocalRMSNorm(torch.nn.RMSNorm):
    """RMSNorm with megatron's norm constructor; works with and without sequence parallel."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("LocalRMSNorm implements plain RMSNorm only")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        super().__init__(hidden_size, eps=eps, device=device, dtype=config.params_dtype)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True
