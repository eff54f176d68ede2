"""Did the engine get the actor's weights? A greedy-continuation check, and the log-prob mismatch metric.

Checked against megatron-core 0.16.1.

- ``check_engine_follows_actor`` (collective): the actor's own greedy continuation of fixed
  prompts, computed by Megatron, against the engine's greedy generation; raises
  ``SyncVerificationError`` on every rank if they differ. A few tokens of a few prompts tell two
  different weight sets apart with near certainty, and any layout error (a transposed or
  mis-sliced tensor, a stale bucket) changes them.
- The actor's continuation: full forward passes without a KV cache (the sequence grows by one
  token per pass), through megatron's own schedule so that it works under PP; prompts are
  right-padded to one length (causal attention: padding after a position cannot change it) and
  the logits of each prompt's last real position are kept. Under TP the argmax is taken over the
  vocabulary-parallel logits without gathering the vocabulary: each rank's best (value, index),
  padded vocabulary columns (index >= the HF vocabulary) excluded, is all-gathered over TP and
  the best wins; on an exact tie the lowest index, as ``torch.argmax`` over the full row. The
  last stage broadcasts each new token to the other stages.
- Comparison: the engine's response must be a prefix of the actor's tokens, ending early only
  when the engine stopped ('stop': end of sequence, which the actor must also have chosen).
  Exact equality: meant for fp32, or a few tokens in bf16, where kernel differences can flip a
  near tie (the error names the first differing position).
- ``logprob_mismatch``: mean |rollout log-prob - actor log-prob| over the sampled tokens the mask
  selects, weighted by token (every token counts once, whatever its sequence's length); 0 when the
  mask selects nothing. Masked-out positions may hold anything (padding, inf, nan).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from rlsys.algorithms.mismatch import logprob_mismatch  # noqa: F401  (re-exported)
from rlsys.models.architecture import architecture_of
from rlsys.rollout.base import Sample, SamplingParams
from rlsys.sync.weight_sync import SYNC_SOURCE_RANK, is_sync_source


class SyncVerificationError(RuntimeError):
    """The engine's greedy continuation differs from the actor's after a sync."""


def vocab_parallel_argmax(logits: Tensor, vocab_size: int, tp_group: Any) -> Tensor:
    """Index in the full vocabulary of the largest logit of ``[..., V/tp]`` shards (see the top)."""
    tp_rank, tp_size = tp_group.rank(), tp_group.size()
    partition = logits.shape[-1]
    first_column = tp_rank * partition
    columns = torch.arange(first_column, first_column + partition, device=logits.device)
    logits = logits.float().masked_fill(columns >= vocab_size, float("-inf"))
    values, indices = logits.max(dim=-1)
    indices = indices + first_column
    if tp_size == 1:
        return indices
    all_values = [torch.empty_like(values) for _ in range(tp_size)]
    all_indices = [torch.empty_like(indices) for _ in range(tp_size)]
    dist.all_gather(all_values, values.contiguous(), group=tp_group)
    dist.all_gather(all_indices, indices.contiguous(), group=tp_group)
    # argmax returns the first maximum: the lowest rank, whose columns come first.
    best_rank = torch.stack(all_values).argmax(dim=0, keepdim=True)
    return torch.stack(all_indices).gather(0, best_rank).squeeze(0)


@torch.no_grad()
def actor_greedy_tokens(model: GPTModel, hf_config: Any, prompts: Sequence[Sequence[int]],
                        num_tokens: int) -> list[list[int]]:
    """The actor's greedy continuation of each prompt, ``num_tokens`` tokens (collective over TP
    and PP; every rank gets the tokens)."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab_size = architecture_of(hf_config).vocab_size
    device = next(model.parameters()).device
    tp_group, pp_group = model.tp_group, model.pp_group
    last_stage = pp_group.size() - 1
    sequences = [list(prompt) for prompt in prompts]
    forward_backward = get_forward_backward_func()
    was_training = model.training
    model.eval()
    try:
        for _ in range(num_tokens):
            # A multiple of TP, so the same code also runs under sequence parallelism.
            width = -(-max(len(s) for s in sequences) // tp_group.size()) * tp_group.size()
            microbatches = [_right_padded(sequence, width, device) for sequence in sequences]

            def forward_step(data_iterator: Any, stage: GPTModel) -> tuple[Tensor, Any]:
                batch = next(data_iterator)
                output = stage(batch["tokens"], batch["position_ids"], None)
                return output, partial(_next_token, position=batch["last"], vocab_size=vocab_size, tp_group=tp_group)

            chosen = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(microbatches),
                model=[model],
                num_microbatches=len(microbatches),
                seq_length=width,
                micro_batch_size=1,
                forward_only=True,
                collect_non_loss_data=True,
            )
            if pp_group.rank() == last_stage:
                next_tokens = torch.stack(list(chosen)).to(device=device, dtype=torch.long)
            else:
                next_tokens = torch.empty(len(sequences), dtype=torch.long, device=device)
            if pp_group.size() > 1:
                dist.broadcast(next_tokens, group=pp_group, group_src=last_stage)
            for sequence, token in zip(sequences, next_tokens.tolist(), strict=True):
                sequence.append(token)
    finally:
        model.train(was_training)
    return [sequence[len(prompt):] for sequence, prompt in zip(sequences, prompts, strict=True)]


def _right_padded(sequence: list[int], width: int, device: torch.device) -> dict[str, Any]:
    tokens = torch.zeros(1, width, dtype=torch.long, device=device)
    tokens[0, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(width, device=device).unsqueeze(0),
        "last": len(sequence) - 1,
    }


def _next_token(output: Tensor, non_loss_data: bool = True, *, position: int, vocab_size: int,
                tp_group: Any) -> Tensor:
    # GPTModel's logits are [batch, sequence, vocabulary / TP]; one sequence per microbatch.
    return vocab_parallel_argmax(output[0, position], vocab_size, tp_group)


def greedy_mismatch(actor_tokens: Sequence[Sequence[int]], engine_samples: Sequence[Sample]) -> str | None:
    """Where the engine's greedy samples depart from the actor's tokens (rule at the top), or None."""
    if len(actor_tokens) != len(engine_samples):
        return f"{len(engine_samples)} engine samples for {len(actor_tokens)} prompts"
    problems = []
    for index, (actor, sample) in enumerate(zip(actor_tokens, engine_samples, strict=True)):
        engine = list(sample.response_ids)
        differing = next((j for j, (a, e) in enumerate(zip(actor, engine)) if a != e), None)
        if differing is not None:
            problems.append(f"prompt {index}, token {differing}: actor {list(actor)}, engine {engine}")
        elif len(engine) > len(actor):
            problems.append(f"prompt {index}: engine gave {len(engine)} tokens, {len(actor)} were asked for")
        elif len(engine) < len(actor) and sample.finish_reason != "stop":
            problems.append(f"prompt {index}: engine ended after {len(engine)} tokens ({sample.finish_reason!r})")
    if not problems:
        return None
    return f"{len(problems)} of {len(actor_tokens)} prompts differ: " + "; ".join(problems[:4])


def check_engine_follows_actor(model: GPTModel, hf_config: Any, engine: Any, prompts: Sequence[Sequence[int]],
                               num_tokens: int) -> list[list[int]]:
    """Raise ``SyncVerificationError`` on every rank unless the engine's greedy continuation of
    ``prompts`` is the actor's (collective; ``engine`` is needed on the sync source only).
    Returns the actor's tokens."""
    actor = actor_greedy_tokens(model, hf_config, prompts, num_tokens)
    message: str | None = None
    if is_sync_source():
        if engine is None:
            raise ValueError("the sync source (global rank 0) needs the engine")
        try:
            samples = engine.generate([list(p) for p in prompts], SamplingParams(temperature=0.0,
                                                                                 max_new_tokens=num_tokens))
            mismatch = greedy_mismatch(actor, samples)
            if mismatch is not None:
                message = f"{getattr(engine, 'name', type(engine).__name__)} does not follow the actor: {mismatch}"
        except Exception as error:
            message = f"greedy check could not run the engine: {type(error).__name__}: {error}"
    outcome: list[str | None] = [message]
    dist.broadcast_object_list(outcome, src=SYNC_SOURCE_RANK)
    if outcome[0] is not None:
        raise SyncVerificationError(outcome[0])
    return actor
