"""Risk: the chunked output layer (``scored_logprobs_and_entropy``) differs from one full logits tensor.

The reference is the whole microbatch's float32 logits, ``hidden @ W.T`` over the full padded
vocabulary, through ``token_logprobs_and_entropy`` (checked against HF elsewhere). Log-probs,
entropies and the gradients of a loss that uses both (with respect to the hidden states and the
output weight) must agree at chunk sizes 1, 3 and larger than the selection, at TP1 and at TP2
(where each rank holds half the vocabulary and the padded columns sit on rank 1), with and without
sequence parallel; positions outside the scored mask stay 0 and receive no gradient.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.dist import run_distributed

VOCAB, PADDED_VOCAB, HIDDEN, ROWS, LENGTH = 37, 40, 16, 3, 8
TOLERANCE = 1e-5


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    score = torch.rand(ROWS, LENGTH, generator=generator) < 0.6
    score[2] = False  # a row with nothing to score (a filler)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=generator)
    weight[VOCAB:] = 0.0  # megatron's padded vocabulary rows
    return {
        "hidden": torch.randn(LENGTH, ROWS, HIDDEN, generator=generator),  # megatron's [s, b, h]
        "weight": weight,
        "labels": torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator),
        "score": score,
        "entropy_mask": score & (torch.rand(ROWS, LENGTH, generator=generator) < 0.5),
        "lp_weights": torch.randn(ROWS, LENGTH, generator=generator),
        "ent_weights": torch.randn(ROWS, LENGTH, generator=generator),
    }


def _worker(rank: int, world_size: int, sequence_parallel: bool) -> dict[str, Any]:
    from megatron.core import parallel_state

    from rlsys.actor.parallel import destroy_parallel, initialize_parallel
    from rlsys.actor.vocab_parallel import scored_logprobs_and_entropy, token_logprobs_and_entropy

    initialize_parallel(world_size, 1, seed=1)
    data = _inputs()
    shard = PADDED_VOCAB // world_size
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    results: dict[str, Any] = {}

    def run(chunk: int | None) -> dict[str, torch.Tensor]:
        hidden = data["hidden"].clone().requires_grad_(True)
        weight = data["weight"][tp_rank * shard : (tp_rank + 1) * shard].clone().requires_grad_(True)
        if chunk is None:  # the reference: one full logits tensor of the whole microbatch
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            # [b, s, h] made contiguous first: megatron's copy-to-TP backward needs a contiguous gradient.
            full_hidden = hidden.transpose(0, 1).contiguous()
            full_hidden = copy_to_tensor_model_parallel_region(full_hidden) if world_size > 1 else full_hidden
            logits = (full_hidden @ weight.T).float()
            logprobs, entropy = token_logprobs_and_entropy(logits, data["labels"], VOCAB, with_entropy=True,
                                                           entropy_requires_grad=True)
            logprobs = logprobs * data["score"]
            entropy = entropy * data["entropy_mask"]
        else:
            local_hidden = hidden
            if sequence_parallel:
                per_rank = LENGTH // world_size
                local_hidden = hidden[tp_rank * per_rank : (tp_rank + 1) * per_rank]
            logprobs, entropy = scored_logprobs_and_entropy(
                local_hidden, weight, data["labels"], data["score"], VOCAB, chunk_tokens=chunk,
                entropy_mask=data["entropy_mask"], entropy_requires_grad=True, sequence_parallel=sequence_parallel,
            )
        loss = (logprobs * data["lp_weights"]).sum() + (entropy * data["ent_weights"]).sum()
        loss.backward()
        grad_hidden = hidden.grad
        if sequence_parallel and chunk is not None:
            # Each rank's gradient covers its own sequence slice: gather them to compare.
            torch.distributed.all_reduce(grad_hidden)  # slices are disjoint: the sum is the concatenation
        return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad_hidden": grad_hidden,
                "grad_weight": weight.grad}

    reference = run(None)
    # Every TP rank must end with the same, complete hidden-state gradient.
    gathered = [torch.zeros_like(reference["grad_hidden"]) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, reference["grad_hidden"])
    results["reference_ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)
    for chunk in (1, 3, 1000):
        results[chunk] = {name: (value - reference[name]).abs().max().item() for name, value in run(chunk).items()}
    outside = run(3)
    results["zero_outside"] = bool((outside["logprobs"][~data["score"]] == 0).all()
                                   and (outside["entropy"][~data["entropy_mask"]] == 0).all())
    destroy_parallel()
    return results


@pytest.mark.parametrize("world_size,sequence_parallel", [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-sp"])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(world_size: int, sequence_parallel: bool) -> None:
    for report in run_distributed(_worker, world_size, args=(sequence_parallel,), timeout_s=300):
        assert report["zero_outside"] and report["reference_ranks_agree"]
        for chunk in (1, 3, 1000):
            for name, difference in report[chunk].items():
                assert difference < TOLERANCE, (chunk, name, difference)


def test_entropy_metric_subset_takes_every_kth_response_token() -> None:
    from rlsys.actor.actor import _every_kth

    mask = torch.tensor([[False, True, True, True], [True, False, True, True]])
    assert torch.equal(_every_kth(mask, 1), mask)
    assert _every_kth(mask, 0) is None
    # Row-major order of the six True positions: keep the 1st, 3rd and 5th.
    assert torch.equal(_every_kth(mask, 2), torch.tensor([[False, True, False, True], [False, False, True, False]]))
    assert int(_every_kth(mask, 4).sum()) == 2
