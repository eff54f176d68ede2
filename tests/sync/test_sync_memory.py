"""Risks: a sync holds far more than one bucket (the whole model, or every gathered tensor) and runs
a large actor out of memory; the in-process transport drops or alters a weight; a data-parallel
replica that skips the gather does not get the outcome.

Two gloo ranks, a random Qwen2 of about 200 MB in fp32 (hidden 512, 16 layers, FFN 1408,
vocabulary 2048: 180 tensors, none over 6 MB) at TP2, synced in process into an ``HFEngine`` with
8 MiB buckets. Peak memory is measured for real, as the growth of each process's peak resident
set (``VmHWM``, reset through ``/proc/self/clear_refs``) during the sync, and must stay within
the bound stated in ``rlsys/sync/weight_sync.py``: one bucket plus the tensor being gathered
(TP shards, gloo's gather buffer and the merge: about three copies of the largest full tensor)
plus allocator slack. The same measurement of ``export_hf_state_dict`` (which materialises the
model) must see the whole model, so the measurement can fail. After the sync the engine's
weights are bitwise the actor's HF export.

Measurement conditions, each needed for the resident set to track live tensors:
- glibc's mmap threshold is fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_`` in the ranks'
  environment): every tensor of 64 KiB or more is its own mapping, returned to the OS when
  freed. With the default, adaptive threshold, freed tensors stay resident in malloc's heaps and
  arenas and a later allocation can land on new pages, so the peak also counts allocator
  fragmentation (58 MiB on the rank that holds no buckets, in a measured run).
- The measured sync is the second one: transformers maps a safetensors checkpoint into memory
  without reading it, so the first sync into a fresh ``HFEngine`` also makes the engine's own
  weights resident (the whole model, copy-on-write), which is the engine's memory, not the sync's.

A second layout, DP2 (tp=1), checks that rank 1, a data-parallel replica, skips the gather, gets
the source's report and raises nothing.
"""

from __future__ import annotations

import gc
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from rlsys.models.offline import load_tokenizer

BUCKET_BYTES = 8 * 2**20
ALLOCATOR_SLACK_BYTES = 16 * 2**20
MIB = 2**20
MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


def _hf_config() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("memory-qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(_hf_config()).save_pretrained(directory)
    load_tokenizer("qwen2.5-tokenizer").save_pretrained(directory)
    return str(directory)


def _status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def _peak_growth(action: Any) -> tuple[int, Any]:
    """(growth of the peak resident set during ``action()``, its result)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    result = action()
    return _status_bytes("VmHWM") - before, result


def _memory_worker(rank: int, world_size: int, engine_dir: str) -> dict[str, Any]:
    from megatron.core import parallel_state, tensor_parallel

    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import export_hf_state_dict
    from rlsys.platform.megatron_cpu import enable_cpu_megatron
    from rlsys.rollout.hf_engine import HFEngine
    from rlsys.sync.transports import InProcessTransport
    from rlsys.sync.weight_sync import sync_weights

    enable_cpu_megatron(force=True)
    hf_config = _hf_config()
    engine = HFEngine(engine_dir) if rank == 0 else None
    report: dict[str, Any] = {}
    for layout, tp in (("tp2", 2), ("dp2", 1)):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        torch.manual_seed(1)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        model = build_gpt_model(hf_config, transformer_impl="local")
        transport = InProcessTransport(engine) if rank == 0 else None
        sync_weights(model, hf_config, transport, bucket_bytes=BUCKET_BYTES)
        growth, sync_report = _peak_growth(lambda: sync_weights(model, hf_config, transport, bucket_bytes=BUCKET_BYTES))
        report[f"{layout}/sync_peak_growth"] = growth
        report[f"{layout}/report"] = sync_report
        if layout == "tp2":
            report["tp2/model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()) * tp
            growth, exported = _peak_growth(lambda: export_hf_state_dict(model, hf_config))
            report["tp2/export_peak_growth"] = growth
            if rank == 0:
                engine_state = engine.model.state_dict()
                report["tp2/differing"] = [name for name, tensor in exported.items()
                                           if not torch.equal(engine_state[name], tensor)]
                report["tp2/exported_names"] = sorted(exported)
            del exported
        parallel_state.destroy_model_parallel()
        del model
    return report


@pytest.fixture(scope="module")
def memory_report(engine_dir: str) -> list[dict[str, Any]]:
    from tests.dist import run_distributed

    previous = os.environ.get(MMAP_THRESHOLD_VARIABLE)
    os.environ[MMAP_THRESHOLD_VARIABLE] = str(64 * 1024)  # read by the spawned ranks' malloc at start
    try:
        reports = run_distributed(_memory_worker, world_size=2, args=(engine_dir,), timeout_s=600)
    finally:
        if previous is None:
            del os.environ[MMAP_THRESHOLD_VARIABLE]
        else:
            os.environ[MMAP_THRESHOLD_VARIABLE] = previous
    for rank, report in enumerate(reports):
        for key, value in report.items():
            if "growth" in key:
                print(f"\nrank {rank} {key}: {value / MIB:.1f} MiB", end="")
    print()
    return reports


def test_sync_peak_memory_is_one_bucket_plus_one_tensor(memory_report: list[dict[str, Any]]) -> None:
    sync_report = memory_report[0]["tp2/report"]
    assert sync_report.num_tensors == 16 * 12 + 3
    assert sync_report.num_buckets > 10
    assert sync_report.max_bucket_bytes <= BUCKET_BYTES
    largest_full_tensor = 2 * 1408 * 512 * 4  # linear_fc1 (gate and up), gathered over TP
    bound = BUCKET_BYTES + sync_report.largest_tensor_bytes + 3 * largest_full_tensor + ALLOCATOR_SLACK_BYTES
    model_bytes = memory_report[0]["tp2/model_bytes"]
    assert model_bytes > 180 * MIB
    for rank, report in enumerate(memory_report):
        assert report["tp2/sync_peak_growth"] < bound, (rank, report["tp2/sync_peak_growth"] / MIB, bound / MIB)
        # The measurement sees a materialised model (a sync that held everything would fail above).
        assert report["tp2/export_peak_growth"] > 0.8 * model_bytes, (rank, report["tp2/export_peak_growth"] / MIB)


def test_in_process_sync_gives_the_engine_the_actors_weights_bitwise(memory_report: list[dict[str, Any]]) -> None:
    assert len(memory_report[0]["tp2/exported_names"]) == 16 * 12 + 3
    assert memory_report[0]["tp2/differing"] == []


def test_data_parallel_replica_skips_the_gather_and_gets_the_report(memory_report: list[dict[str, Any]]) -> None:
    source, replica = memory_report[0]["dp2/report"], memory_report[1]["dp2/report"]
    assert replica == source
    assert source.num_tensors == 16 * 12 + 3
    # The replica gathered nothing: its peak barely moved (the source's stream aliases its
    # parameters at TP1, so it stays small too).
    assert memory_report[1]["dp2/sync_peak_growth"] < ALLOCATOR_SLACK_BYTES
