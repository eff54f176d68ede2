"""Risks: SGLangHTTPEngine misreads a real sglang HTTP server, or hangs when the server is gone.

A real ``python -m sglang.launch_server`` runs on 127.0.0.1 in CPU mode, started with
``rlsys.platform.sglang_cpu`` (its stand-ins, environment and command line), once for the module:
- greedy ids, texts and finish reasons equal HF's, and sampling returns prompt-major groups whose
  log-probs are HF's within the engine tests' tolerance;
- update_weights_from_tensor over HTTP (base64 payload) gives HF's greedy output for new weights,
  and update_weights_from_disk brings the old output back;
- a failing call reports sglang's error; after the server is killed, calls and health checks raise
  within their timeouts. The kill test comes last: it ends the module's server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from transformers import PreTrainedTokenizerBase

from rlsys.platform import sglang_cpu
from rlsys.rollout.base import Sample, SamplingParams
from rlsys.rollout.hf_engine import HFEngine
from rlsys.rollout.sglang_engine import RolloutEngineError
from rlsys.rollout.sglang_http import SGLangHTTPEngine
from tests.rollout.tiny_models import GREEDY, LOGPROB_TOLERANCE, reference_logprobs, tiny_qwen2

STARTUP_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    port = _free_port()
    engine_args = sglang_cpu.engine_args_for_device(
        "cpu", {"model_path": str(tiny_model_dir), "max_total_tokens": 16_384, "log_level": "warning"}
    )
    log_path = tmp_path_factory.mktemp("sglang-server") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sglang.launch_server",
             *sglang_cpu.server_command_line(engine_args, host="127.0.0.1", port=port)],
            env=sglang_cpu.sglang_process_env(), stdout=log, stderr=subprocess.STDOUT,
        )
    process.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    process.log_path = log_path  # type: ignore[attr-defined]
    yield process
    _kill_tree(process)


@pytest.fixture(scope="module")
def client(server: subprocess.Popen[bytes]) -> SGLangHTTPEngine:
    client = SGLangHTTPEngine(server.base_url, timeout_s=120.0)  # type: ignore[attr-defined]
    started = time.monotonic()
    try:
        client.wait_until_ready(STARTUP_TIMEOUT_S, server_process=server)
    except RolloutEngineError:
        print(Path(server.log_path).read_text()[-4000:])  # type: ignore[attr-defined]
        raise
    print(f"\nsglang server ready after {time.monotonic() - started:.1f} s")
    return client


def _kill_tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
    process.wait(timeout=30)
    psutil.wait_procs(tree, timeout=15)
    return tree


def _ids(samples: list[Sample]) -> list[list[int]]:
    return [sample.response_ids for sample in samples]


def test_greedy_matches_hf(client: SGLangHTTPEngine, hf_greedy: list[Sample], prompt_ids: list[list[int]]) -> None:
    ours = client.generate(prompt_ids, GREEDY)
    reference = hf_greedy
    assert _ids(ours) == _ids(reference)
    assert [s.finish_reason for s in ours] == [s.finish_reason for s in reference]
    assert [s.response_text for s in ours] == [s.response_text for s in reference]


def test_sampling_layout_and_logprobs(client: SGLangHTTPEngine, hf_engine: HFEngine,
                                      prompt_ids: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.7, max_new_tokens=8, n=2, seed=3)
    samples = client.generate(prompt_ids, params)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompt_ids)) for _ in range(params.n)]
    for sample in samples:
        assert len(sample.logprobs) == len(sample.response_ids) > 0
        reference = reference_logprobs(hf_engine.model, prompt_ids[sample.prompt_index], sample.response_ids,
                                       params.temperature)
        assert sample.logprobs == pytest.approx(reference, abs=LOGPROB_TOLERANCE)


def test_update_weights_from_tensor_then_disk(client: SGLangHTTPEngine, tiny_model_dir: Path,
                                              tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]) -> None:
    """New weights from tensors (base64 over HTTP), then the original ones back from disk."""
    prompt_ids = prompt_ids[:4]
    new_state = tiny_qwen2(tokenizer, seed=3).state_dict()
    new_reference = HFEngine(tiny_model_dir)
    new_reference.load_state_dict(new_state)
    expected = _ids(new_reference.generate(prompt_ids, GREEDY, return_logprobs=False))
    before = _ids(client.generate(prompt_ids, GREEDY))
    assert before != expected
    try:
        client.update_weights_from_tensor(new_state.items())
        assert _ids(client.generate(prompt_ids, GREEDY)) == expected
    finally:
        client.update_weights_from_disk(tiny_model_dir)
    assert _ids(client.generate(prompt_ids, GREEDY)) == before


def test_rejected_call_reports_sglang_error(client: SGLangHTTPEngine) -> None:
    with pytest.raises(RolloutEngineError, match=r"end_weight_update failed .*no weight-update session is open"):
        client.end_weight_update()
    client.health_check(timeout_s=60)


def test_dead_server_raises_instead_of_hanging(server: subprocess.Popen[bytes], client: SGLangHTTPEngine,
                                               prompt_ids: list[list[int]]) -> None:
    """Runs last: it ends the module's server."""
    _kill_tree(server)
    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"sglang server http://127\.0\.0\.1:\d+: generate: cannot reach"):
        client.generate(prompt_ids[:1], GREEDY, timeout_s=30)
    with pytest.raises(RolloutEngineError, match="health_check"):
        client.health_check(timeout_s=10)
    assert time.monotonic() - started < 10
