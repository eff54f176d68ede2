"""Tiny random HF models, the test batch and HF reference log-probs for the actor tests.

Three configs, each with randomised norm weights and biases so that a swapped or mis-sliced
tensor changes the output: Qwen2 with tied embeddings, Qwen2 untied (saved as a sharded
safetensors checkpoint, so the index path is read), and Llama tied with ONE KV head (fewer KV
heads than TP ranks). Hidden 64, 4 layers, 4 query heads, vocabulary 301 (padded to 384, not a
multiple of TP: the padded columns must be masked). References come from HF transformers with
eager attention in fp32, on full-vocabulary logits, one unpadded sequence at a time; the
log-softmax and entropy of those fp32 logits are taken in float64, because torch's fp32
log-softmax over a large vocabulary is itself off by up to 3e-5 (SmolLM2-135M, 49k tokens),
while megatron's vocab-parallel cross entropy stays within 5e-7 of the float64 value.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.tiny_configs import HF_CONFIGS, VOCAB, make_hf_config  # noqa: F401  (re-exported for the actor tests)

# Prompt and response lengths of the test batch: uneven, one empty response, and with a token
# budget of 32 several padded microbatches per rank and unequal counts across two DP ranks.
PROMPT_LENGTHS = (5, 3, 7, 2, 4, 6)
RESPONSE_LENGTHS = (6, 9, 4, 11, 0, 8)
ADVANTAGES = (1.0, -1.0, 0.5, -0.5, 1.0, 0.8)


def batch_tokens(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    responses = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in RESPONSE_LENGTHS]
    return prompts, responses


def hf_reference(model: Any, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, list[torch.Tensor]]:
    """Per-response log-probs and entropies from HF's full-vocabulary logits, one sequence at a time."""
    from rlsys.algorithms import entropy_from_logits

    logprobs, entropies = [], []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            logits = model(torch.tensor([prompt + response])).logits[0].double()
            scoring = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
            log_softmax = torch.log_softmax(scoring, dim=-1)
            logprobs.append(log_softmax.gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0].float())
            entropies.append(entropy_from_logits(scoring).float())
    return {"logprobs": logprobs, "entropy": entropies}


def max_abs_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    assert len(first) == len(second)
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(first, second) if a.numel()]
    assert all(a.shape == b.shape for a, b in zip(first, second))
    return max(diffs)
