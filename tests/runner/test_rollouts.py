"""Risks of the asynchronous producer (``rlsys.runner.rollouts.AsyncRollouts``): it runs further
ahead than ``max_staleness`` allows, takes batches out of data order, hides a failure of the
engines, or lets the trainer wait forever. The generate function here is a plain callable that
records what it was asked; the engines behind it are tested in tests/rollout and the loop tests."""

from __future__ import annotations

import threading
import time

import pytest

from rlsys.rollout.base import Sample, SamplingParams
from rlsys.runner.rollouts import (
    AsyncRollouts,
    EngineWeights,
    Rollout,
    RolloutCancelled,
    SyncRollouts,
    generate_versioned,
)


class Recorder:
    def __init__(self) -> None:
        self.positions = iter(range(1, 1000))
        self.started: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def next_prompts(self) -> tuple[list, dict[str, int]]:
        position = next(self.positions)
        return [f"prompt {position}"], {"epoch": 0, "offset": position}

    def generate(self, prompts: list, batch_number: int, data_state: dict[str, int]) -> Rollout:
        self.started.append(batch_number)
        assert self.release.wait(timeout=30)
        now = time.time()
        return Rollout(prompts, [], [], data_state, now, now, 0.0)


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("ahead", [1, 2])
def test_producer_stays_at_most_ahead_batches_beyond_the_last_taken(ahead: int) -> None:
    recorder = Recorder()
    rollouts = AsyncRollouts(recorder.generate, recorder.next_prompts, ahead=ahead, first_batch_number=5,
                             timeout_s=30)
    try:
        first = rollouts.take()
        assert first.data_state["offset"] == 1 and first.prompts == ["prompt 1"]
        # After one take, batches 6 .. 6 + ahead may exist, and no more.
        _wait_until(lambda: len(recorder.started) == ahead + 1)
        time.sleep(0.3)
        assert recorder.started == list(range(6, 7 + ahead))
        taken = [rollouts.take() for _ in range(3)]
        assert [r.data_state["offset"] for r in taken] == [2, 3, 4]  # data order
        _wait_until(lambda: len(recorder.started) == ahead + 4)
        time.sleep(0.3)
        assert len(recorder.started) == ahead + 4
    finally:
        rollouts.close()
    assert rollouts.thread is not None and not rollouts.thread.is_alive()


def test_a_failing_generation_reaches_the_trainer() -> None:
    def broken(prompts: list, batch_number: int, data_state: dict[str, int]) -> Rollout:
        raise TimeoutError("rollout: no request of engines [0] finished within 5 s")

    rollouts = AsyncRollouts(broken, Recorder().next_prompts, ahead=1, first_batch_number=0, timeout_s=30)
    with pytest.raises(RuntimeError, match="the rollout producer failed: rollout: no request of engines") as info:
        rollouts.take()
    assert isinstance(info.value.__cause__, TimeoutError)
    rollouts.close()


def test_the_trainer_waits_a_bounded_time() -> None:
    recorder = Recorder()
    recorder.release.clear()  # the generation hangs
    rollouts = AsyncRollouts(recorder.generate, recorder.next_prompts, ahead=1, first_batch_number=0, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0.5 s \(rollout.timeout_s\)"):
        rollouts.take()
    assert time.monotonic() - started < 5
    recorder.release.set()
    rollouts.close()


def test_sync_rollouts_generate_on_take_and_number_the_batches() -> None:
    recorder = Recorder()
    rollouts = SyncRollouts(recorder.generate, recorder.next_prompts, first_batch_number=2)
    assert recorder.started == []
    assert rollouts.take().data_state["offset"] == 1 and recorder.started == [3]
    rollouts.take()
    assert recorder.started == [3, 4]


def test_a_closing_run_starts_no_further_segment() -> None:
    weights, calls = EngineWeights(), []

    class OneTokenAtATime:
        def generate(self, ids: list[list[int]], params: SamplingParams) -> list[Sample]:
            calls.append(len(ids))
            weights.closing.set()  # the trainer closes while this segment runs
            return [Sample(i, [7], "x", [-0.5], "length") for i in range(len(ids))]

    with pytest.raises(RolloutCancelled):
        generate_versioned(OneTokenAtATime(), [[1, 2]], SamplingParams(max_new_tokens=8, n=2), weights=weights,
                           segment_tokens=1, decode=str)
    assert calls == [1]
