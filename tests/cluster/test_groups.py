"""The driver's worker groups. Risks: an actor rank that failed is noticed only when the ranks
waiting for it in a collective time out (half an hour later); and a recipe-sized batch (512
prompts x 32 samples of up to 27k tokens) goes to the engines as one call under one timeout: no
bound on requests in flight, and a slow but healthy rollout is killed by a timeout sized for the
whole batch, while a hung engine is found only after it. The
engines and ranks here stand in for SGLang and Megatron to observe each call and to cause the
hang and the failure, faults the real ones cannot be made to have on cue."""

from __future__ import annotations

import time

import pytest
import ray

from rlsys.cluster.groups import RolloutGroup
from rlsys.rollout.base import Sample, SamplingParams


@ray.remote(num_cpus=0)
class RecordingEngine:
    """Answers each prompt with its first token id; records the size of every call."""

    def __init__(self, seconds_per_call: float = 0.0) -> None:
        self.seconds_per_call, self.calls = seconds_per_call, []

    def generate(self, prompt_ids, params):
        self.calls.append(len(prompt_ids) * params.n)
        time.sleep(self.seconds_per_call)
        return [Sample(prompt_index=i, response_ids=[p[0], params.seed % 1000], response_text="", logprobs=[0.0, 0.0],
                       finish_reason="stop") for i, p in enumerate(prompt_ids) for _ in range(params.n)]

    def recorded(self):
        return self.calls


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_large_batch_streams_in_bounded_chunks_and_comes_back_in_order():
    engines = [RecordingEngine.remote(0.05), RecordingEngine.remote(0.0)]
    group = RolloutGroup(engines, release_during_training=False, max_running_requests=8, progress_timeout_s=30)
    prompts = [[100 + i] for i in range(37)]
    samples = group.generate(prompts, SamplingParams(n=4, seed=7))
    assert [s.prompt_index for s in samples] == [i for i in range(37) for _ in range(4)]
    assert [s.response_ids[0] for s in samples] == [100 + s.prompt_index for s in samples]
    calls = [c for e in engines for c in ray.get(e.recorded.remote(), timeout=30)]
    assert max(calls) <= 8 and sum(calls) == 37 * 4
    # Both engines worked; the faster one took more chunks.
    first, second = (ray.get(e.recorded.remote(), timeout=30) for e in engines)
    assert first and len(second) > len(first)
    # Chunk seeds depend on the chunk's position only, not on which engine ran it.
    again = group.generate(prompts, SamplingParams(n=4, seed=7))
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]


def test_a_batch_within_the_engines_capacity_is_one_call_per_engine():
    engines = [RecordingEngine.remote(), RecordingEngine.remote()]
    group = RolloutGroup(engines, release_during_training=False, max_running_requests=64)
    group.generate([[i] for i in range(8)], SamplingParams(n=8, seed=1))
    assert [ray.get(e.recorded.remote(), timeout=30) for e in engines] == [[32], [32]]


def test_a_hung_engine_fails_the_rollout_after_the_progress_timeout_naming_it():
    engines = [RecordingEngine.remote(0.0), RecordingEngine.remote(3600.0)]
    group = RolloutGroup(engines, release_during_training=False, max_running_requests=2, progress_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no request of engines \[1\] finished within 2 s"):
        group.generate([[i] for i in range(6)], SamplingParams(n=1, seed=1))
    assert time.monotonic() - started < 20
    ray.kill(engines[1])


@ray.remote(num_cpus=0)
class Rank:
    def __init__(self, fails: bool) -> None:
        self.fails = fails

    def train_step(self, batch, rollout_logprobs=None):
        if self.fails:
            raise RuntimeError("rank 1 lost its GPU")
        time.sleep(3600)  # as a rank waiting for the failed one in a collective


def test_a_failing_actor_rank_ends_the_call_at_once_while_others_wait_for_it():
    from rlsys.cluster.groups import ActorGroup, WorkerFailed

    ranks = [Rank.remote(False), Rank.remote(True)]
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"^actor rank 1 \(train_step\): RuntimeError: rank 1 lost its GPU$"):
        ActorGroup(ranks).train_step({"tokens": [1, 2, 3]})
    assert time.monotonic() - started < 30
    for rank in ranks:
        ray.kill(rank)
