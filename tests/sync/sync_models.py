"""Tiny random Qwen2 checkpoints for the weight-sync tests, each a different random model.

The shapes and the tokenizer are ``tests/rollout/tiny_models.py``'s (hidden 64, 2 layers, 4 query
heads, 2 KV heads, Qwen2.5's 151,665-token vocabulary, untied embeddings, init std 0.3 so greedy
responses vary). On top of that, norm weights and q/k/v biases are randomised: with HF's init
(ones and zeros) a swapped norm or a dropped bias would not change the output, so a sync that
loses them would pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tests.rollout.tiny_models import tiny_qwen2


def save_random_qwen2(directory: Path, tokenizer: PreTrainedTokenizerBase, seed: int) -> Path:
    model = tiny_qwen2(tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
