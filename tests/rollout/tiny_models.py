"""Tiny random Qwen2 checkpoints with the real Qwen2.5 tokenizer, for rollout tests.

- Shapes: hidden 64, 2 layers, 4 query heads, 2 KV heads, and a vocabulary of the tokenizer's
  151,665 tokens, so every id the tokenizer produces is in range (about 20M parameters, nearly all
  in the embedding and the output layer). Embeddings are untied so that the output row of EOS can
  change without changing the input embedding of ``<|im_end|>``, which every chat prompt contains.
- ``initializer_range=0.3`` instead of 0.02: with 0.02 the next-token distribution is close to
  uniform over 151k tokens (top log-prob about -10.9 against -11.9 for uniform) and greedy decoding
  repeats one token. With 0.3 the top log-probs are about -3 to -5 and greedy responses vary, so a
  wrong position, weight or attention mask changes the tokens.
- End of sequence: a random model practically never samples it. ``make_eos_replace`` sets the EOS
  row of the output layer to 1.02 times the row of a token the model emits greedily; EOS then
  wins wherever that token would have been the greedy choice, so some greedy responses end with EOS
  and others run to the length limit, and sampled responses end with EOS now and then.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from rlsys.rollout.base import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
LOGPROB_TOLERANCE = 1e-4
"""Largest |engine - HF| per-token log-prob the rollout tests allow (fp32, CPU). Measured with
sglang 0.5.21 against transformers 5.12.1: at most 2.0e-5 for sampled tokens (temperature 0.8,
top-p 0.9) over several runs; five times that leaves room for thread-count-dependent summation
order, while a temperature or renormalisation error is 1e-2 or more."""

QUESTIONS = (
    "What is 2 + 3?",
    "Compute 7 * 8.",
    "What is 15 - 9?",
    "Solve x + 4 = 10 for x.",
    "What is 12 / 4?",
    "Is 17 a prime number?",
    "What is 3 to the power of 4?",
    "What is the sum of the integers from 1 to 10?",
)


def chat_prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    prompts = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(torch.float32).eval()


@torch.no_grad()
def make_eos_replace(model: Qwen2ForCausalLM, token: int, eos: int) -> None:
    output_layer = model.get_output_embeddings().weight
    output_layer[eos] = 1.02 * output_layer[token]


@torch.no_grad()
def reference_logprobs(model: Qwen2ForCausalLM, prompt: list[int], response: list[int],
                       temperature: float) -> list[float]:
    """log softmax(logits / temperature) of each response token: base.py's definition, from one HF
    forward pass over prompt + response. The output layer is applied to the positions that predict
    response tokens only: with 151k-token rows it dominates the cost of the check."""
    hidden = model.model(input_ids=torch.tensor([prompt + response])).last_hidden_state
    logits = model.lm_head(hidden[0, len(prompt) - 1:-1]).float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()
