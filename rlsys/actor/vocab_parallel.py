"""Per-token log-probs and entropy from vocabulary-sharded logits, never gathering the vocabulary.

Checked against megatron-core 0.16.1.

Each tensor-parallel rank holds logits for its slice ``[r * V/tp, (r + 1) * V/tp)`` of the PADDED
vocabulary (``rlsys.models.architecture.padded_vocab_size``). Columns at or beyond the HF
vocabulary belong to zero rows of the output layer: their logit is 0, which is not "impossible",
so they are set to ``-inf`` before anything takes a softmax over the vocabulary.

- Log-probs: megatron's ``vocab_parallel_cross_entropy`` (all-reduces of the max, the sum of
  exponentials and the target logit over the TP group); ``logprob = -cross_entropy``.
  What must stay true: that function subtracts the max IN PLACE from float32 logits (upstream
  optimisation), so nothing may read the logits after it; entropy is computed first.
- Entropy (vocab-parallel, differentiable): with ``m`` the global max (treated as a constant;
  the result does not depend on it), ``s = z - m``, ``Z = sum_v exp(s_v)`` and
  ``W = sum_v exp(s_v) * s_v``, both summed over TP ranks, ``H = log Z - W / Z``. Padded columns
  have ``exp(s) = 0`` and their ``s`` is replaced by 0 before the product (0 * -inf is NaN).
  The sums use megatron's ``reduce_from_tensor_model_parallel_region`` (all-reduce forward,
  identity backward: every rank's partial sum feeds the same replicated result).
- Everything is computed in float32 (bf16 logits lose the small probabilities that matter).
- From hidden states (``scored_logprobs_and_entropy``, what the actor uses): the output layer
  runs only on the positions that are scored (response tokens), in chunks of ``chunk_tokens``
  positions, so no ``[rows, length, V/tp]`` tensor ever exists; with gradients on, each chunk is
  recomputed in the backward (``torch.utils.checkpoint``) and at most one chunk's logits are
  alive at a time. The hidden states enter the TP region as megatron's output layer takes them:
  all-gathered over the sequence under sequence parallel (reduce-scatter backward), copied
  otherwise (all-reduce backward), so the gradients equal the full-logits path's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def padded_column_mask(partition_size: int, tp_rank: int, vocab_size: int, device: torch.device) -> Tensor | None:
    """True for this rank's columns beyond the HF vocabulary; None when it has none."""
    first_column = tp_rank * partition_size
    if first_column + partition_size <= vocab_size:
        return None
    return torch.arange(first_column, first_column + partition_size, device=device) >= vocab_size


def vocab_parallel_entropy(logits: Tensor, padded_columns: Tensor | None) -> Tensor:
    """Entropy over the full vocabulary of ``[..., V/tp]`` logit shards (``-inf`` in padded columns)."""
    logits = logits.float()
    global_max = logits.detach().max(dim=-1, keepdim=True).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - global_max
    exp_shifted = torch.exp(shifted)
    if padded_columns is not None:
        shifted = shifted.masked_fill(padded_columns, 0.0)
    partition = reduce_from_tensor_model_parallel_region(exp_shifted.sum(dim=-1))
    weighted = reduce_from_tensor_model_parallel_region((exp_shifted * shifted).sum(dim=-1))
    return torch.log(partition) - weighted / partition


def token_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, vocab_size: int, *, with_entropy: bool, entropy_requires_grad: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``(log p(label), entropy or None)`` per position of ``[..., V/tp]`` logit shards.

    ``logits`` may be modified in place (see module doc); the caller must not reuse them.
    """
    padded_columns = padded_column_mask(
        logits.shape[-1], parallel_state.get_tensor_model_parallel_rank(), vocab_size, logits.device
    )
    if padded_columns is not None:
        logits = logits.masked_fill(padded_columns, float("-inf"))
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_requires_grad and torch.is_grad_enabled()):
            entropy = vocab_parallel_entropy(logits, padded_columns)
    logprobs = -vocab_parallel_cross_entropy(logits.float(), labels)
    return logprobs, entropy


def _chunk_logprobs_and_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, entropy_rows: Tensor | None, vocab_size: int,
    entropy_requires_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """``[n, h]`` hidden states of one chunk -> ``(log p(target) [n], entropy of entropy_rows or None)``."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight).float()
    padded_columns = padded_column_mask(
        logits.shape[-1], parallel_state.get_tensor_model_parallel_rank(), vocab_size, logits.device
    )
    if padded_columns is not None:
        logits = logits.masked_fill(padded_columns, float("-inf"))
    entropy = None
    if entropy_rows is not None:
        with torch.set_grad_enabled(entropy_requires_grad and torch.is_grad_enabled()):
            entropy = vocab_parallel_entropy(logits[entropy_rows], padded_columns)
    return -vocab_parallel_cross_entropy(logits, targets), entropy


def scored_logprobs_and_entropy(
    hidden: Tensor,
    output_weight: Tensor,
    labels: Tensor,
    score_mask: Tensor,
    vocab_size: int,
    *,
    chunk_tokens: int,
    entropy_mask: Tensor | None = None,
    entropy_requires_grad: bool = False,
    sequence_parallel: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log p(label) at ``score_mask`` and entropy at ``entropy_mask`` (within it), from final hidden states.

    ``hidden``: the last stage's ``[s, b, h]`` output (``[s / tp, b, h]`` under sequence parallel);
    ``output_weight``: this rank's ``[V / tp, h]`` output-layer (or tied embedding) weight;
    ``labels`` / ``score_mask`` / ``entropy_mask``: ``[b, s]``. Returns ``[b, s]`` float32 tensors,
    0 outside their masks (entropy None without ``entropy_mask``). See the module doc.
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    rows, columns = score_mask.nonzero(as_tuple=True)
    selected = hidden.transpose(0, 1)[rows, columns]
    if not sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
        # After the selection, whose gradient is contiguous: megatron's all-reduce backward
        # reduces a contiguous copy of a strided gradient and returns the unreduced original.
        selected = copy_to_tensor_model_parallel_region(selected)
    targets = labels[rows, columns]
    wanted = entropy_mask[rows, columns] if entropy_mask is not None else None
    logprob_parts, entropy_parts = [], []
    for start in range(0, max(rows.numel(), 1), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        args = (selected[piece], output_weight, targets[piece], None if wanted is None else wanted[piece],
                vocab_size, entropy_requires_grad)
        if torch.is_grad_enabled():
            logprobs, entropy = checkpoint(_chunk_logprobs_and_entropy, *args, use_reentrant=False,
                                           preserve_rng_state=False)
        else:
            logprobs, entropy = _chunk_logprobs_and_entropy(*args)
        logprob_parts.append(logprobs)
        entropy_parts.append(entropy)
    shape = score_mask.shape
    logprobs = torch.zeros(shape, dtype=torch.float32, device=hidden.device).index_put(
        (rows, columns), torch.cat(logprob_parts)
    )
    if wanted is None:
        return logprobs, None
    entropy_rows, entropy_columns = rows[wanted], columns[wanted]
    entropy = torch.zeros(shape, dtype=torch.float32, device=hidden.device).index_put(
        (entropy_rows, entropy_columns), torch.cat(entropy_parts)
    )
    return logprobs, entropy
