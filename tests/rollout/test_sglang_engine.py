"""Risks: SGLangEngine does not roll out what the actor would, or hangs or takes the trainer down.

Against HF transformers on the same tiny checkpoint (fp32, CPU):
- greedy token ids, texts and finish reasons are HF's, for eight chat prompts, with EOS ending some
  responses and the length limit others; a stop string ends a response with the string kept;
- sampling returns n samples per prompt in prompt-major order, each with one log-prob per token,
  equal to HF's log softmax(logits / T) of that token within LOGPROB_TOLERANCE (also under top-p,
  which must not renormalise them);
- new weights sent with update_weights_from_tensor, or broadcast over gloo with
  update_weights_from_distributed, give HF's greedy output for those weights (which the old weights
  do not give); update_weights_from_disk and a second broadcast bring the old output back;
- partial rollout: responses continued across a weight update carry both versions, and each
  token's log-prob is that of the model of its version given the whole prefix (HF);
- a call that exceeds its timeout raises and the engine serves the next call; after its scheduler
  is killed, calls and health checks raise within their timeouts and shutdown leaves no process;
- the trainer process never imports sglang (nor the CPU stand-ins).

One engine serves the whole module (start-up costs most of the time). The kill test ends it and
therefore comes last; pytest runs a module's tests in file order.
"""

from __future__ import annotations

import datetime
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from rlsys.rollout.base import Sample, SamplingParams
from rlsys.rollout.hf_engine import HFEngine
from rlsys.rollout.sglang_engine import RolloutEngineError, SGLangEngine
from tests.rollout.tiny_models import GREEDY, LOGPROB_TOLERANCE, reference_logprobs, tiny_qwen2

CALL_TIMEOUT_S = 120.0
NEW_WEIGHTS_PROMPTS = 4
"""Weight-update checks compare this many prompts: enough to tell two random models apart."""


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[SGLangEngine]:
    engine = SGLangEngine(tiny_model_dir, device="cpu", timeout_s=CALL_TIMEOUT_S, max_total_tokens=16_384)
    print(f"\nsglang engine start-up: {engine.startup_s:.1f} s")
    yield engine
    engine.shutdown()


def _ids(samples: list[Sample]) -> list[list[int]]:
    return [sample.response_ids for sample in samples]


def test_greedy_matches_hf(engine: SGLangEngine, hf_engine: HFEngine, hf_greedy: list[Sample],
                           prompt_ids: list[list[int]]) -> None:
    ours = engine.generate(prompt_ids, GREEDY)
    reference = hf_greedy
    assert _ids(ours) == _ids(reference)
    assert [s.finish_reason for s in ours] == [s.finish_reason for s in reference]
    assert {s.finish_reason for s in ours} == {"stop", "length"}
    assert [s.response_text for s in ours] == [s.response_text for s in reference]
    assert [s.prompt_index for s in ours] == list(range(len(prompt_ids)))
    for sample in ours:
        if sample.finish_reason == "stop":
            assert sample.response_ids[-1] == hf_engine.eos_ids[0]
        else:
            assert len(sample.response_ids) == GREEDY.max_new_tokens
    # Greedy log-probs are taken at temperature 1.
    worst = max(abs(a - b) for o, r in zip(ours, reference) for a, b in zip(o.logprobs, r.logprobs, strict=True))
    print(f"\ngreedy log-probs: max |sglang - HF| = {worst:.2e}")
    assert worst <= LOGPROB_TOLERANCE


def test_trainer_process_never_imports_sglang(engine: SGLangEngine, prompt_ids: list[list[int]]) -> None:
    """sglang and the CPU stand-ins live in the worker only (see sglang_engine's choices)."""
    engine.generate(prompt_ids[:1], GREEDY)
    assert not {"sglang", "triton", "sgl_kernel", "rlsys_cpu_stand_in"} & set(sys.modules)


def test_sampling_layout_and_logprobs(engine: SGLangEngine, hf_engine: HFEngine,
                                      prompt_ids: list[list[int]]) -> None:
    """Temperature 0.8 checks the division by T; top-p 0.9 that the log-probs are not renormalised."""
    temperature = 0.8
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=10, n=3, seed=7)
    samples = engine.generate(prompt_ids, params)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompt_ids)) for _ in range(params.n)]
    worst = 0.0
    for sample in samples:
        assert len(sample.logprobs) == len(sample.response_ids) > 0
        assert (sample.finish_reason == "length") == (len(sample.response_ids) == params.max_new_tokens
                                                      and sample.response_ids[-1] not in hf_engine.eos_ids)
        reference = reference_logprobs(hf_engine.model, prompt_ids[sample.prompt_index], sample.response_ids,
                                       temperature)
        worst = max(worst, max(abs(a - b) for a, b in zip(sample.logprobs, reference)))
    print(f"\nsampled log-probs: max |sglang - HF| = {worst:.2e}")
    assert worst <= LOGPROB_TOLERANCE
    # The n samples of a prompt are drawn independently, not copies of one another.
    groups = [_ids(samples[i:i + params.n]) for i in range(0, len(samples), params.n)]
    assert all(len({tuple(ids) for ids in group}) > 1 for group in groups)


def test_stop_string_ends_response_and_is_kept(engine: SGLangEngine, hf_engine: HFEngine,
                                               hf_greedy: list[Sample], tokenizer: PreTrainedTokenizerBase,
                                               prompt_ids: list[list[int]]) -> None:
    index, stop = _stop_string_inside(hf_greedy, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=GREEDY.max_new_tokens, stop=[stop])
    ours = engine.generate([prompt_ids[index]], params)[0]
    reference = hf_engine.generate([prompt_ids[index]], params, return_logprobs=False)[0]
    assert ours.finish_reason == reference.finish_reason == "stop"
    assert ours.response_text.endswith(stop)
    assert ours.response_ids == reference.response_ids
    assert len(ours.response_ids) < GREEDY.max_new_tokens


def _stop_string_inside(samples: list[Sample], tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    """A length-limited greedy response and the text of two of its middle tokens, which must end it
    early when given as a stop string."""
    for index, sample in enumerate(samples):
        if sample.finish_reason != "length":
            continue
        for start in range(3, len(sample.response_ids) - 4):
            text = tokenizer.decode(sample.response_ids[start:start + 2])
            prefix = tokenizer.decode(sample.response_ids[:start])
            if len(text.strip()) >= 3 and "\ufffd" not in text and text not in prefix:
                return index, text
    raise AssertionError("no usable stop string in the greedy responses")


@pytest.fixture(scope="module")
def new_weights(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase,
                prompt_ids: list[list[int]]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Weights of another random model, and HF's greedy ids for them on the first prompts."""
    state = tiny_qwen2(tokenizer, seed=1).state_dict()
    reference = HFEngine(tiny_model_dir)
    reference.load_state_dict(state)
    return state, _ids(reference.generate(prompt_ids[:NEW_WEIGHTS_PROMPTS], GREEDY, return_logprobs=False))


def test_update_weights_from_tensor_then_disk(engine: SGLangEngine, tiny_model_dir: Path,
                                              prompt_ids: list[list[int]],
                                              new_weights: tuple[dict[str, torch.Tensor], list[list[int]]]) -> None:
    """New weights from tensors, then the original ones back from the checkpoint on disk."""
    prompt_ids = prompt_ids[:NEW_WEIGHTS_PROMPTS]
    new_state, expected = new_weights
    before = _ids(engine.generate(prompt_ids, GREEDY))
    assert before != expected
    try:
        engine.update_weights_from_tensor(new_state.items())
        assert _ids(engine.generate(prompt_ids, GREEDY)) == expected
    finally:
        engine.update_weights_from_disk(tiny_model_dir)
    assert _ids(engine.generate(prompt_ids, GREEDY)) == before


def test_update_weights_from_distributed(engine: SGLangEngine, hf_engine: HFEngine, prompt_ids: list[list[int]],
                                         new_weights: tuple[dict[str, torch.Tensor], list[list[int]]]) -> None:
    """The trainer side is rank 0 of a two-rank gloo group that the engine joins as rank 1. Both
    engine calls block until the trainer side has done its part, so they run in a thread."""
    prompt_ids = prompt_ids[:NEW_WEIGHTS_PROMPTS]
    new_state, expected = new_weights
    before = _ids(engine.generate(prompt_ids, GREEDY))
    assert before != expected
    group_name, port = "rlsys_test_weights", _free_port()
    with ThreadPoolExecutor(max_workers=1) as engine_side:
        joined = engine_side.submit(engine.init_weights_update_group, "127.0.0.1", port, rank_offset=1,
                                    world_size=2, group_name=group_name, backend="gloo")
        trainer_group = _gloo_group_as_rank0("127.0.0.1", port, world_size=2, group_name=group_name)
        joined.result(timeout=CALL_TIMEOUT_S)

        def broadcast(state: dict[str, torch.Tensor]) -> None:
            names = list(state)
            received = engine_side.submit(engine.update_weights_from_distributed, names,
                                          [state[n].dtype for n in names], [state[n].shape for n in names],
                                          group_name)
            for name in names:
                trainer_group.broadcast([state[name].contiguous()], dist.BroadcastOptions()).wait()
            received.result(timeout=CALL_TIMEOUT_S)

        original_state = {name: tensor.clone() for name, tensor in hf_engine.model.state_dict().items()}
        try:
            broadcast(new_state)
            assert _ids(engine.generate(prompt_ids, GREEDY)) == expected
        finally:
            broadcast(original_state)
            engine.destroy_weights_update_group(group_name)
    assert _ids(engine.generate(prompt_ids, GREEDY)) == before


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gloo_group_as_rank0(host: str, port: int, world_size: int, group_name: str) -> dist.ProcessGroupGloo:
    """Rank 0 of the group sglang's ``init_custom_process_group`` creates on its side: a TCP store at
    (host, port) whose keys sit under the prefixes ``<group>``, ``<group>/`` and ``cpu/`` that the
    rendezvous, torch's ``_new_process_group_helper`` and its gloo backend add (torch 2.13)."""
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout)
    prefixed = dist.PrefixStore("cpu/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store)))
    return dist.ProcessGroupGloo(prefixed, 0, world_size, timeout)


def test_partial_rollout_continues_with_the_new_weights(engine: SGLangEngine, tiny_model_dir: Path,
                                                        tokenizer: PreTrainedTokenizerBase,
                                                        prompt_ids: list[list[int]],
                                                        new_weights: tuple[dict[str, torch.Tensor], list[list[int]]]):
    """A weight update between two segments (``rlsys.runner.rollouts``): the responses continue
    from prompt + tokens so far, the later tokens carry the new version, and their log-probs are
    the NEW model's given the whole prefix (HF reference), the earlier ones the old model's."""
    from rlsys.runner.rollouts import EngineWeights, generate_versioned

    new_state, _ = new_weights
    old_model, new_model = HFEngine(tiny_model_dir).model, HFEngine(tiny_model_dir)
    new_model.load_state_dict(new_state)
    weights, calls = EngineWeights(version=3), []

    class UpdatedAfterTheFirstSegment:
        def generate(self, ids: list[list[int]], params: SamplingParams) -> list[Sample]:
            samples = engine.generate(ids, params)
            calls.append(params.max_new_tokens)
            if len(calls) == 1:  # the trainer's sync, between segments 1 and 2
                engine.update_weights_from_tensor(new_state.items())
                weights.version = 4
            return samples

    params = SamplingParams(temperature=1.0, max_new_tokens=7, n=2, seed=5)
    try:
        samples, versions, busy = generate_versioned(UpdatedAfterTheFirstSegment(), prompt_ids[:3], params,
                                                     weights=weights, segment_tokens=3, decode=tokenizer.decode)
    finally:
        engine.update_weights_from_disk(tiny_model_dir)
    assert calls[:2] == [3, 3] and all(c <= 3 for c in calls) and busy > 0
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    partial = [i for i, v in enumerate(versions) if set(v) == {3, 4}]
    assert partial, versions
    worst = 0.0
    for i, sample in enumerate(samples):
        assert len(versions[i]) == len(sample.response_ids) == len(sample.logprobs) <= 7
        assert versions[i] == sorted(versions[i]) and versions[i][:3] == [3] * min(3, len(versions[i]))
        if i in partial:
            assert sample.response_text == tokenizer.decode(sample.response_ids)
        prompt = prompt_ids[sample.prompt_index]
        old = reference_logprobs(old_model, prompt, sample.response_ids, 1.0)
        new = reference_logprobs(new_model.model, prompt, sample.response_ids, 1.0)
        for version, got, o, n in zip(versions[i], sample.logprobs, old, new):
            worst = max(worst, abs(got - (o if version == 3 else n)))
    print(f"partial responses {len(partial)}/{len(samples)}; max |logprob - hf of its version| {worst:.2e}")
    assert worst < LOGPROB_TOLERANCE


def test_release_and_resume_memory_are_no_ops_on_cpu(engine: SGLangEngine, prompt_ids: list[list[int]]) -> None:
    before = _ids(engine.generate(prompt_ids[:2], GREEDY))
    engine.release_memory()
    engine.resume_memory()
    engine.flush_cache()
    assert _ids(engine.generate(prompt_ids[:2], GREEDY)) == before


def test_timeout_raises_and_engine_serves_next_call(engine: SGLangEngine, prompt_ids: list[list[int]]) -> None:
    long_run = SamplingParams(temperature=1.0, max_new_tokens=24)
    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"generate timed out after 0\.2 s"):
        engine.generate(prompt_ids, long_run, timeout_s=0.2)
    assert time.monotonic() - started < 5
    # The abandoned request's late reply must not be taken for this call's.
    assert len(engine.generate(prompt_ids[:1], GREEDY)) == 1
    engine.health_check(timeout_s=CALL_TIMEOUT_S)


def test_killed_scheduler_raises_instead_of_hanging(engine: SGLangEngine, prompt_ids: list[list[int]]) -> None:
    """Runs last: it ends the module's engine."""
    worker = psutil.Process(engine.worker_pid)
    processes = [worker, *worker.children(recursive=True)]
    schedulers = [p for p in processes if "scheduler" in " ".join([p.name(), *p.cmdline()])]
    assert schedulers, [p.cmdline() for p in processes]
    schedulers[0].send_signal(signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"sglang engine \(model .*\): generate: the engine process exited"):
        engine.generate(prompt_ids[:1], GREEDY, timeout_s=30)
    print(f"\nscheduler killed: generate raised after {time.monotonic() - started:.1f} s")
    with pytest.raises(RolloutEngineError, match="health"):
        engine.health_check(timeout_s=10)
    engine.shutdown()
    gone, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive, [p.pid for p in alive]
    with pytest.raises(RolloutEngineError, match="shut down"):
        engine.generate(prompt_ids, GREEDY)

