"""Rollout sequences -> minibatches -> data-parallel shares -> token-budget microbatches.

Plain torch; no megatron, no process groups (the actor does the collectives).

Choices and what must stay true:
- A sequence is ``prompt + response``. Causal LM: the logit at position ``t`` predicts token
  ``t + 1``, so response token ``j`` is scored at "label position" ``len(prompt) - 1 + j``. Every
  per-token tensor the loss needs (old / ref log-probs, advantages, loss mask) is laid out on
  label positions, so ``[rows, length]`` tensors line up with the model's output. A prompt must
  hold at least one token (the first response token needs a position that predicts it).
- Minibatches: the batch is cut into ``n_minibatches`` contiguous, near-equal slices (one
  optimizer step each), in order.
- Data parallel: rank ``r`` of ``dp`` takes sequences ``r, r + dp, r + 2 dp, ...`` of a slice
  (round robin balances lengths well enough for rollouts, whose lengths are not sorted).
- Microbatches are PADDED, not packed: sequences are sorted by length (longest first, ties in
  batch order) and taken greedily while
  ``rows * longest`` stays within ``max_tokens_per_microbatch`` (lengths rounded up to
  ``length_multiple``, e.g. the TP size under sequence parallel); each microbatch is right-padded
  to its longest sequence. With causal attention, right padding cannot change any real token's
  output, so the result is the unpadded model's (no packing masks, no position-id resets). A
  sequence longer than the budget gets a microbatch of its own.
- Every data-parallel rank must run the same number of microbatches (megatron's schedule and the
  per-microbatch early-stop all-reduce need it). ``equalize_microbatch_count`` splits the largest
  microbatches in two until the target count is met, and adds one-row filler microbatches whose
  loss mask is empty only when no microbatch has two rows left to split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def _as_long(ids: Sequence[int] | Tensor) -> Tensor:
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _as_float(values: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32).reshape(-1)


@dataclass
class RolloutBatch:
    """Sequences of one rollout step, in the order results come back.

    ``advantages`` is one value per sequence (``[n]``), broadcast over its response tokens, or a
    list of per-token tensors. ``old_logprobs`` / ``ref_logprobs`` / ``loss_mask`` /
    ``behaviour_logprobs`` are per-token, one tensor of the response's length per sequence.
    ``loss_mask`` (optional) removes response tokens from the loss, e.g. the tail of a truncated
    response. ``behaviour_logprobs`` are the rollout engine's, for the off-policy correction.
    """

    prompt_ids: list[Tensor]
    response_ids: list[Tensor]
    advantages: list[Tensor] | None = None
    old_logprobs: list[Tensor] | None = None
    ref_logprobs: list[Tensor] | None = None
    loss_mask: list[Tensor] | None = None
    behaviour_logprobs: list[Tensor] | None = None

    @classmethod
    def build(
        cls,
        prompt_ids: Sequence[Sequence[int] | Tensor],
        response_ids: Sequence[Sequence[int] | Tensor],
        advantages: Tensor | Sequence[float] | Sequence[Tensor] | None = None,
        old_logprobs: Sequence[Tensor | Sequence[float]] | None = None,
        ref_logprobs: Sequence[Tensor | Sequence[float]] | None = None,
        loss_mask: Sequence[Tensor | Sequence[bool]] | None = None,
        behaviour_logprobs: Sequence[Tensor | Sequence[float]] | None = None,
    ) -> RolloutBatch:
        """Normalise python lists / tensors into per-sequence tensors and check lengths."""
        prompts = [_as_long(p) for p in prompt_ids]
        responses = [_as_long(r) for r in response_ids]
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise ValueError("an empty batch")
        for index, prompt in enumerate(prompts):
            if prompt.numel() == 0:
                raise ValueError(f"sequence {index}: the prompt is empty (it needs at least one token)")
        lengths = [r.numel() for r in responses]

        def per_token(name: str, values: Sequence | None, convert: Callable[[Any], Tensor]) -> list[Tensor] | None:
            if values is None:
                return None
            tensors = [convert(v) for v in values]
            if len(tensors) != len(lengths):
                raise ValueError(f"{name}: {len(tensors)} entries for {len(lengths)} sequences")
            for index, (tensor, length) in enumerate(zip(tensors, lengths)):
                if tensor.numel() != length:
                    raise ValueError(f"{name}[{index}]: {tensor.numel()} values for a response of {length} tokens")
            return tensors

        token_advantages = None
        if advantages is not None:
            if isinstance(advantages, Tensor) and advantages.dim() == 1:
                per_sequence = advantages.float()
            elif len(advantages) and not isinstance(advantages[0], (Tensor, list, tuple)):
                per_sequence = torch.as_tensor(advantages, dtype=torch.float32)
            else:
                per_sequence = None
            if per_sequence is not None:
                if per_sequence.numel() != len(lengths):
                    raise ValueError(f"advantages: {per_sequence.numel()} values for {len(lengths)} sequences")
                token_advantages = [per_sequence[i].expand(n).clone() for i, n in enumerate(lengths)]
            else:
                token_advantages = per_token("advantages", advantages, _as_float)
        masks = per_token("loss_mask", loss_mask, lambda v: torch.as_tensor(v, dtype=torch.bool).reshape(-1))
        return cls(
            prompts,
            responses,
            token_advantages,
            per_token("old_logprobs", old_logprobs, _as_float),
            per_token("ref_logprobs", ref_logprobs, _as_float),
            masks,
            per_token("behaviour_logprobs", behaviour_logprobs, _as_float),
        )

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def sequence_length(self, index: int) -> int:
        return self.prompt_ids[index].numel() + self.response_ids[index].numel()

    def with_old_logprobs(self, old_logprobs: list[Tensor]) -> RolloutBatch:
        return dataclasses.replace(self, old_logprobs=old_logprobs)

    def with_behaviour_logprobs(self, behaviour_logprobs: Sequence[Tensor | Sequence[float]]) -> RolloutBatch:
        """The batch with the engine's log-probs (length-checked like ``build``'s)."""
        checked = RolloutBatch.build(self.prompt_ids, self.response_ids, behaviour_logprobs=behaviour_logprobs)
        return dataclasses.replace(self, behaviour_logprobs=checked.behaviour_logprobs)


def minibatch_slices(batch_size: int, n_minibatches: int) -> list[list[int]]:
    """Contiguous, near-equal index slices (the first ``batch_size % n`` get one more)."""
    if n_minibatches > batch_size:
        raise ValueError(f"{n_minibatches} minibatches for a batch of {batch_size} sequences")
    base, extra = divmod(batch_size, n_minibatches)
    slices, start = [], 0
    for k in range(n_minibatches):
        size = base + (1 if k < extra else 0)
        slices.append(list(range(start, start + size)))
        start += size
    return slices


def data_parallel_share(indices: Sequence[int], dp_rank: int, dp_size: int) -> list[int]:
    """The sequences data-parallel rank ``dp_rank`` processes (round robin)."""
    return list(indices[dp_rank::dp_size])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_by_token_budget(
    indices: Sequence[int], lengths: Sequence[int], max_tokens: int, length_multiple: int = 1
) -> list[list[int]]:
    """Greedy, order-keeping groups of ``indices`` whose padded size ``rows * longest`` fits ``max_tokens``.

    ``lengths[k]`` is the length of ``indices[k]``.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in zip(indices, lengths, strict=True):
        padded = _round_up(max(length, 1), length_multiple)
        new_longest = max(longest, padded)
        if current and (len(current) + 1) * new_longest > max_tokens:
            groups.append(current)
            current, new_longest = [], padded
        current.append(index)
        longest = new_longest
    if current:
        groups.append(current)
    return groups


def equalize_microbatch_count(groups: list[list[int]], target: int) -> list[list[int]]:
    """``groups`` made exactly ``target`` long: split the largest (order kept), then add empty fillers."""
    if len(groups) > target:
        raise ValueError(f"{len(groups)} microbatches exceed the target {target}")
    groups = [list(g) for g in groups]
    while len(groups) < target:
        largest = max(range(len(groups)), key=lambda k: len(groups[k]), default=None)
        if largest is None or len(groups[largest]) < 2:
            groups.append([])
            continue
        group = groups[largest]
        half = len(group) // 2
        groups[largest : largest + 1] = [group[:half], group[half:]]
    return groups


@dataclass
class Microbatch:
    """Padded ``[rows, length]`` tensors of one microbatch, label positions aligned (see module doc).

    ``spans[row] = (sequence index, first label position, response length)``; a filler
    microbatch has one row, no spans and an empty ``loss_mask``.
    """

    tokens: Tensor
    position_ids: Tensor
    labels: Tensor
    loss_mask: Tensor
    spans: list[tuple[int, int, int]]
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    advantages: Tensor | None = None
    behaviour_logprobs: Tensor | None = None

    @property
    def num_valid_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def response_mask(self) -> Tensor:
        """True at the label positions of every response token (the loss mask before masking)."""
        mask = torch.zeros_like(self.loss_mask)
        for row, (_, start, length) in enumerate(self.spans):
            mask[row, start : start + length] = True
        return mask

    def response_values(self, per_position: Tensor) -> list[tuple[int, Tensor]]:
        """``(sequence index, values of its response tokens)`` from a ``[rows, length]`` tensor."""
        return [
            (index, per_position[row, start : start + length])
            for row, (index, start, length) in enumerate(self.spans)
        ]


def build_microbatch(batch: RolloutBatch, indices: Sequence[int], length_multiple: int = 1) -> Microbatch:
    """Right-padded tensors for ``indices`` of ``batch`` (an empty list gives a filler microbatch)."""
    if not indices:
        zeros = torch.zeros(1, length_multiple, dtype=torch.long)
        return Microbatch(
            tokens=zeros,
            position_ids=torch.arange(length_multiple).unsqueeze(0),
            labels=zeros.clone(),
            loss_mask=torch.zeros(1, length_multiple, dtype=torch.bool),
            spans=[],
            old_logprobs=torch.zeros(1, length_multiple) if batch.old_logprobs is not None else None,
            ref_logprobs=torch.zeros(1, length_multiple) if batch.ref_logprobs is not None else None,
            advantages=torch.zeros(1, length_multiple) if batch.advantages is not None else None,
            behaviour_logprobs=torch.zeros(1, length_multiple) if batch.behaviour_logprobs is not None else None,
        )
    rows = len(indices)
    length = _round_up(max(batch.sequence_length(i) for i in indices), length_multiple)
    tokens = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.zeros(rows, length, dtype=torch.long)
    loss_mask = torch.zeros(rows, length, dtype=torch.bool)
    per_token = {
        name: torch.zeros(rows, length) if getattr(batch, name) is not None else None
        for name in ("old_logprobs", "ref_logprobs", "advantages", "behaviour_logprobs")
    }
    spans = []
    for row, index in enumerate(indices):
        prompt, response = batch.prompt_ids[index], batch.response_ids[index]
        sequence = torch.cat([prompt, response])
        tokens[row, : sequence.numel()] = sequence
        labels[row, : sequence.numel() - 1] = sequence[1:]
        start, count = prompt.numel() - 1, response.numel()
        response_mask = batch.loss_mask[index] if batch.loss_mask is not None else torch.ones(count, dtype=torch.bool)
        loss_mask[row, start : start + count] = response_mask
        for name, target in per_token.items():
            if target is not None:
                target[row, start : start + count] = getattr(batch, name)[index]
        spans.append((index, start, count))
    return Microbatch(
        tokens=tokens,
        position_ids=torch.arange(length).unsqueeze(0).expand(rows, length).contiguous(),
        labels=labels,
        loss_mask=loss_mask,
        spans=spans,
        old_logprobs=per_token["old_logprobs"],
        ref_logprobs=per_token["ref_logprobs"],
        advantages=per_token["advantages"],
        behaviour_logprobs=per_token["behaviour_logprobs"],
    )


def plan_microbatches(
    batch: RolloutBatch, indices: Sequence[int], max_tokens: int, length_multiple: int = 1
) -> list[list[int]]:
    """Token-budget groups of this rank's ``indices`` (before count equalisation), longest first.

    Sorting by length puts sequences of similar length together, so each microbatch pads to a
    length close to its rows' own (see the module doc).
    """
    ordered = sorted(indices, key=batch.sequence_length, reverse=True)
    return pack_by_token_budget(ordered, [batch.sequence_length(i) for i in ordered], max_tokens, length_multiple)
