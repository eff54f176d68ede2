"""Risk: a broken or hung rank in a multi-process test passes silently or blocks CI forever.

``tests.dist.run_distributed`` must return every rank's value in rank order, turn a rank's
exception into a failure carrying that rank's traceback, turn a rank that dies silently into a
failure with its exit code, and turn a hung rank into a timeout failure, killing the processes.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.dist import run_distributed


def _sum_of_ranks(rank: int, world_size: int, offset: int) -> tuple[int, float]:
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return rank + offset, value.item()


def _rank_one_raises(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()


def _rank_one_exits(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)


def _rank_one_hangs(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(3600)


def test_values_come_back_in_rank_order_after_a_collective() -> None:
    assert run_distributed(_sum_of_ranks, 2, args=(10,), timeout_s=60) == [(10, 1.0), (11, 1.0)]


def test_a_raising_rank_fails_the_call_with_its_traceback() -> None:
    with pytest.raises(AssertionError) as failure:
        run_distributed(_rank_one_raises, 2, timeout_s=60)
    message = str(failure.value)
    assert "rank 1 failed" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_rank_one_raises" in message


def test_a_rank_that_dies_silently_fails_the_call_with_its_exit_code() -> None:
    with pytest.raises(AssertionError, match=r"rank 1 \(exit code 3\)"):
        run_distributed(_rank_one_exits, 2, timeout_s=60)


def test_a_hung_rank_fails_the_call_within_the_timeout() -> None:
    started = time.monotonic()
    # Rank 0 may also still be importing on a loaded machine, so only rank 1 must be named.
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] did not finish"):
        run_distributed(_rank_one_hangs, 2, timeout_s=20)
    assert time.monotonic() - started < 45
