"""Importance-ratio early stop: the strict threshold, masking, zeroed loss, and the DP-global mean over gloo."""

import datetime
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlsys.algorithms import importance_ratio_early_stop, zero_loss_if_skipped


def logprobs_with_ratios(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    return torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64), old


def test_mean_exactly_at_threshold_does_not_trigger():
    # exp(0) is exactly 1, so the mean is exactly the threshold; the masked token (ratio e^10) is ignored.
    logprobs = torch.tensor([[0.0, 0.0, 10.0]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    assert importance_ratio_early_stop(logprobs, old, mask, threshold=1.0) == (False, 1.0)


def test_mean_just_above_threshold_triggers():
    logprobs = torch.tensor([[0.0, 1e-6]], dtype=torch.float64)
    should_skip, mean_ratio = importance_ratio_early_stop(logprobs, torch.zeros(1, 2), torch.ones(1, 2), threshold=1.0)
    assert should_skip
    assert mean_ratio == pytest.approx((1 + math.exp(1e-6)) / 2, rel=1e-15)


def test_default_threshold_of_five():
    logprobs, old = logprobs_with_ratios([2.0, 10.0])
    should_skip, mean_ratio = importance_ratio_early_stop(logprobs, old, torch.ones(1, 2))
    assert (should_skip, mean_ratio) == (True, pytest.approx(6.0))
    logprobs, old = logprobs_with_ratios([2.0, 7.0])
    should_skip, mean_ratio = importance_ratio_early_stop(logprobs, old, torch.ones(1, 2))
    assert (should_skip, mean_ratio) == (False, pytest.approx(4.5))


def test_non_finite_mean_triggers_and_empty_batch_does_not():
    nan_logprobs = torch.tensor([[0.0, float("nan")]])
    assert importance_ratio_early_stop(nan_logprobs, torch.zeros(1, 2), torch.ones(1, 2))[0]
    assert importance_ratio_early_stop(nan_logprobs, torch.zeros(1, 2), torch.zeros(1, 2)) == (False, 1.0)


def test_zeroed_loss_keeps_its_graph_and_gives_zero_gradients():
    weights = torch.tensor([1.0, -2.0], requires_grad=True)
    loss = (weights**2).sum()
    skipped = zero_loss_if_skipped(loss, should_skip=True)
    assert skipped.requires_grad and skipped.item() == 0.0
    skipped.backward()
    assert weights.grad.tolist() == [0.0, 0.0]
    assert zero_loss_if_skipped(loss, should_skip=False) is loss


# Ratios of each rank's valid tokens; _rank_batch adds a masked padding token with ratio 1000.
ABOVE_GLOBALLY = {0: [2.0], 1: [10.0]}  # token-weighted (2 + 10) / 2 = 6 > 5; rank 0 alone: 2
TOKEN_WEIGHTED = {0: [1.0, 1.0, 1.0], 1: [10.0]}  # (3 + 10) / 4 = 3.25; a mean of rank means would be 5.5


def _rank_batch(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logprobs, old = logprobs_with_ratios([*ratios, 1000.0])
    mask = torch.tensor([[1] * len(ratios) + [0]])
    return logprobs, old, mask


def _dp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        dp_group = dist.new_group(list(range(world_size)))
        results = {
            "local": importance_ratio_early_stop(*_rank_batch(ABOVE_GLOBALLY[rank])),
            "above_globally": importance_ratio_early_stop(*_rank_batch(ABOVE_GLOBALLY[rank]), dp_group=dp_group),
            "token_weighted": importance_ratio_early_stop(*_rank_batch(TOKEN_WEIGHTED[rank]), dp_group=dp_group),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_early_stop_uses_the_token_weighted_mean_across_two_dp_ranks(tmp_path):
    world_size = 2
    mp.spawn(_dp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]

    # Rank 0 alone is below the threshold...
    assert results[0]["local"] == [False, pytest.approx(2.0)]
    for rank in range(world_size):
        # ...but it skips together with rank 1 because the global mean exceeds it,
        assert results[rank]["above_globally"] == [True, pytest.approx(6.0)]
        # and the global mean weights ranks by their token counts.
        assert results[rank]["token_weighted"] == [False, pytest.approx(13 / 4)]
