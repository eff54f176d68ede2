"""Tiny random HF models shared by the Megatron tests (models/ and actor/).

Norm weights and biases are randomised: with their default ones and zeros, a mapping mistake in
a norm or bias would not change any logit and could not be caught.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 301
"""Not a multiple of any TP size, so vocabulary padding is exercised."""

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_tied": dict(
        model_type="qwen2", tie_word_embeddings=True, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6
    ),
    "qwen2_untied": dict(
        model_type="qwen2", tie_word_embeddings=False, num_key_value_heads=2, rope_theta=1e4, rms_norm_eps=1e-6
    ),
    "llama_tied": dict(
        model_type="llama", tie_word_embeddings=True, num_key_value_heads=1, rope_theta=1e5, rms_norm_eps=1e-5
    ),
}


def make_hf_config(settings: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    settings = dict(settings)
    model_type = settings.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        **settings,
    )


def make_randomised_model(settings: dict[str, Any], seed: int) -> Any:
    """An fp32 eager-attention HF model of ``settings`` with random norms and biases, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_hf_config(settings), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(1.0, 0.3)
            elif param_name.endswith(".bias"):
                param.normal_(0.0, 0.3)
    return model.eval()
