"""Risk: ``rlsys eval --engine sglang`` does not start SGLang, or scores something other than what HF
generates.

SGLang runs on the CPU in its worker process, with the tiny random model in fp32: greedy
responses match HF transformers token for token (tests/rollout checks that engine-wide), so the
two engines' evaluations of the same problems must be the same, record for record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.cli import main

OPTIONS = ["smollm2-135m-grpo-cpu", "reward.num_workers=1", "--limit", "4", "--max-new-tokens", "8",
           "--temperature", "0", "--n", "2"]


@pytest.mark.slow
def test_sglang_engine_evaluates_like_hf(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = {}
    for engine in ("hf", "sglang"):
        output = tmp_path / engine
        assert main(["eval", *OPTIONS, "--model", str(tiny_model_dir), "--engine", engine, "--output", str(output)]) == 0
        records[engine] = [json.loads(line) for line in (output / "arithmetic_val.jsonl").read_text().splitlines()]
        summary = json.loads((output / "summary.json").read_text())
        assert summary["model"]["engine"] == engine
    assert len(records["sglang"]) == 8
    for ours, reference in zip(records["sglang"], records["hf"], strict=True):
        for key in ("prompt_id", "sample_index", "response", "response_length", "finish_reason", "reward"):
            assert ours[key] == reference[key], key
